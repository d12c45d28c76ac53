"""One GEMS step, in the order the data flows: gradients → finiteness and gates → due refreshes → coordinates
→ inner step (generic, or the fused kernels' projection + Adam) → back-projection, decay and the write of W.

The math of every stage is gems.reference's (tested against it in tests/test_reference_step.py); this module
is the torch implementation over all weights, gems.fused the kernels' batches."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gems import backward, collect, fused, grouped, reference, schedule
from gems import nullspace as nsp
from gems.reductions import finite
from gems.subspaces import SHARED, RefreshBatch, RefreshJob, WeightSubspaces

if TYPE_CHECKING:
    from gems.optimizer import GemsOptimizer


@dataclass(eq=False)
class WorkItem:
    """One weight stepped this step: its task gradients in full (``projected=False``; a task without one
    has zeros), or their coordinates against [B_sh, B_t] (``projected=True``; None for an absent task)."""

    w: WeightSubspaces
    grads: list[Tensor | None]
    projected: bool


def run(opt: "GemsOptimizer", per_weight: collect.PerWeight, shared_w: list[float]) -> None:
    cfg, stash = opt.config, opt._task_grads
    sqnorms, bad_plain = collect.checked_sqnorms(opt, per_weight)
    gates = collect.gates(opt, sqnorms)
    opt.last_gates = dict(zip(cfg.tasks, gates))
    skipped: list[str] = []
    work: list[WorkItem] = []
    refreshed: list[tuple[WeightSubspaces, dict[str, Tensor]]] = []
    # weights due for a refresh, refreshed together; installed only once every refresh of the step succeeded
    pending = RefreshBatch(lambda jobs: refreshed.extend(schedule.refresh(opt, jobs)), RefreshJob.nbytes)
    for w in opt._subspaces:
        if id(w.param) in stash.nonfinite:
            skipped.append(w.name)
            continue
        grads = per_weight.get(id(w.param))
        coords = [stash.coords[t].get(id(w.param)) for t in cfg.tasks]
        if any(c is not None for c in coords):  # stash="projected": coordinates only
            if grads is not None and any(g is not None for g in grads):
                coords = _merge_late_full(opt, w, grads, coords)
                if coords is None:
                    skipped.append(w.name)
                    continue
            work.append(WorkItem(w, coords, True))
            continue
        if grads is None or all(g is None for g in grads):
            continue  # no gradient at all: like torch, the weight is not stepped
        if sqnorms[id(w.param)] is None:
            skipped.append(w.name)
            continue
        grads = [g if g is not None else torch.zeros_like(w.param) for g in grads]
        grads = schedule.gradient_nullspace(opt, w, grads)
        if schedule.due(w):  # the full shared gradient is only ever built for a refresh
            pending.add(schedule.job(opt, w, grads, shared_w), w.param.device)
        work.append(WorkItem(w, grads, False))
    pending.finish()
    schedule.install(opt, refreshed)
    del refreshed
    for p in opt._plain_params:
        if p.grad is not None and id(p) in bad_plain:
            skipped.append(opt._plain_name(p))
            p.grad = None
    if fused.eligible(opt):
        kernels, rest = [], []
        for item in work:
            (rest if fused.backend_for(opt, item.w) == "torch" else kernels).append(item)
        plan = fused.project_adam(opt, kernels, shared_w)
        # the other weights (backend="auto" keeps large ones on torch, and any the kernels left) and the
        # non-targeted parameters; the fused weights' coordinates have no gradient and are skipped
        left = set(plan.leftover)
        rest += [item for item in kernels if item.w.index in left]
        pairs = _inner_step(opt, rest, shared_w, gates) + fused.write(opt, plan, gates)
    else:
        pairs = _inner_step(opt, work, shared_w, gates)
    write_updates(opt, pairs, gates)
    for item in work:
        item.w.release_coords()
        item.w.step += 1
    if not stash.empty:
        # opt.backward's gradients are consumed by the step, the shared .grad GEMS gave the other
        # parameters included: a second step() without a new opt.backward steps nothing, targeted or not
        # (the HF Trainer clears grads with model.zero_grad(), which never reaches GEMS' stash)
        for p in opt._plain_params:
            p.grad = None
    opt.last_skipped = skipped
    if skipped:
        warnings.warn(f"GEMS skipped {len(skipped)} parameter(s) with non-finite gradients this step "
                      f"(weights and state untouched): {', '.join(skipped[:8])}", RuntimeWarning, stacklevel=4)
    stash.clear()


def _merge_late_full(opt: "GemsOptimizer", w: WeightSubspaces, grads, coords) -> list[Tensor | None] | None:
    """A projected weight that also got full gradients (a task that first reached it in a later
    micro-batch of a refresh step): project those too. None if one is not finite."""
    out = list(coords)
    for i, (t, g) in enumerate(zip(opt.config.tasks, grads)):
        if g is None:
            continue
        if not finite(g):
            return None
        proj = backward.coordinates(opt, w, t, g)
        out[i] = proj if out[i] is None else out[i].add_(proj)
    return out


def _inner_step(opt: "GemsOptimizer", work: list[WorkItem], shared_w: list[float], gates: list[float]
                ) -> list[tuple[WeightSubspaces, dict[str, Tensor]]]:
    """Generic path, any inner optimizer: coordinates get the projected gradients, the inner optimizer
    steps, and each coordinate's new value is its update δ. Weights whose δ needs no per-weight
    treatment go through gems.grouped (stacked per shape group and written there, by torch or by the kernel
    backend's back-projection); returns (weight, δ) of the others."""
    grouped_items, single = [], []
    for item in work:
        (grouped_items if grouped.groupable(opt, item.w) else single).append(item)
    groups = grouped.plan(opt, grouped_items).groups if grouped_items else []
    # every coordinate tensor is a view of one zero-filled buffer per device (one fill, not one per tensor);
    # a group's coordinates are one contiguous span of it
    spans, totals = {}, {}
    for key, dev, n in ([(("g", k), g.members[0].param.device, sum(w.coord_numel() for w in g.members))
                         for k, g in enumerate(groups)]
                        + [(("w", item.w.index), item.w.param.device, item.w.coord_numel()) for item in single]):
        start = totals.get(dev, 0)
        spans[key] = slice(start, start + n)
        totals[dev] = start + n
    storage = {d: torch.zeros(n, dtype=torch.float32, device=d) for d, n in totals.items()}
    by_index = {item.w.index: item for item in grouped_items}
    stacked = [grouped.set_gradients(opt, g, by_index, storage[g.members[0].param.device][spans[("g", k)]], shared_w)
               for k, g in enumerate(groups)]
    tasks = opt.config.tasks
    for item in single:
        w = item.w
        w.materialize_coords(storage[w.param.device][spans[("w", w.index)]])
        projs = item.grads if item.projected else [reference.project(g.float(), w.task_bases(t), w.side)
                                                   for t, g in zip(tasks, item.grads)]
        for s, r in combine(w, tasks, projs, shared_w).items():
            w.coords[s].grad = r
    try:
        opt.inner.step()
    except BaseException:
        for item in work:
            item.w.release_coords()
        raise
    for g, coords in zip(groups, stacked):
        grouped.write(opt, g, coords, gates)
    pairs = [(item.w, {s: item.w.coords[s].data for s in item.w.subspaces()}) for item in single]
    for item in work:
        for c in item.w.coords.values():
            c.grad = None
    return pairs


def combine(w: WeightSubspaces, tasks, projs: list[Tensor | None], shared_w: list[float]) -> dict[str, Tensor]:
    """Coordinates of every subspace's gradient from each task's [B_sh, B_t] coordinates:
    R_sh = Σ_t w_t·B_shᵀG_t and R_t = B_tᵀG_t (a task without gradient contributes zeros)."""
    out: dict[str, Tensor] = {}
    for t, proj, wt in zip(tasks, projs, shared_w):
        if proj is None:
            if w.ranks[t]:
                out[t] = torch.zeros(w.coord_shape(t), device=w.param.device)
            continue
        part_sh, part_t = w.split_coords(proj)
        if SHARED in out:
            out[SHARED].add_(part_sh, alpha=wt)
        else:
            out[SHARED] = part_sh.mul(wt) if len(projs) > 1 else part_sh.contiguous()
        if w.ranks[t]:
            out[t] = part_t.contiguous()
    if SHARED not in out:
        out[SHARED] = torch.zeros(w.coord_shape(SHARED), device=w.param.device)
    return out


def coefficients(opt: "GemsOptimizer", w: WeightSubspaces, gates: list[float]) -> list[float]:
    """c_s per subspace of ``w``: scale on the shared one, scale × the task's gate on each task's."""
    by_name = dict(zip(opt.config.subspace_names, fused.coefficients(opt, gates)))
    return [by_name[s] for s in w.subspaces()]


def decay_basis(opt: "GemsOptimizer", w: WeightSubspaces) -> Tensor | None:
    """The protected basis the decay is kept out of (None: decay the whole weight)."""
    if w.protected is None or opt.config.nullspace_weight_decay == "full":
        return None
    return w.protected


def write_updates(opt: "GemsOptimizer", pairs: list[tuple[WeightSubspaces, dict[str, Tensor]]],
                  gates: list[float]) -> None:
    """W ← W − lr·wd·D(W) + Σ_s c_s·B'_s·δ_s for each (weight, δ), through its backend (kernels get every
    weight of one shape, dtype, side, ranks and param group in one call)."""
    batches = fused.WriteBatches()
    for w, ds in pairs:
        if w.delta_projector is not None:
            ds = {s: nsp.project_update(d, w.delta_projector, w.protect_side) for s, d in ds.items()}
        coeffs = coefficients(opt, w, gates)
        if opt.track_update_stats:
            from gems.diagnostics import record_update_stats
            record_update_stats(opt, w, ds, coeffs)
        backend = fused.backend_for(opt, w)
        if backend == "torch":
            apply_torch(w, ds, coeffs, float(w.group["lr"]), float(w.group.get("weight_decay", 0.0)),
                        decay_basis(opt, w))
        else:
            batches.add(backend, w, ds, decay_basis(opt, w))
    batches.launch(opt, gates)


def apply_torch(w: WeightSubspaces, ds: dict[str, Tensor], coeffs: list[float], lr: float, wd: float,
                decay: Tensor | None) -> None:
    """W ← (1 − lr·wd)·W + Σ_s c_s·B'_s·δ_s on the torch backend.

    An fp32 weight without null-space-aware decay takes it as one in-place GEMM over the concatenated,
    gate-scaled bases (W.addmm_): no full-size temporary and one pass over W, instead of one product
    per subspace plus separate decay and add passes."""
    subs = w.subspaces()
    if w.param.dtype == torch.float32 and (decay is None or wd == 0 or lr == 0):
        bases = torch.cat([w.work_bases[s] * c for s, c in zip(subs, coeffs)], dim=1)
        beta = 1.0 - lr * wd
        if w.side == "left":
            w.param.addmm_(bases, torch.cat([ds[s] for s in subs], dim=0), beta=beta)
        else:
            w.param.addmm_(torch.cat([ds[s] for s in subs], dim=1), bases.T, beta=beta)
        return
    update = None
    for s, c in zip(subs, coeffs):
        part = reference.project_back(ds[s], w.work_bases[s], w.side)
        update = part.mul_(c) if update is None else update.add_(part, alpha=c)
    reference.apply_update(w.param, update, lr=lr, weight_decay=wd, decay_basis=decay,
                           decay_side=nsp.acts_on(w.protect_side))
