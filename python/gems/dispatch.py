"""Backend choice: which implementation runs the fused GEMS step.

``backend="auto"`` (or the GEMS_BACKEND environment variable) picks the fastest available and silently
falls back to the torch reference; an explicitly requested backend that cannot run raises with the reason."""
from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

import torch

from gems.errors import BackendUnavailableError

BACKENDS = ("auto", "torch", "triton", "cuda")

# backend="auto" with Triton (CUDA without a prebuilt extension): Triton runs a weight only when its fused
# step was measured faster than the torch path there, by the work m·n·R of one call (R = total rank of all
# subspaces). H100, `python benches/bench_step.py` (benches/results/bench_step_nvidia_h100_80gb_hbm3.csv),
# Triton / torch time, two tasks: fp32 0.77 and 0.93 at m·n·R = 1.1e8 and 4.5e8 (576×1536), 1.3–5.1× from
# 5.4e8 (2048², 4096², 4096×11008); bf16 0.23–0.88 up to 9.1e8 (576×1536, 2048² at R = 128), 1.2–7× from
# 2.1e9. Checked on an H200 (`python benches/bench_step.py --check-auto benches/results/bench_step_nvidia_h200.csv`):
# the faster of Triton and torch in 23 of 24 configurations, the miss 1.22× (576×1536 fp32 at R = 512).
AUTO_TRITON_MAX_WORK = {torch.float32: 5e8, torch.bfloat16: 1e9, torch.float16: 1e9}
# backend="auto" with the prebuilt CUDA extension: in fp32 it was as fast as torch or faster at every measured
# shape (0.47–1.01× torch's time); in bf16 it was slower from a total rank R of 1024 (1.49–2.21×, every
# shape) and at R = 512 on weights of 4096² and more (1.35–1.44×), faster below (0.33–0.86×, up to 2048² at
# R = 512). Half-precision weights at or beyond one of these (R, m·n) corners take the torch path. On an H200:
# the faster of CUDA and torch in 20 of 24 configurations, the worst miss 1.24× (576×1536 bf16 at R = 1024).
AUTO_CUDA_HALF_TORCH_FROM = ((1024, 0), (512, 8e6))


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


def requested_backend(requested: str | None) -> str:
    """The backend asked for: the argument, else the GEMS_BACKEND environment variable, else "auto"."""
    return requested or os.environ.get("GEMS_BACKEND") or "auto"


def resolve_backend(requested: str | None, *, device_type: str) -> str:
    """The backend to use for parameters on ``device_type`` (for "auto", the preferred kernel backend;
    :func:`auto_backend_for` then picks per weight)."""
    requested = requested_backend(requested)
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


def auto_backend_for(preferred: str, shape: Sequence[int], dtype: torch.dtype, total_rank: int) -> str:
    """Under backend="auto": the backend for one weight of ``shape`` and ``dtype`` whose subspaces have
    ``total_rank`` columns in all, given the resolved ``preferred`` one (see AUTO_TRITON_MAX_WORK and
    AUTO_CUDA_HALF_TORCH_FROM)."""
    entries = shape[0] * shape[1]
    if preferred == "triton":
        limit = AUTO_TRITON_MAX_WORK.get(dtype, AUTO_TRITON_MAX_WORK[torch.float32])
        return "triton" if entries * total_rank <= limit else "torch"
    if preferred == "cuda" and dtype in (torch.bfloat16, torch.float16):
        if any(total_rank >= r and entries >= mn for r, mn in AUTO_CUDA_HALF_TORCH_FROM):
            return "torch"
    return preferred
