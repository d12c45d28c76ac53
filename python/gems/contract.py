"""The argument checker of each kernel contract (docs/kernel_contract.md), shared by every backend.

One function per contract: :func:`project_adam_args`, :func:`back_project_update_args`,
:func:`subspace_adam_args` and :func:`weight_update_args`. The CUDA wrapper (gems.cuda_backend) and the
Triton launchers (gems_kernels) call them before touching any device, so a contract is validated by this
code alone; what stays in a backend is the one thing that differs, which devices it can run on (the
``device_rule`` argument, applied to the one device all operands share, after every other check).

Errors: ``ValueError`` naming the offending argument (``bases[k][s]``, ``task_grads[k][t]``, …). A
wrong type or dtype raises :class:`OperandTypeError`, which is both a ``TypeError`` and a ``ValueError``.
Shapes follow gems.reference (:func:`~gems.reference.side_dim`, :func:`~gems.reference.coord_shape`).

Persistent operands (bases and moments of ``project_adam``; weights and bases of ``back_project_update``)
are checked once while the very same tensors come back, when the caller passes a ``memo``
(gems_kernels._utils.CHECKED): on a hit the checker returns what it found then, plus what the launcher
stored with it (:attr:`Checked.known`, its pointer tables); :meth:`Checked.remember` stores it. Gradients,
δ, decay bases and scalars are checked at every call.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gems.reference import SIDES, coord_shape, side_dim

__all__ = [
    "OperandTypeError",
    "Checked",
    "project_adam_args",
    "back_project_update_args",
    "subspace_adam_args",
    "weight_update_args",
]

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
FP32 = (torch.float32,)
DeviceRule = Callable[[torch.device, str], None]


class OperandTypeError(TypeError, ValueError):
    """An operand of the wrong type or dtype (a TypeError, and a ValueError as the contract promises)."""


class Checked:
    """The operands of one call as the checker accepted them: lists (rows copied, so a backend may swap in
    contiguous copies), shapes, scalars. ``known`` is what the launcher stored with :meth:`remember` for
    these very persistent operands (None when they were checked at this call)."""

    __slots__ = ("K", "S", "T", "M", "N", "dtype", "device", "side", "ranks", "coord", "lists", "scalars", "known",
                 "_memo", "_key", "_persistent")

    def remember(self, value) -> None:
        """Store ``value`` (the launcher's pointer tables) for these persistent operands in the memo."""
        if self._memo is not None and self.known is None:
            self._memo.put(self._key, self._persistent, (self.ranks, self.coord, value))

    def _recall(self, memo, key, persistent) -> bool:
        """Look the persistent operands up in ``memo``: True (ranks, coordinate shapes, ``known`` set) on a hit."""
        self._memo, self._key, self._persistent = memo, key, persistent
        hit = memo.get(key, persistent) if memo is not None else None
        if hit is None:
            return False
        self.ranks, self.coord, self.known = hit
        return True


def _new(K: int, S: int, T: int) -> Checked:
    c = Checked()
    c.K, c.S, c.T = K, S, T
    c.M = c.N = c.dtype = c.device = c.side = None
    c.ranks, c.coord, c.lists, c.scalars, c.known = [], [], (), (), None
    c._memo = c._key = c._persistent = None
    return c


# ----------------------------------------------------------------------------------------------- pieces
def _names(dtypes: Sequence[torch.dtype]) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _got(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def _seq(x, what: str, n: int | None = None, of: str = "") -> list:
    """``x`` as a new list, checked to be a list (not a tensor or string) of ``n`` items when n is given."""
    if type(x) is not list and type(x) is not tuple and (isinstance(x, (Tensor, str)) or not isinstance(x, Sequence)):
        raise OperandTypeError(f"{what} must be a list{of and ' of ' + of}, got {type(x).__name__}")
    if n is not None and len(x) != n:
        raise ValueError(f"{what} must be a list of {n}{of and ' ' + of}, got length {len(x)}")
    return list(x)


def _nested(x, what: str, K: int, inner: int, of: str) -> list[list]:
    """list[K] (one per weight) of list[inner] (``of``, e.g. "tensors (one per subspace)"), rows copied."""
    rows = _seq(x, what, K, "lists (one per weight)")
    # the common case (plain lists of the right length) without a call per row: these run at every step
    return [row[:] if type(row) is list and len(row) == inner else _seq(row, f"{what}[{k}]", inner, of)
            for k, row in enumerate(rows)]


def _number(x, what: str, lo: float | None = None, hi: float | None = None, why: str = "") -> float:
    """A finite real number (a one-element tensor counts), lo <= x (< hi when hi is given)."""
    if type(x) is float:
        v = x
    elif isinstance(x, numbers.Real) and not isinstance(x, bool) or isinstance(x, Tensor) and x.numel() == 1:
        v = float(x)
    else:
        raise OperandTypeError(f"{what} must be a real number, got {x!r}")
    if v - v != 0.0:  # nan or ±inf
        raise ValueError(f"{what} must be finite, got {v}")
    if lo is not None and v < lo or hi is not None and v >= hi:
        bound = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{what} must be {bound}{why}, got {v}")
    return v


def _step(step) -> int:
    s = step.item() if isinstance(step, Tensor) and step.numel() == 1 else step
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or int(s) != s:
        raise OperandTypeError(f"step must be an integer >= 1 (Adam's bias correction), got {step!r}")
    if s < 1:
        raise ValueError(f"step must be an integer >= 1 (Adam's bias correction), got {int(s)}")
    return int(s)


def _side(side, what: str = "side") -> str:
    if side not in SIDES:
        raise ValueError(f"{what} must be one of {SIDES}, got {side!r}")
    return side


def _adam(step, lr, beta1, beta2, eps) -> tuple[int, float, float, float, float]:
    return (_step(step), _number(lr, "lr", lo=0.0), _number(beta1, "beta1", 0.0, 1.0, " (Adam's betas)"),
            _number(beta2, "beta2", 0.0, 1.0, " (Adam's betas)"), _number(eps, "eps", lo=0.0))


def _reject(t, what: str, dtypes, shape=None, device=None, why: str = "") -> None:
    """Raise the error that says why ``t`` is not a ``shape`` tensor of ``dtypes`` on ``device``."""
    if not isinstance(t, Tensor):
        raise OperandTypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise OperandTypeError(f"{what} must be {_names(dtypes)}{why}, got {_got(t)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what} must be {'×'.join(map(str, shape))}{why}, got {_got(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{what} must be on {device}, the device of every operand of the call, got {_got(t)}")


def _matrix(t, what: str, dtypes) -> tuple[int, int, torch.dtype, torch.device]:
    """Shape, dtype and device of the first matrix of a batch (the others are compared to it)."""
    _reject(t, what, dtypes)
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D (m×n), got shape {tuple(t.shape)}")
    return int(t.shape[0]), int(t.shape[1]), t.dtype, t.device


def _bases(c: Checked, bases: list[list]) -> None:
    """Every bases[k][s] is a d×r_s fp32 tensor on the call's device, r_s read from the first weight's;
    sets the ranks and coordinate shapes."""
    shape, side, d = (c.M, c.N), c.side, side_dim((c.M, c.N), c.side)
    for s, b in enumerate(bases[0]):
        _reject(b, f"bases[0][{s}]", FP32, why=" (bases are fp32)")
        if b.dim() != 2 or b.shape[0] != d:
            raise ValueError(f"bases[0][{s}] must be {d}×r (side {side!r} of a {c.M}×{c.N} weight), got {_got(b)}")
    c.ranks = [int(b.shape[1]) for b in bases[0]]
    c.coord = [coord_shape(shape, side, r) for r in c.ranks]
    for k, row in enumerate(bases):
        for s, b in enumerate(row):
            if not (isinstance(b, Tensor) and b.shape == (d, c.ranks[s]) and b.dtype == torch.float32
                    and b.device == c.device):
                _reject(b, f"bases[{k}][{s}]", FP32, (d, c.ranks[s]), c.device,
                        " (bases are fp32 and all weights of a call share their ranks)")


def _coords(c: Checked, rows: list[list], what: str) -> None:
    """Every rows[k][s] is an fp32 tensor of subspace s's coordinate shape on the call's device."""
    for k, row in enumerate(rows):
        for s, x in enumerate(row):
            if not (isinstance(x, Tensor) and x.shape == c.coord[s] and x.dtype == torch.float32
                    and x.device == c.device):
                _reject(x, f"{what}[{k}][{s}]", FP32, c.coord[s], c.device,
                        f" (the coordinates of subspace {s}, rank {c.ranks[s]}, side {c.side!r})")


def _decay_bases(decay_bases, weights: Sequence[Tensor], decay_side: str, device) -> list[Tensor | None]:
    """list[K] of (d'×q floating tensor | None), d' the length of weight k's ``decay_side`` vectors."""
    if decay_bases is None:
        return [None] * len(weights)
    qs = _seq(decay_bases, "decay_bases", len(weights), "tensors or None (one per weight)")
    for k, q in enumerate(qs):
        if q is None:
            continue
        if not isinstance(q, Tensor) or not q.is_floating_point():
            raise OperandTypeError(f"decay_bases[{k}] must be a floating tensor, got {_got(q)}")
        w = weights[k]
        if w.dim() != 2:
            raise ValueError(f"weights[{k}] must be 2-D to take a decay basis, got shape {tuple(w.shape)}")
        d = side_dim(w.shape, decay_side)
        if q.dim() != 2 or q.shape[0] != d:
            raise ValueError(f"decay_bases[{k}] must be {d}×q (decay_side {decay_side!r} of a "
                             f"{w.shape[0]}×{w.shape[1]} weight), got {_got(q)}")
        if q.device != device:
            _reject(q, f"decay_bases[{k}]", (q.dtype,), device=device)
    return qs


def _one_device(groups: Sequence[tuple[str, Sequence[Tensor]]], what: str) -> torch.device | None:
    """The device of the first tensor; every other tensor must be on it (None for no tensors)."""
    device = None
    for name, tensors in groups:
        for i, t in enumerate(tensors):
            if device is None:
                device, first = t.device, f"{name}[{i}]"
            elif t.device != device:
                raise ValueError(f"{what}: all operands must be on one device, got {first} on {device} and "
                                 f"{name}[{i}] on {t.device}")
    return device


# -------------------------------------------------------------------------------------------- contracts
def project_adam_args(task_grads, shared_weights, bases, exp_avgs, exp_avg_sqs, *, side, step, lr, beta1, beta2,
                      eps, device_rule: DeviceRule, memo=None) -> Checked:
    """Check a ``project_adam`` call. Returns :class:`Checked` with ``lists`` = (grads, bases, exp_avgs,
    exp_avg_sqs) (list[K] of list), ``scalars`` = (shared weights, step, lr, beta1, beta2, eps)."""
    side = _side(side)
    K = len(_seq(task_grads, "task_grads", of="lists (one per weight)"))
    T = len(_seq(task_grads[0], "task_grads[0]", of="tensors (one per task)")) if K else None
    shared = _seq(shared_weights, "shared_weights", T, "floats (one per task)")
    T = len(shared)
    if K and T == 0:
        raise ValueError("project_adam needs at least one task: task_grads[k] and shared_weights are empty")
    shared = [_number(w, f"shared_weights[{t}]") for t, w in enumerate(shared)]
    scalars = (shared, *_adam(step, lr, beta1, beta2, eps))
    c = _new(K, T + 1, T)
    c.side, c.scalars = side, scalars
    if K == 0:
        return c
    grads = _nested(task_grads, "task_grads", K, T, "tensors (one per task)")
    bases = _nested(bases, "bases", K, c.S, "tensors (one per subspace: shared, then each task)")
    ms = _nested(exp_avgs, "exp_avgs", K, c.S, "tensors (one per subspace)")
    vs = _nested(exp_avg_sqs, "exp_avg_sqs", K, c.S, "tensors (one per subspace)")
    c.lists = (grads, bases, ms, vs)
    c.M, c.N, c.dtype, c.device = _matrix(grads[0][0], "task_grads[0][0]", FLOATS)
    for k, row in enumerate(grads):
        for t, g in enumerate(row):
            if not (isinstance(g, Tensor) and g.shape == (c.M, c.N) and g.dtype == c.dtype and g.device == c.device):
                _reject(g, f"task_grads[{k}][{t}]", (c.dtype,), (c.M, c.N), c.device,
                        " like task_grads[0][0] (all gradients of a call share one shape and dtype)")
    persistent = [x for rows in (bases, ms, vs) for row in rows for x in row] if memo is not None else None
    key = ("project_adam", side, c.M, c.N, c.device, K, c.S, id(persistent[0])) if memo is not None else None
    if not c._recall(memo, key, persistent):
        _bases(c, bases)
        _coords(c, ms, "exp_avgs")
        _coords(c, vs, "exp_avg_sqs")
    device_rule(c.device, "project_adam")
    return c


def back_project_update_args(weights, bases, coeffs, deltas, *, side, lr, weight_decay, decay_bases=None,
                             decay_side="right", device_rule: DeviceRule, memo=None) -> Checked:
    """Check a ``back_project_update`` call. Returns :class:`Checked` with ``lists`` = (weights, bases,
    deltas, decay bases), ``scalars`` = (coeffs, lr, weight_decay, decay_side)."""
    side = _side(side)
    decay_side = _side(decay_side, "decay_side")
    weights = _seq(weights, "weights", of="tensors (one per weight)")
    K = len(weights)
    S = len(_seq(bases, "bases", K, "lists (one per weight)")[0]) if K else None
    cs = _seq(coeffs, "coeffs", S, "floats (one per subspace)")
    S = len(cs)
    if K and S == 0:
        raise ValueError("bases[k] must hold at least one basis (the shared subspace)")
    cs = [_number(x, f"coeffs[{s}]") for s, x in enumerate(cs)]
    c = _new(K, S, S - 1)
    c.side, c.scalars = side, (cs, _number(lr, "lr"), _number(weight_decay, "weight_decay"), decay_side)
    if K == 0:
        return c
    bases = _nested(bases, "bases", K, S, "tensors (one per subspace)")
    deltas = _nested(deltas, "deltas", K, S, "tensors (one per subspace)")
    c.M, c.N, c.dtype, c.device = _matrix(weights[0], "weights[0]", FLOATS)
    persistent = weights + [b for row in bases for b in row] if memo is not None else None
    key = ("back_project_update", side, c.M, c.N, c.dtype, c.device, K, S, id(weights[0])) if memo is not None else None
    if not c._recall(memo, key, persistent):
        for k, w in enumerate(weights):
            if not (isinstance(w, Tensor) and w.shape == (c.M, c.N) and w.dtype == c.dtype and w.device == c.device):
                _reject(w, f"weights[{k}]", (c.dtype,), (c.M, c.N), c.device,
                        " like weights[0] (all weights of a call share one shape and dtype)")
        _bases(c, bases)
    _coords(c, deltas, "deltas")
    qs = _decay_bases(decay_bases, weights, decay_side, c.device)
    c.lists = (weights, bases, deltas, qs)
    device_rule(c.device, "back_project_update")
    return c


def subspace_adam_args(grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, deltas=None,
                       device_rule: DeviceRule) -> Checked:
    """Check a ``subspace_adam_`` call (gems.reference.adam_delta on many tensors): grads fp32/bf16/fp16 of any
    shapes, moments (and ``deltas`` when given) fp32 of the same shapes. ``lists`` = (grads, exp_avgs,
    exp_avg_sqs, deltas or None), ``scalars`` = (step, lr, beta1, beta2, eps)."""
    grads = _seq(grads, "grads", of="tensors")
    n = len(grads)
    lists = [grads, _seq(exp_avgs, "exp_avgs", n, "tensors (one per grad)"),
             _seq(exp_avg_sqs, "exp_avg_sqs", n, "tensors (one per grad)"),
             None if deltas is None else _seq(deltas, "deltas", n, "tensors (one per grad)")]
    names = ("grads", "exp_avgs", "exp_avg_sqs", "deltas")
    for i, g in enumerate(grads):
        _reject(g, f"grads[{i}]", FLOATS)
        for name, lst in zip(names[1:], lists[1:]):
            if lst is not None:
                _reject(lst[i], f"{name}[{i}]", FP32, g.shape, why=f" (the shape of grads[{i}])")
    c = _new(n, 0, 0)
    c.lists, c.scalars = tuple(lists), _adam(step, lr, beta1, beta2, eps)
    c.device = _one_device([(name, lst) for name, lst in zip(names, lists) if lst is not None], "subspace_adam_")
    if c.device is not None:
        device_rule(c.device, "subspace_adam_")
    return c


def weight_update_args(weights, updates, *, lr, weight_decay, decay_bases=None, decay_side="right",
                       device_rule: DeviceRule) -> Checked:
    """Check a ``weight_update_`` call (gems.reference.apply_update on many tensors): weights fp32/bf16/fp16 of
    any shapes (2-D where a decay basis is given), updates of the same shapes. ``lists`` = (weights,
    updates, decay bases), ``scalars`` = (lr, weight_decay, decay_side)."""
    weights = _seq(weights, "weights", of="tensors")
    updates = _seq(updates, "updates", len(weights), "tensors (one per weight)")
    for i, (w, u) in enumerate(zip(weights, updates)):
        _reject(w, f"weights[{i}]", FLOATS)
        _reject(u, f"updates[{i}]", FLOATS, w.shape, why=f" (the shape of weights[{i}])")
    decay_side = _side(decay_side, "decay_side")
    c = _new(len(weights), 0, 0)
    c.scalars = (_number(lr, "lr"), _number(weight_decay, "weight_decay"), decay_side)
    device = _one_device([("weights", weights), ("updates", updates)], "weight_update_")
    qs = _decay_bases(decay_bases, weights, decay_side, device)
    c.lists, c.device = (weights, updates, qs), device
    if device is not None:
        device_rule(device, "weight_update_")
    return c
