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

Arguments are validated here, before anything touches CUDA: a bad call raises ``TypeError`` (wrong type
or dtype) or ``ValueError`` (shape, device, value), never crashes in a kernel. Non-contiguous inputs are
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
from gems.reference import SIDES, project, project_back

__all__ = [
    "available",
    "load",
    "project_adam",
    "back_project_update",
    "subspace_adam_",
    "weight_update_",
]

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
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
def _tensor(t, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _dtype(t: Tensor, what: str, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{what} must be {names}, got {str(t.dtype).replace('torch.', '')}")


def _shape(t: Tensor, shape: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(int(s) for s in shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _seq(x, what: str, length: int | None = None) -> list:
    if isinstance(x, (Tensor, str)) or not isinstance(x, Sequence):
        raise TypeError(f"{what} must be a list, got {type(x).__name__}")
    if length is not None and len(x) != length:
        raise ValueError(f"{what} must have length {length}, got {len(x)}")
    return list(x)


def _float(x, what: str, *, lo: float | None = None, hi: float | None = None, hi_open: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) and not (isinstance(x, Tensor) and x.numel() == 1):
        raise TypeError(f"{what} must be a number, got {type(x).__name__}")
    v = float(x)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{what} must be finite, got {v}")
    if lo is not None and v < lo:
        raise ValueError(f"{what} must be >= {lo}, got {v}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"{what} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def _step(step) -> int:
    if isinstance(step, Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)) or int(step) != step:
        raise TypeError(f"step must be an integer, got {step!r}")
    if int(step) < 1:
        raise ValueError(f"step must be >= 1, got {int(step)}")
    return int(step)


def _side(side, what: str = "side") -> str:
    if side not in SIDES:
        raise ValueError(f"{what} must be one of {SIDES}, got {side!r}")
    return side


def _device(tensors: Sequence[Tensor], what: str) -> torch.device | None:
    """The one CUDA device all tensors are on (None for no tensors); ValueError otherwise."""
    device = None
    for t in tensors:
        if t.device.type != "cuda":
            raise ValueError(f"{what}: the CUDA backend needs CUDA tensors, got a tensor on {t.device}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{what}: all tensors must be on one device, got {device} and {t.device}")
    return device


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
    grads = _seq(grads, "grads")
    n = len(grads)
    exp_avgs = _seq(exp_avgs, "exp_avgs", n)
    exp_avg_sqs = _seq(exp_avg_sqs, "exp_avg_sqs", n)
    deltas = None if deltas is None else _seq(deltas, "deltas", n)
    for i in range(n):
        g = _tensor(grads[i], f"grads[{i}]")
        _dtype(g, f"grads[{i}]", _FLOATS)
        for name, lst in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)) + ((("deltas", deltas),) if deltas else ()):
            t = _tensor(lst[i], f"{name}[{i}]")
            _dtype(t, f"{name}[{i}]", (torch.float32,))
            _shape(t, g.shape, f"{name}[{i}]")
    step = _step(step)
    lr = _float(lr, "lr", lo=0.0)
    beta1 = _float(beta1, "beta1", lo=0.0, hi=1.0, hi_open=True)
    beta2 = _float(beta2, "beta2", lo=0.0, hi=1.0, hi_open=True)
    eps = _float(eps, "eps", lo=0.0)
    device = _device(grads + exp_avgs + exp_avg_sqs + (deltas or []), "subspace_adam_")
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


def _check_decay_bases(decay_bases, weights: Sequence[Tensor], decay_side: str) -> list[Tensor | None]:
    if decay_bases is None:
        return [None] * len(weights)
    decay_bases = _seq(decay_bases, "decay_bases", len(weights))
    out = []
    for k, q in enumerate(decay_bases):
        if q is None:
            out.append(None)
            continue
        q = _tensor(q, f"decay_bases[{k}]")
        if not q.is_floating_point():
            raise TypeError(f"decay_bases[{k}] must be a floating tensor, got {q.dtype}")
        w = weights[k]
        if w.dim() != 2:
            raise ValueError(f"weights[{k}] must be 2-D to take a decay basis, got shape {tuple(w.shape)}")
        d = w.shape[0] if decay_side == "left" else w.shape[1]
        if q.dim() != 2 or q.shape[0] != d:
            raise ValueError(f"decay_bases[{k}] must be {d}×q for decay_side={decay_side!r}, got {tuple(q.shape)}")
        out.append(q)
    return out


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
    weights = _seq(weights, "weights")
    n = len(weights)
    updates = _seq(updates, "updates", n)
    for i in range(n):
        w = _tensor(weights[i], f"weights[{i}]")
        _dtype(w, f"weights[{i}]", _FLOATS)
        u = _tensor(updates[i], f"updates[{i}]")
        _dtype(u, f"updates[{i}]", _FLOATS)
        _shape(u, w.shape, f"updates[{i}]")
    decay_side = _side(decay_side, "decay_side")
    lr = _float(lr, "lr")
    weight_decay = _float(weight_decay, "weight_decay")
    qs = _check_decay_bases(decay_bases, weights, decay_side)
    device = _device(weights + updates + [q for q in qs if q is not None], "weight_update_")
    if n == 0:
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
def _same_matrices(tensors: Sequence[Tensor], names: Sequence[str], what: str):
    """Check every tensor is a 2-D float matrix and all share one shape and dtype; return (shape, dtype)."""
    shape = dtype = None
    for t, name in zip(tensors, names):
        _dtype(t, name, _FLOATS)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if shape is None:
            shape, dtype = tuple(t.shape), t.dtype
        elif tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"all {what} must share one shape and dtype, got {shape}/{dtype} and "
                             f"{tuple(t.shape)}/{t.dtype}")
    return shape, dtype


def _check_bases(bases, K: int, S: int, d: int) -> list[list[Tensor]]:
    bases = _seq(bases, "bases", K)
    out = []
    for k in range(K):
        row = _seq(bases[k], f"bases[{k}]", S)
        for s, b in enumerate(row):
            b = _tensor(b, f"bases[{k}][{s}]")
            _dtype(b, f"bases[{k}][{s}]", (torch.float32,))
            if b.dim() != 2 or b.shape[0] != d:
                raise ValueError(f"bases[{k}][{s}] must be {d}×r, got shape {tuple(b.shape)}")
        out.append(row)
    return out


def _coord_shape(m: int, n: int, side: str, r: int) -> tuple[int, int]:
    return (r, n) if side == "left" else (m, r)


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
    side = _side(side)
    task_grads = _seq(task_grads, "task_grads")
    K = len(task_grads)
    shared = [_float(w, f"shared_weights[{t}]") for t, w in enumerate(_seq(shared_weights, "shared_weights"))]
    T = len(shared)
    S = T + 1
    grads = [_seq(task_grads[k], f"task_grads[{k}]", T) for k in range(K)]
    flat = [_tensor(g, f"task_grads[{k}][{t}]") for k in range(K) for t, g in enumerate(grads[k])]
    shape, dtype = _same_matrices(flat, [f"task_grads[{i // max(T, 1)}][{i % max(T, 1)}]" for i in range(len(flat))],
                                  "task gradients")
    exp_avgs = _seq(exp_avgs, "exp_avgs", K)
    exp_avg_sqs = _seq(exp_avg_sqs, "exp_avg_sqs", K)
    if K and T == 0:
        raise ValueError("project_adam needs at least one task (shared_weights is empty)")
    step = _step(step)
    lr = _float(lr, "lr", lo=0.0)
    beta1 = _float(beta1, "beta1", lo=0.0, hi=1.0, hi_open=True)
    beta2 = _float(beta2, "beta2", lo=0.0, hi=1.0, hi_open=True)
    eps = _float(eps, "eps", lo=0.0)
    if K == 0:
        return []
    m, n = shape
    d = m if side == "left" else n
    bases = _check_bases(bases, K, S, d)
    ms, vs = [], []
    for k in range(K):
        row_m = _seq(exp_avgs[k], f"exp_avgs[{k}]", S)
        row_v = _seq(exp_avg_sqs[k], f"exp_avg_sqs[{k}]", S)
        for s in range(S):
            cs = _coord_shape(m, n, side, bases[k][s].shape[1])
            for name, t in ((f"exp_avgs[{k}][{s}]", row_m[s]), (f"exp_avg_sqs[{k}][{s}]", row_v[s])):
                _tensor(t, name)
                _dtype(t, name, (torch.float32,))
                _shape(t, cs, name)
        ms.append(row_m)
        vs.append(row_v)
    device = _device(flat + [b for row in bases for b in row] + [t for row in ms + vs for t in row], "project_adam")
    mod = load()

    with _on(device):
        coords: list[list[Tensor]] = []
        for k in range(K):
            r0 = bases[k][0].shape[1]
            row = [torch.zeros(_coord_shape(m, n, side, r0), dtype=torch.float32, device=device)]
            for t in range(T):
                bt = bases[k][t + 1]
                rt = bt.shape[1]
                if r0 + rt == 0:
                    row.append(torch.empty(_coord_shape(m, n, side, 0), dtype=torch.float32, device=device))
                    continue
                g = grads[k][t].float()  # no copy for fp32
                basis = torch.cat([bases[k][0], bt], dim=1) if r0 and rt else (bases[k][0] if r0 else bt)
                c = basis.T @ g if side == "left" else g @ basis  # one pass over G_kt for both subspaces
                sh, tk = (c[:r0], c[r0:]) if side == "left" else (c[:, :r0], c[:, r0:])
                if r0:
                    row[0].add_(sh, alpha=shared[t])
                row.append(tk.contiguous() if rt else
                           torch.empty(_coord_shape(m, n, side, 0), dtype=torch.float32, device=device))
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
    side = _side(side)
    decay_side = _side(decay_side, "decay_side")
    weights = [_tensor(w, f"weights[{k}]") for k, w in enumerate(_seq(weights, "weights"))]
    K = len(weights)
    coeffs = [_float(c, f"coeffs[{s}]") for s, c in enumerate(_seq(coeffs, "coeffs"))]
    S = len(coeffs)
    shape, dtype = _same_matrices(weights, [f"weights[{k}]" for k in range(len(weights))], "weights")
    lr = _float(lr, "lr")
    weight_decay = _float(weight_decay, "weight_decay")
    deltas = _seq(deltas, "deltas", K)
    if K == 0:
        return
    m, n = shape
    bases = _check_bases(bases, K, S, m if side == "left" else n)
    for k in range(K):
        row = _seq(deltas[k], f"deltas[{k}]", S)
        for s in range(S):
            name = f"deltas[{k}][{s}]"
            _tensor(row[s], name)
            _dtype(row[s], name, (torch.float32,))
            _shape(row[s], _coord_shape(m, n, side, bases[k][s].shape[1]), name)
        deltas[k] = row
    qs = _check_decay_bases(decay_bases, weights, decay_side)
    device = _device(weights + [b for row in bases for b in row] + [t for row in deltas for t in row]
                     + [q for q in qs if q is not None], "back_project_update")
    mod = load()
    if m == 0 or n == 0:
        return

    with _on(device):
        stream = _stream(device)
        parts = _protected_parts(weights, qs, decay_side, lr, weight_decay)
        gated, stacked = [], []
        for k in range(K):
            keep = [s for s in range(S) if bases[k][s].shape[1] > 0]
            d = m if side == "left" else n
            gated.append(torch.cat([bases[k][s] * coeffs[s] for s in keep], dim=1) if keep
                         else torch.zeros(d, 0, dtype=torch.float32, device=device))
            cat_dim = 0 if side == "left" else 1
            stacked.append(torch.cat([deltas[k][s] for s in keep], dim=cat_dim) if keep
                           else torch.zeros(_coord_shape(m, n, side, 0), dtype=torch.float32, device=device))
        if _use_wmma(device, dtype):
            outs = [_out(w) for w in weights]
            # one launch per distinct Σr (weights share a shape; ranks normally too)
            for width in sorted({g.shape[1] for g in gated}):
                idx = [k for k in range(K) if gated[k].shape[1] == width]
                if side == "left":  # W += A·D: A m×Σr, D Σr×n, both row-major
                    lhs = [gated[k].to(dtype) for k in idx]
                    rhs = [stacked[k].to(dtype) for k in idx]
                else:  # W += D·Aᵀ: D m×Σr row-major, Aᵀ read from A (n×Σr) as a column-major rhs
                    lhs = [stacked[k].to(dtype) for k in idx]
                    rhs = [gated[k].to(dtype) for k in idx]
                mod.back_project_update([outs[k][0] for k in idx], lhs, rhs, [parts[k] for k in idx],
                                        side == "right", lr, weight_decay, stream)
            for w, (o, copy) in zip(weights, outs):
                if copy:
                    w.copy_(o)
        else:
            updates = [(gated[k] @ stacked[k]) if side == "left" else (stacked[k] @ gated[k].T)
                       for k in range(K)]
            _launch_weight_update(mod, weights, [u.contiguous() for u in updates], parts, lr, weight_decay,
                                  stream)
