"""The GEMS math in plain PyTorch: the ground truth every kernel is tested against.

Conventions (used by every backend):
- A weight W is m×n. Its subspace side is ``"left"`` (basis B is m×r, coordinates r×n) or ``"right"``
  (basis B is n×r, coordinates m×r). Bases have orthonormal columns and are kept in fp32.
- ``project`` maps a full matrix to coordinates, ``project_back`` maps coordinates back.
- Every function works in whatever floating dtype it is given (float64 included), so tests can build an
  fp64 reference and compare a same-precision implementation against it.
- ``adam_delta`` mirrors torch's ``_single_tensor_adam`` (non-capturable branch) order of operations, so
  the fp32 reference agrees with ``torch.optim.AdamW`` to the last bits.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

SIDES = ("left", "right")
PROJ_TYPES = ("std", "reverse_std", "left", "right")


def side_for(shape: Sequence[int], proj_type: str) -> str:
    """Which side a weight of ``shape`` is projected on (GaLore's convention for ``std``)."""
    m, n = int(shape[0]), int(shape[1])
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in SIDES:
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def side_dim(shape: Sequence[int], side: str) -> int:
    """Length of the basis vectors of ``side`` (m for left, n for right)."""
    return int(shape[0]) if side == "left" else int(shape[1])


def coord_shape(shape: Sequence[int], side: str, rank: int) -> tuple[int, int]:
    m, n = int(shape[0]), int(shape[1])
    return (rank, n) if side == "left" else (m, rank)


def project(matrix: Tensor, basis: Tensor, side: str) -> Tensor:
    """Coordinates of ``matrix`` in ``basis``: Bᵀ·M (left) or M·B (right)."""
    return basis.T @ matrix if side == "left" else matrix @ basis


def project_back(coords: Tensor, basis: Tensor, side: str) -> Tensor:
    """Full matrix of ``coords``: B·δ (left) or δ·Bᵀ (right)."""
    return basis @ coords if side == "left" else coords @ basis.T


def remove_component(matrix: Tensor, basis: Tensor, side: str) -> Tensor:
    """``matrix`` minus its part inside span(basis) on ``side``: (I − B Bᵀ)·M or M·(I − B Bᵀ)."""
    if basis.shape[1] == 0:
        return matrix
    return matrix - project_back(project(matrix, basis, side), basis, side)


def top_singular_basis(matrix: Tensor, rank: int, side: str) -> Tensor:
    """Exact top-``rank`` singular vectors of ``matrix`` on ``side`` (full SVD in at least fp32).

    Uses the same call GaLore makes (``torch.linalg.svd(full_matrices=False)``), so the bases agree with
    galore-torch bit for bit."""
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    u, _, vh = torch.linalg.svd(work, full_matrices=False)
    return u[:, :rank].contiguous() if side == "left" else vh[:rank, :].T.contiguous()


def orthonormalize_against(vectors: Tensor, basis: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Orthonormal columns spanning the part of ``vectors`` orthogonal to ``basis``.

    Two rounds of Gram–Schmidt against ``basis`` then QR. A column that vanishes (the vectors were
    rank-deficient or lay inside ``basis``) is replaced by a seeded random direction orthogonal to
    everything kept, so the result always has full column rank and stays orthogonal to ``basis``."""
    k = vectors.shape[1]
    if k == 0:
        return vectors
    out = vectors
    for _ in range(2):
        if basis.shape[1]:
            out = out - basis @ (basis.T @ out)
    q, r = torch.linalg.qr(out)
    diag = r.diagonal().abs()
    scale = vectors.norm(dim=0).clamp_min(torch.finfo(vectors.dtype).tiny)
    bad = diag <= 1e-4 * scale
    for j in bad.nonzero().flatten().tolist():
        g = torch.randn(vectors.shape[0], generator=generator, dtype=torch.float64).to(vectors)
        # only columns already known orthonormal: the QR's other bad columns (e.g. the unit vectors it returns
        # for an all-zero input) need not be orthogonal to ``basis``, and projecting against a set that is not
        # orthonormal leaves g overlapping it
        keep = torch.cat([basis, q[:, ~bad]], dim=1)
        for _ in range(2):
            g = g - keep @ (keep.T @ g)
        q[:, j] = g / g.norm()
        bad[j] = False
    return q.contiguous()


def shared_gradient(task_grads: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_t w_t·G_t in fp32 (or fp64 if given fp64): the mixed-batch gradient when w_t = N_t / N."""
    acc_dtype = torch.float64 if task_grads[0].dtype == torch.float64 else torch.float32
    out = torch.zeros(task_grads[0].shape, dtype=acc_dtype, device=task_grads[0].device)
    for g, w in zip(task_grads, weights):
        out.add_(g.to(acc_dtype), alpha=float(w))
    return out


def heuristic_gates(losses: Sequence[float], grad_norms: Sequence[float], samples: Sequence[float]) -> list[float]:
    """The authors' gate: 0.4·loss share + 0.4·gradient-norm share + 0.2·sample share, summing to 1.

    Every gate is ≥ 0: a term whose values are not all non-negative and finite, or sum to 0, is uniform."""

    def share(values: Sequence[float]) -> list[float]:
        # a share is only defined for non-negative values: a negative loss (a log-likelihood with an offset, a
        # reward) would give a negative gate, turning that task's update into ascent; such a term is uniform
        total = float(sum(values))
        if not math.isfinite(total) or total <= 0 or any(float(v) < 0 for v in values):
            return [1.0 / len(values)] * len(values)
        return [float(v) / total for v in values]

    ls, gs, ss = share(losses), share(grad_norms), share(samples)
    raw = [0.4 * a + 0.4 * b + 0.2 * c for a, b, c in zip(ls, gs, ss)]
    total = sum(raw)
    return [r / total for r in raw]


def adam_delta(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> Tensor:
    """One Adam step on coordinates that start at zero; updates the moments in place, returns δ.

    Same operations, same order as torch's ``_single_tensor_adam`` for a zero parameter (decoupled
    weight decay of a zero parameter is zero, which is why gems owns weight decay)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    delta = torch.zeros_like(exp_avg)
    delta.addcdiv_(exp_avg, denom, value=-step_size)
    return delta


def apply_update(
    weight: Tensor,
    update: Tensor,
    *,
    lr: float,
    weight_decay: float,
    decay_basis: Tensor | None = None,
    decay_side: str = "right",
) -> Tensor:
    """W ← W − lr·wd·D(W) + Δ, in place, with decoupled decay first (torch AdamW's order).

    D(W) = W, or with ``decay_basis`` Q (protected directions) only W's null-space part,
    W − Q Qᵀ W (``decay_side="left"``, output side) or W − W Q Qᵀ (``"right"``, input side)."""
    if weight_decay != 0 and lr != 0:
        if decay_basis is None:
            weight.mul_(1 - lr * weight_decay)
        else:
            w = weight.float()
            decay = remove_component(w, decay_basis.to(w), decay_side)
            weight.copy_((w - lr * weight_decay * decay).to(weight.dtype))
    weight.add_(update.to(weight.dtype))
    return weight


def gems_adam_step(
    weight: Tensor,
    task_grads: Sequence[Tensor],
    shared_weights: Sequence[float],
    basis_shared: Tensor,
    task_bases: Sequence[Tensor],
    gates: Sequence[float],
    moments: Sequence[tuple[Tensor, Tensor]],
    step: int,
    *,
    side: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    decay_basis: Tensor | None = None,
    decay_side: str = "right",
) -> Tensor:
    """One whole GEMS step of one weight with an Adam inner optimizer, between refreshes.

    ``moments`` holds (exp_avg, exp_avg_sq) for the shared subspace first, then one per task; they are
    updated in place. Returns the applied update Δ (before decay). This is what the fused kernels compute:
    projection of each task gradient onto [B_sh, B_t], Adam in every subspace, one back-projection over the
    concatenated gated bases, decay and the write of W."""
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    g_sh = shared_gradient(task_grads, shared_weights).to(work)
    deltas = [adam_delta(project(g_sh, basis_shared.to(work), side), *moments[0], step,
                         lr=lr, beta1=beta1, beta2=beta2, eps=eps)]
    for t, (g, b) in enumerate(zip(task_grads, task_bases)):
        deltas.append(adam_delta(project(g.to(work), b.to(work), side), *moments[t + 1], step,
                                 lr=lr, beta1=beta1, beta2=beta2, eps=eps))
    update = scale * project_back(deltas[0], basis_shared.to(work), side)
    for gate, b, d in zip(gates, task_bases, deltas[1:]):
        update = update + (scale * gate) * project_back(d, b.to(work), side)
    apply_update(weight, update, lr=lr, weight_decay=weight_decay, decay_basis=decay_basis, decay_side=decay_side)
    return update
