"""Fused Triton kernels of the GEMS step (docs/kernel_contract.md).

- ``project_adam``: projection of every task gradient onto [shared, task] bases + subspace Adam, fused.
- ``back_project_update``: back-projection of all subspaces as one GEMM + decoupled decay + write of W.
- ``available()``: (True, "") when the kernels can run here, else (False, reason).

Importing this package never fails: without triton the two functions raise
``gems.errors.BackendUnavailableError`` with the reason. To run the kernels on CPU (slowly, for tests),
set ``TRITON_INTERPRET=1`` before the first import of gems_kernels.
"""
from __future__ import annotations

import os

__all__ = ["project_adam", "back_project_update", "available"]

try:
    from .back_project_update import back_project_update
    from .project_adam import project_adam

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError without triton; anything triton raises on a broken install
    _IMPORT_ERROR = f"triton could not be imported ({type(exc).__name__}: {exc})"

    def _unavailable(*args, **kwargs):
        from gems.errors import BackendUnavailableError

        raise BackendUnavailableError(f"gems_kernels: {_IMPORT_ERROR}; install triton>=3.0 (pip install triton)")

    project_adam = _unavailable  # type: ignore[assignment]
    back_project_update = _unavailable  # type: ignore[assignment]


def available() -> tuple[bool, str]:
    """Whether the Triton kernels can run here: triton imports and there is a CUDA device, or the kernels
    were loaded under TRITON_INTERPRET=1 (CPU). Returns (ok, reason-if-not)."""
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    from . import _utils

    if _utils.INTERPRET:
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False, ("TRITON_INTERPRET=1 was set after gems_kernels was imported; set it before the first "
                       "import to run the kernels on CPU")
    try:
        import torch

        if torch.cuda.is_available():
            return True, ""
    except Exception as exc:  # pragma: no cover - torch is a hard dependency
        return False, f"torch.cuda check failed: {exc}"
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing gems_kernels to run on CPU)"
