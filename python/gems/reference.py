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
from dataclasses import dataclass

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
            w = weight if weight.dtype == torch.float64 else weight.float()
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


# --------------------------------------------------------------------------------------------------
# The whole multi-task step of one weight, written for reading: the ground truth of every execution path
# (torch backend, projected stash, Triton, CUDA, DDP, gradient accumulation) in tests/test_reference_step.py.
# --------------------------------------------------------------------------------------------------


def gates(gating, losses: Sequence[float], grad_norms: Sequence[float], samples: Sequence[float]) -> list[float]:
    """Gate g_t of each task subspace: ``"heuristic"`` (:func:`heuristic_gates`), ``"uniform"`` (1/T), or a
    sequence of fixed weights in task order. One task: its gate is 1 (or its fixed weight)."""
    n = len(samples)
    if not isinstance(gating, str):
        return [float(g) for g in gating]
    if n == 1:
        return [1.0]
    if gating == "uniform":
        return [1.0 / n] * n
    if gating == "heuristic":
        return heuristic_gates(losses, grad_norms, samples)
    raise ValueError(f"unknown gating {gating!r}")


def canonical_column_signs(basis: Tensor) -> Tensor:
    """``basis`` with each column negated where needed so that its entry of largest magnitude is positive."""
    out = basis.clone()
    for j in range(out.shape[1]):
        top = int(out[:, j].abs().argmax())
        if out[top, j] < 0:
            out[:, j] = -out[:, j]
    return out


@dataclass(frozen=True)
class StepConfig:
    """Hyper-parameters of :func:`gems_step` for one weight (the GemsOptimizer option of the same name, and
    the inner AdamW's ``lr``, ``betas``, ``eps``, ``weight_decay``). ``nullspace`` is the protected basis Q
    of the weight (d×k, orthonormal) or None."""

    side: str
    rank: int
    task_rank: int
    update_proj_gap: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    scale: float = 1.0
    task_basis: str = "residual"
    state_transfer: str = "keep"
    basis_signs: str = "canonical"
    nullspace: Tensor | None = None
    protect_side: str = "input"
    nullspace_mode: str = "update"
    nullspace_weight_decay: str = "project"


def clamped_ranks(shape: Sequence[int], side: str, rank: int, task_rank: int, task_basis: str) -> tuple[int, int]:
    """(shared rank, task rank) after clamping to the matrix: a residual task subspace must fit beside the
    shared one on the basis side."""
    full = min(int(shape[0]), int(shape[1]))
    r_sh = min(rank, full)
    room = side_dim(shape, side) - r_sh if task_basis == "residual" else full
    return r_sh, min(task_rank, full, room)


def ranks(shape: Sequence[int], config: StepConfig) -> tuple[int, int]:
    return clamped_ranks(shape, config.side, config.rank, config.task_rank, config.task_basis)


def initial_state() -> dict:
    """The state of a weight before its first step: no bases, no moments, a refresh due at once."""
    return {"step": 0, "next_refresh": 0, "bases": {}, "moments": {}}


def _refresh(task_grads: dict[str, Tensor], weights: dict[str, float], shape, config: StepConfig) -> dict[str, Tensor]:
    """New bases: B_sh = top-r singular vectors of G_sh = Σ_t w_t·G_t; B_t those of G_t (``"independent"``)
    or of its part outside span(B_sh), orthonormalised against B_sh (``"residual"``)."""
    r_sh, r_t = ranks(shape, config)
    signs = canonical_column_signs if config.basis_signs == "canonical" else (lambda b: b)
    g_sh = sum(weights[t] * g for t, g in task_grads.items())
    bases = {"shared": signs(top_singular_basis(g_sh, r_sh, config.side))}
    for t, g in task_grads.items():
        if r_t == 0:
            continue
        if config.task_basis == "independent":
            bases[t] = signs(top_singular_basis(g, r_t, config.side))
        else:
            residual = remove_component(g, bases["shared"], config.side)
            b = orthonormalize_against(top_singular_basis(residual, r_t, config.side), bases["shared"])
            bases[t] = canonical_column_signs(b)
    return bases


