"""CUDA backend: the kernels of csrc/ behind the kernel contract (docs/kernel_contract.md).

Two contract functions, same signatures and meaning as every other backend:

- :func:`project_adam` — projections with torch matmul (cuBLAS; one GEMM per task against the
  concatenated basis ``[B_k0, B_kt]``, the shared gradient is never materialised), then ONE launch of the
  multi-tensor subspace-Adam kernel for every subspace of every weight.
- :func:`back_project_update` — for bf16/fp16 weights on sm_80+, one launch of the fused tensor-core
  kernel (WMMA GEMM over the concatenated gated bases and the stacked δ, weight update as epilogue: Δ
  never touches memory); otherwise a cuBLAS GEMM per weight and ONE launch of the update epilogue.

Lower-level ops: :func:`subspace_adam_` (gems.reference.adam_delta over many tensors) and
:func:`weight_update_` (gems.reference.apply_update over many tensors).

Arguments are validated by gems.contract (the checkers the Triton launchers use too) before anything
touches CUDA: a bad call raises ``TypeError`` (wrong type or dtype; gems.contract.OperandTypeError, also a
``ValueError``) or ``ValueError`` (shape, device, value), never crashes in a kernel. Non-contiguous inputs are
made contiguous; non-contiguous in-place outputs are updated through a contiguous copy.

The compiled module is the prebuilt ``gems._C`` (``GEMS_BUILD_CUDA=1 pip install -e .``) or, failing
that, a just-in-time build of csrc/ with ninja into ``$GEMS_CUDA_CACHE`` (default
``~/.cache/gems/cuda-<hash>``, never the repository). Importing this module never fails and never
builds; :func:`available` says whether :func:`load` can work and why not.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from gems.errors import BackendUnavailableError
from gems import contract
from gems.reference import coord_shape, project, project_back, side_dim

__all__ = [
    "available",
    "load",
    "project_adam",
    "back_project_update",
    "subspace_adam_",
    "weight_update_",
]

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
_FLOATS = contract.FLOATS
_HALF = (torch.bfloat16, torch.float16)
_module: ModuleType | None = None
_lock = threading.Lock()


# ----------------------------------------------------------------------------------------- loading
def _sources() -> list[Path]:
    if not CSRC_DIR.is_dir():
        return []
    return [CSRC_DIR / "binding.cpp"] + sorted(CSRC_DIR.glob("*.cu"))


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or cpp_extension.CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _prebuilt() -> ModuleType | None:
    try:
        return importlib.import_module("gems._C")
    except ImportError:
        return None


def available() -> tuple[bool, str]:
    """(True, how it will be loaded) or (False, why not). Cheap: builds nothing."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build (no CUDA runtime)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if _module is not None:
        return True, f"loaded ({_module.__name__})"
    if _prebuilt() is not None:
        return True, "prebuilt extension gems._C"
    if not _sources() or not (CSRC_DIR / "binding.cpp").exists():
        return False, f"gems._C is not built and the CUDA sources are not at {CSRC_DIR}"
    if _nvcc() is None:
        return False, "gems._C is not built and nvcc was not found (set CUDA_HOME) for a just-in-time build"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return False, "gems._C is not built and ninja is missing for a just-in-time build (pip install ninja)"
    return True, "just-in-time build of csrc/ with nvcc + ninja on first use"


