"""Refresh scheduling: which weights are due, refreshing them together, installing the new bases only once every
refresh of the batch succeeded (rank 0's under DDP), moving the inner state into them, the null-space fold, and
when each weight refreshes next."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gems import distributed, reference
from gems import nullspace as nsp
from gems.config import MAX_GAP_FACTOR
from gems.reductions import finite
from gems.subspaces import SHARED, RefreshBatch, RefreshJob, WeightSubspaces, refresh_bases

if TYPE_CHECKING:
    from gems.optimizer import GemsOptimizer


def due(w: WeightSubspaces) -> bool:
    return w.step >= w.next_refresh


def generator(opt: "GemsOptimizer", w: WeightSubspaces) -> torch.Generator:
    """The seeded generator of one weight's refresh (randomised solvers): the same on every rank and resume."""
    return torch.Generator().manual_seed(opt.config.seed * 1_000_003 + w.index * 7919 + w.step)


def job(opt: "GemsOptimizer", w: WeightSubspaces, grads: list[Tensor], mix: list[float]) -> RefreshJob:
    """The refresh job of ``w`` from its (null-space-projected where asked) task gradients and mixing weights."""
    shared = reference.shared_gradient(grads, mix) if len(grads) > 1 else grads[0].float()
    return RefreshJob(w, shared, dict(zip(opt.config.tasks, grads)), generator(opt, w))


def gradient_nullspace(opt: "GemsOptimizer", w: WeightSubspaces, grads: list[Tensor]) -> list[Tensor]:
    """``nullspace_mode="gradient"``: the task gradients with the protected directions removed."""
    if opt.config.nullspace_mode == "gradient" and w.protected is not None:
        return [nsp.project_gradient(g, w.protected, w.protect_side) for g in grads]
    return grads


def refresh(opt: "GemsOptimizer", jobs: list[RefreshJob]) -> list[tuple[WeightSubspaces, dict[str, Tensor]]]:
    """(weight, new bases) for the jobs, not yet assigned. Empties ``jobs``, so the shared gradients built
    for the refresh are freed before the step goes on."""
    if not jobs:
        return []
    cfg = opt.config
    news = refresh_bases(jobs, task_basis=cfg.task_basis, method=cfg.refresh, warm_start=cfg.warm_start,
                         basis_signs=cfg.basis_signs)
    done = [(j.w, new) for j, new in zip(jobs, news)]
    jobs.clear()
    return done


def install(opt: "GemsOptimizer", refreshed: list[tuple[WeightSubspaces, dict[str, Tensor]]]) -> None:
    """Give the weights their new bases, once every refresh of the step succeeded (rank 0's under DDP),
    then move the inner state into them and schedule the next refresh."""
    swapped = []
    if refreshed:
        opt._plan_epoch += 1  # new bases: the fused step's operand lists are rebuilt
    for w, new in refreshed:
        swapped.append((w, dict(w.bases)))
        w.bases.update(new)
    if swapped and distributed.should_sync(opt.config.sync):
        distributed.broadcast_bases([w for w, _ in swapped])
    for w, old in swapped:
        _after_refresh(opt, w, old)


def _after_refresh(opt: "GemsOptimizer", w: WeightSubspaces, old: dict[str, Tensor | None]) -> None:
    cfg = opt.config
    if cfg.adaptive_refresh is not None:
        similar = w.basis_similarity(old) >= cfg.adaptive_refresh
        w.gap_factor = min(2 * w.gap_factor, MAX_GAP_FACTOR) if similar else 1
    gap = cfg.update_proj_gap * w.gap_factor
    if cfg.refresh_schedule == "staggered" and old.get(SHARED) is None:
        # first bases: weight i refreshes next after (i+1)/N of a gap, so later refreshes are spread one
        # weight (or a few) per step instead of all weights on the same step (no stall, no memory spike)
        gap = max(1, ((w.index + 1) * cfg.update_proj_gap) // len(opt._subspaces))
    w.next_refresh = w.step + gap
    w.transfer_state(old, opt.inner.state, cfg.state_transfer)
    w.fold_nullspace(cfg.nullspace_mode)


# ------------------------------------------------------------------------------ refreshes inside a backward
def _held_bytes(item: tuple[RefreshJob, list[Tensor]]) -> int:
    """Bytes of gradients a pending backward refresh keeps alive: the shared gradient, the task gradients and
    any projected copies of them (nullspace_mode="gradient")."""
    j, grads = item
    held = {id(t): t for t in (j.shared, *j.tasks.values(), *grads)}
    return sum(t.numel() * t.element_size() for t in held.values())


def backward_batch(opt: "GemsOptimizer", stash_projected) -> RefreshBatch:
    """Due weights refreshed inside a backward, together; once refreshed, each task gradient of theirs is
    handed to ``stash_projected(w, task, g)``."""
    def flush(pending: list[tuple[RefreshJob, list[Tensor]]]) -> None:
        jobs = [j for j, _ in pending]
        todo = [(j.w, grads) for j, grads in pending]
        pending.clear()
        install(opt, refresh(opt, jobs))  # refresh empties jobs: the shared gradients are freed here
        for w, grads in todo:
            opt._task_grads.refreshed.add(id(w.param))
            for t, g in zip(opt.config.tasks, grads):
                stash_projected(w, t, g)
    return RefreshBatch(flush, _held_bytes)


def backward_job(opt: "GemsOptimizer", w: WeightSubspaces, grads: list[Tensor | None],
                 mix: list[float]) -> tuple[RefreshJob, list[Tensor]] | None:
    """The refresh job of a due weight from this call's task gradients, and the gradients to project once
    it is done (None for a non-finite gradient: the weight is skipped this step)."""
    grads = [g if g is not None else torch.zeros_like(w.param) for g in grads]
    if not all(finite(g) for g in grads):
        opt._task_grads.nonfinite.add(id(w.param))
        return None
    return job(opt, w, gradient_nullspace(opt, w, grads), mix), grads