def _transfer(moments: dict, old: dict[str, Tensor], new: dict[str, Tensor], config: StepConfig) -> dict:
    """Moments after a refresh: kept as they are (``keep``), dropped (``reset``), or rotated into the new
    coordinates by R = B_newᵀ·B_old (first moment by R, second by R∘R) (``rotate``)."""
    if config.state_transfer == "keep":
        return moments
    out = {}
    for s, (m, v, count) in moments.items():
        if config.state_transfer == "reset":
            continue
        rot = new[s].T @ old[s]
        out[s] = (rotate_moment(m, rot, config.side), rotate_moment(v, rot, config.side, second_order=True), count)
    return out


def rotate_moment(moment: Tensor, rot: Tensor, side: str, *, second_order: bool = False) -> Tensor:
    """A per-coordinate optimizer state in new coordinates, R = B_newᵀ·B_old: R·M (left) or M·Rᵀ (right);
    a second-order one (squared gradients) by R∘R, which keeps it non-negative."""
    r = rot * rot if second_order else rot
    return r @ moment if side == "left" else moment @ r.T


def gems_step(
    weight: Tensor,
    task_grads: dict[str, Tensor],
    num_samples: dict[str, float],
    state: dict,
    config: StepConfig,
    *,
    task_gates: dict[str, float],
) -> tuple[Tensor, dict]:
    """One GEMS step of one weight with an AdamW inner optimizer: returns (new weight, new state); the inputs
    are not modified. Runs in the dtype of ``weight`` (fp64 for a ground truth).

    ``task_grads[t]`` is task t's mean-loss gradient G_t over its ``num_samples[t]`` samples; ``task_gates``
    the gates (:func:`gates`: they depend on every weight's gradient norms, not on this one alone)."""
    work = weight.dtype
    grads = {t: g.to(work) for t, g in task_grads.items()}
    total = sum(num_samples.values())
    mix = {t: num_samples[t] / total for t in grads}  # the shared gradient's weights N_t / N
    q = None if config.nullspace is None or config.nullspace.shape[1] == 0 else config.nullspace.to(work)
    protect_on = "right" if config.protect_side in ("input", "weight") else "left"  # ΔW·P or P·ΔW

    def null_part(matrix: Tensor) -> Tensor:
        return matrix if q is None else remove_component(matrix, q, protect_on)

    if config.nullspace_mode == "gradient":  # the authors' code: project the raw gradients
        grads = {t: null_part(g) for t, g in grads.items()}

    state = {"step": state["step"], "next_refresh": state["next_refresh"],
             "bases": {s: b.to(work) for s, b in state["bases"].items()},
             "moments": {s: (m.to(work).clone(), v.to(work).clone(), c) for s, (m, v, c) in state["moments"].items()}}
    if state["step"] >= state["next_refresh"]:
        new = _refresh(grads, mix, weight.shape, config)
        if state["bases"]:
            state["moments"] = _transfer(state["moments"], state["bases"], new, config)
        state["bases"] = new
        state["next_refresh"] = state["step"] + config.update_proj_gap
    bases = state["bases"]

    # update mode: the update is P(ΔW). Where P acts on the basis side, P(B·δ) = (P·B)·δ: the coordinates
    # live in the folded basis B' = P·B (R = B'ᵀG is the gradient of the loss with respect to δ); on the
    # other side the bases stay as they are and the finished update is projected.
    fold = q is not None and config.nullspace_mode == "update" and protect_on == config.side
    used = {s: (remove_component(b, q, "left") if fold else b) for s, b in bases.items()}  # P·B, B being d×r

    g_sh = sum(mix[t] * g for t, g in grads.items())
    coords = {"shared": project(g_sh, used["shared"], config.side)}
    coords.update({t: project(g, used[t], config.side) for t, g in grads.items() if t in used})

    beta1, beta2 = config.betas
    update = torch.zeros_like(weight)
    for s, r in coords.items():
        m, v, count = state["moments"].get(s, (torch.zeros_like(r), torch.zeros_like(r), 0))
        count += 1
        delta = adam_delta(r, m, v, count, lr=config.lr, beta1=beta1, beta2=beta2, eps=config.eps)
        state["moments"][s] = (m, v, count)
        gate = 1.0 if s == "shared" else task_gates[s]
        update += config.scale * gate * project_back(delta, used[s], config.side)
    if q is not None and config.nullspace_mode == "update" and not fold:
        update = null_part(update)

    decay_basis = q if config.nullspace_weight_decay == "project" else None
    new_weight = apply_update(weight.clone(), update, lr=config.lr, weight_decay=config.weight_decay,
                              decay_basis=decay_basis, decay_side=protect_on)
    state["step"] += 1
    return new_weight, state