def _cache_dir(tag: str) -> Path:
    root = os.environ.get("GEMS_CUDA_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gems"
    path = base / f"cuda-{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    major, minor = torch.cuda.get_device_capability()
    digest = hashlib.sha256()
    for path in sorted(CSRC_DIR.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{major}.{minor}".encode())
    tag = digest.hexdigest()[:16]
    arch = f"{major}{minor}"
    return load_extension(
        name=f"gems_cuda_{tag}",
        sources=[str(p) for p in _sources()],
        extra_include_paths=[str(CSRC_DIR)],
        extra_cflags=["-O3", "-std=c++17"],
        # an explicit -gencode makes torch skip its own arch list: build for this GPU only
        extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
        build_directory=str(_cache_dir(tag)),
        verbose=os.environ.get("GEMS_CUDA_VERBOSE") == "1",
    )


def load() -> ModuleType:
    """The compiled kernels (prebuilt gems._C, else built just in time); BackendUnavailableError if not."""
    global _module
    if _module is not None:
        return _module
    ok, why = available()
    if not ok:
        raise BackendUnavailableError(f"gems CUDA backend unavailable: {why}")
    with _lock:
        if _module is None:
            mod = _prebuilt()
            if mod is None:
                try:
                    mod = _jit_build()
                except Exception as exc:  # compiler errors come as RuntimeError/subprocess errors
                    raise BackendUnavailableError(f"gems CUDA backend: just-in-time build failed: {exc}") from exc
            _module = mod
    return _module


# -------------------------------------------------------------------------------------- validation
def _require_cuda(device: torch.device, what: str) -> None:
    """The CUDA backend's device rule (gems.contract's ``device_rule``): the one device of a call's operands."""
    if device.type != "cuda":
        raise ValueError(f"{what}: the CUDA backend needs CUDA tensors, got tensors on {device}")


def _out(t: Tensor) -> tuple[Tensor, bool]:
    """A contiguous tensor to write into, and whether it must be copied back into t afterwards."""
    return (t, False) if t.is_contiguous() else (t.contiguous(), True)


def _on(device: torch.device):
    """Context making ``device`` current, so launches and the pointer-table copies go to its GPU."""
    return torch.cuda.device(device)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _use_wmma(device: torch.device, dtype: torch.dtype) -> bool:
    return (dtype in _HALF and os.environ.get("GEMS_CUDA_NO_WMMA") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 8)


# -------------------------------------------------------------------------------- lower-level ops
def subspace_adam_(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    deltas: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """gems.reference.adam_delta on every (grad, exp_avg, exp_avg_sq) in one launch per grad dtype.

    grads fp32/bf16/fp16, moments fp32 of the same shapes, updated in place. Returns the fp32 deltas
    (written into ``deltas`` when given)."""
    c = contract.subspace_adam_args(grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1, beta2=beta2,
                                    eps=eps, deltas=deltas, device_rule=_require_cuda)
    grads, exp_avgs, exp_avg_sqs, deltas = c.lists
    step, lr, beta1, beta2, eps = c.scalars
    n, device = c.K, c.device
    if n == 0:
        return []
    if deltas is None:
        deltas = [torch.empty(g.shape, dtype=torch.float32, device=device) for g in grads]
    mod = load()
    work_m, work_v, work_d, back = [], [], [], []
    for i in range(n):
        (m, cm), (v, cv), (d, cd) = _out(exp_avgs[i]), _out(exp_avg_sqs[i]), _out(deltas[i])
        work_m.append(m)
        work_v.append(v)
        work_d.append(d)
        back += [(exp_avgs[i], m)] * cm + [(exp_avg_sqs[i], v)] * cv + [(deltas[i], d)] * cd
    with _on(device):
        stream = _stream(device)
        for dtype in _FLOATS:  # the kernel is specialised on the grad dtype: one launch per dtype present
            idx = [i for i in range(n) if grads[i].dtype == dtype]
            if idx:
                mod.subspace_adam([grads[i].contiguous() for i in idx], [work_m[i] for i in idx],
                                  [work_v[i] for i in idx], [work_d[i] for i in idx],
                                  step, lr, beta1, beta2, eps, stream)
        for dst, src in back:
            dst.copy_(src)
    return list(deltas)


def _protected_parts(weights, decay_bases, decay_side, lr, weight_decay) -> list[Tensor | None]:
    """Wp = W's component in span(Q) on decay_side, fp32, as gems.reference.remove_component forms it."""
    if lr == 0 or weight_decay == 0:
        return [None] * len(weights)
    parts = []
    for w, q in zip(weights, decay_bases):
        if q is None:
            parts.append(None)
            continue
        wf = w.float()
        if q.shape[1] == 0:  # the reference still takes the W - lr*wd*(W - 0) path (its own roundings)
            parts.append(torch.zeros(wf.shape, dtype=torch.float32, device=wf.device))
            continue
        qf = q.to(wf)
        parts.append(project_back(project(wf, qf, decay_side), qf, decay_side).contiguous())
    return parts


def weight_update_(
    weights: Sequence[Tensor],
    updates: Sequence[Tensor],
    *,
    lr: float,
    weight_decay: float,
    decay_bases: Sequence[Tensor | None] | None = None,
    decay_side: str = "right",
) -> None:
    """gems.reference.apply_update on every (weight, update) pair, in place, one launch per weight dtype.

    weights fp32/bf16/fp16 of any shape (2-D where a decay basis is given), updates of the same shapes
    (fp32, or 16-bit: converted to fp32, which is exact). ``decay_bases[k]`` (d'×q, or None) gives the
    protected directions of weight k: only W's null-space part decays."""
    c = contract.weight_update_args(weights, updates, lr=lr, weight_decay=weight_decay, decay_bases=decay_bases,
                                    decay_side=decay_side, device_rule=_require_cuda)
    weights, updates, qs = c.lists
    lr, weight_decay, decay_side = c.scalars
    device = c.device
    if c.K == 0:
        return
    mod = load()
    with _on(device):
        parts = _protected_parts(weights, qs, decay_side, lr, weight_decay)
        _launch_weight_update(mod, weights, [u.float().contiguous() for u in updates], parts, lr, weight_decay,
                              _stream(device))


def _launch_weight_update(mod, weights, updates, parts, lr, weight_decay, stream) -> None:
    outs = [_out(w) for w in weights]
    for dtype in _FLOATS:
        idx = [i for i, w in enumerate(weights) if w.dtype == dtype]
        if idx:
            mod.weight_update([outs[i][0] for i in idx], [updates[i] for i in idx], [parts[i] for i in idx],
                              lr, weight_decay, stream)
    for w, (o, copy) in zip(weights, outs):
        if copy:
            w.copy_(o)


# ------------------------------------------------------------------------------ contract functions
def project_adam(
    task_grads: Sequence[Sequence[Tensor]],
    shared_weights: Sequence[float],
    bases: Sequence[Sequence[Tensor]],
    exp_avgs: Sequence[Sequence[Tensor]],
    exp_avg_sqs: Sequence[Sequence[Tensor]],
    *,
    side: str,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[list[Tensor]]:
    """Projection of every task gradient + Adam in every subspace (docs/kernel_contract.md).

    R_k0 = Σ_t w_t·project(G_kt, B_k0), R_ks = project(G_k,s-1, B_ks), δ_ks = adam_delta(R_ks, …).
    Projections: one fp32 cuBLAS GEMM per (k, t) against [B_k0, B_kt] (16-bit gradients are read once
    and widened to fp32); Adam: one multi-tensor launch for all K·S subspaces."""
    c = contract.project_adam_args(task_grads, shared_weights, bases, exp_avgs, exp_avg_sqs, side=side, step=step,
                                   lr=lr, beta1=beta1, beta2=beta2, eps=eps, device_rule=_require_cuda)
    if c.K == 0:
        return []
    K, T, device, shape = c.K, c.T, c.device, (c.M, c.N)
    grads, bases, ms, vs = c.lists
    shared, step, lr, beta1, beta2, eps = c.scalars
    mod = load()

    with _on(device):
        coords: list[list[Tensor]] = []
        for k in range(K):
            r0 = bases[k][0].shape[1]
            row = [torch.zeros(coord_shape(shape, side, r0), dtype=torch.float32, device=device)]
            for t in range(T):
                bt = bases[k][t + 1]
                rt = bt.shape[1]
                if r0 + rt == 0:
                    row.append(torch.empty(coord_shape(shape, side, 0), dtype=torch.float32, device=device))
                    continue
                g = grads[k][t].float()  # no copy for fp32
                basis = torch.cat([bases[k][0], bt], dim=1) if r0 and rt else (bases[k][0] if r0 else bt)
                c = basis.T @ g if side == "left" else g @ basis  # one pass over G_kt for both subspaces
                sh, tk = (c[:r0], c[r0:]) if side == "left" else (c[:, :r0], c[:, r0:])
                if r0:
                    row[0].add_(sh, alpha=shared[t])
                row.append(tk.contiguous() if rt else
                           torch.empty(coord_shape(shape, side, 0), dtype=torch.float32, device=device))
            coords.append(row)
        deltas = [[torch.empty_like(c) for c in row] for row in coords]
        subspace_adam_([c for row in coords for c in row], [t for row in ms for t in row],
                       [t for row in vs for t in row], step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       deltas=[t for row in deltas for t in row])
    return deltas


def back_project_update(
    weights: Sequence[Tensor],
    bases: Sequence[Sequence[Tensor]],
    coeffs: Sequence[float],
    deltas: Sequence[Sequence[Tensor]],
    *,
    side: str,
    lr: float,
    weight_decay: float,
    decay_bases: Sequence[Tensor | None] | None = None,
    decay_side: str = "right",
) -> None:
    """W_k ← decay(W_k) + Σ_s coeff_s·project_back(δ_ks, B_ks, side), in place (docs/kernel_contract.md).

    One GEMM per weight over the concatenated gated bases [coeff_0 B_k0, …] and the stacked δ. bf16/fp16
    weights on sm_80+: all weights in one launch of the fused WMMA kernel (operands rounded to the weight
    dtype, fp32 accumulation, update epilogue in registers). fp32 weights: fp32 cuBLAS GEMMs, then one
    launch of the update epilogue. Rounding of the update and decay as gems.reference.apply_update."""
    c = contract.back_project_update_args(weights, bases, coeffs, deltas, side=side, lr=lr, weight_decay=weight_decay,
                                          decay_bases=decay_bases, decay_side=decay_side, device_rule=_require_cuda)
    if c.K == 0:
        return
    weights, bases, deltas, qs = c.lists
    coeffs, lr, weight_decay, decay_side = c.scalars
    K, S, device, dtype, shape = c.K, c.S, c.device, c.dtype, (c.M, c.N)
    m, n = shape
    mod = load()
    if m == 0 or n == 0:
        return

    with _on(device):
        stream = _stream(device)
        parts = _protected_parts(weights, qs, decay_side, lr, weight_decay)
        gated, stacked = [], []
        for k in range(K):
            keep = [s for s in range(S) if bases[k][s].shape[1] > 0]
            gated.append(torch.cat([bases[k][s] * coeffs[s] for s in keep], dim=1) if keep
                         else torch.zeros(side_dim(shape, side), 0, dtype=torch.float32, device=device))
            cat_dim = 0 if side == "left" else 1
            stacked.append(torch.cat([deltas[k][s] for s in keep], dim=cat_dim) if keep
                           else torch.zeros(coord_shape(shape, side, 0), dtype=torch.float32, device=device))
        if _use_wmma(device, dtype):
            outs = [_out(w) for w in weights]
            # one launch: the weights of a call share their shape and ranks (gems.contract), hence Σr
            if side == "left":  # W += A·D: A m×Σr, D Σr×n, both row-major
                lhs = [a.to(dtype) for a in gated]
                rhs = [dd.to(dtype) for dd in stacked]
            else:  # W += D·Aᵀ: D m×Σr row-major, Aᵀ read from A (n×Σr) as a column-major rhs
                lhs = [dd.to(dtype) for dd in stacked]
                rhs = [a.to(dtype) for a in gated]
            mod.back_project_update([o for o, _ in outs], lhs, rhs, parts, side == "right", lr, weight_decay, stream)
            for w, (o, copy) in zip(weights, outs):
                if copy:
                    w.copy_(o)
        else:
            updates = [(gated[k] @ stacked[k]) if side == "left" else (stacked[k] @ gated[k].T)
                       for k in range(K)]
            _launch_weight_update(mod, weights, [u.contiguous() for u in updates], parts, lr, weight_decay,
                                  stream)
