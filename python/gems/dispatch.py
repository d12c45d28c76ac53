"""Backend choice: which implementation runs the fused GEMS step.

``backend="auto"`` (or the GEMS_BACKEND environment variable) picks the fastest available and silently
falls back to the torch reference; an explicitly requested backend that cannot run raises with the reason."""
from __future__ import annotations

import importlib
import os

from gems.errors import BackendUnavailableError

BACKENDS = ("auto", "torch", "triton", "cuda")


def _probe(name: str) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    module = {"triton": "gems_kernels", "cuda": "gems.cuda_backend"}[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # an optional backend that is not built must never break gems
        return False, f"{module} cannot be imported: {exc}"
    available = getattr(mod, "available", None)
    if available is None:
        return False, f"{module} has no available() probe"
    return available()


def backend_module(name: str):
    """The module implementing docs/kernel_contract.md for a resolved backend name (None for torch)."""
    if name == "torch":
        return None
    return importlib.import_module({"triton": "gems_kernels", "cuda": "gems.cuda_backend"}[name])


def resolve_backend(requested: str | None, *, device_type: str) -> str:
    """The backend to use for parameters on ``device_type``."""
    requested = requested or os.environ.get("GEMS_BACKEND") or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        if device_type != "cuda":
            return "torch"  # the kernels target GPUs; on CPU the torch path is the fast one
        # A prebuilt CUDA extension first; never a just-in-time build behind the user's back (minutes of
        # nvcc on the first step): with no prebuilt extension, Triton, then torch.
        cuda_ok, cuda_why = _probe("cuda")
        if cuda_ok and "prebuilt" in cuda_why:
            return "cuda"
        if _probe("triton")[0]:
            return "triton"
        return "torch"
    ok, reason = _probe(requested)
    if not ok:
        raise BackendUnavailableError(f"backend={requested!r} is not available here: {reason}")
    return requested
