"""The torch step over stacked shape groups: weights that share device, dtype, shape, side, ranks and param
group are stepped together, with one op per group where the per-weight path (gems.step) has one per weight.

Per group the bases of every subspace are one (G, d, R) tensor, R = Σ_s r_s (the weights' own bases are views
of it, so nothing is held twice), and so are the coordinates δ (G, R, n) or (G, m, R), in subspace order, and
their gradients: the combine R_sh = Σ_t w_t·B_shᵀG_t, R_t = B_tᵀG_t is 2T ops per group, the gate scaling
one, and the write W ← (1 − lr·wd)·W + B·δ one GEMM per weight (CPU: in place, no temporary) or a bmm and
two multi-tensor ops per group (GPU: launches are what costs there). The inner optimizer still sees one
coordinate tensor per subspace (views of the group's storage), so any inner optimizer works unchanged.

A kernel backend's groups (stash="projected", or an inner optimizer the fused kernels do not cover) share the
stacked combine and keep the kernel back-projection for the write. Used when a weight's δ needs no per-weight treatment (no null-space projection of δ, no
update statistics); gems.step's per-weight path is the readable version it is tested against
(tests/test_grouped_step.py) and both are tested against gems.reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gems import fused, reference
from gems import nullspace as nsp
from gems.subspaces import SHARED, WeightSubspaces

if TYPE_CHECKING:
    from gems.optimizer import GemsOptimizer
    from gems.step import WorkItem

# device types on which a group's projection is one stack + bmm per task and subspace, and its write one bmm +
# two multi-tensor ops, instead of GEMMs per weight: launches are what costs on a GPU. Both need (G, m, n)
# temporaries; on a CPU the per-weight GEMMs (the write in place, addmm_) are as fast and need none.
BATCHED = {"cuda"}


@dataclass
class Group:
    members: list[WeightSubspaces]
    side: str
    subs: list[str]                  # subspaces with a positive rank, in order (shared first)
    spans: dict[str, tuple[int, int]]  # subspace → its [start, stop) along the rank dimension
    bases: Tensor | None             # (G, d, R): every member's work bases side by side (None: kernel write)

    @property
    def rank_dim(self) -> int:
        return 1 if self.side == "left" else 2

    def part(self, t: Tensor, start: int, stop: int) -> Tensor:
        """The [start, stop) slice of a stacked coordinate tensor along its rank dimension."""
        return t.narrow(self.rank_dim, start, stop - start)

    def coord_shape(self) -> tuple[int, int, int]:
        m, n = self.members[0].param.shape
        r = self.spans[self.subs[-1]][1]
        return (len(self.members), r, n) if self.side == "left" else (len(self.members), m, r)


@dataclass
class Plan:
    signature: tuple
    groups: list[Group]


def groupable(opt: "GemsOptimizer", w: WeightSubspaces) -> bool:
    return w.delta_projector is None and not opt.track_update_stats


def _signature(opt: "GemsOptimizer", work: list["WorkItem"]) -> tuple:
    return tuple(item.w.index for item in work), opt._plan_epoch


def plan(opt: "GemsOptimizer", work: list["WorkItem"]) -> Plan:
    """The groups of ``work`` (built again after a refresh or a load: they bump ``opt._plan_epoch``)."""
    cached = opt._torch_plan
    if cached is not None and cached.signature == _signature(opt, work):
        return cached
    keyed: dict[tuple, list[WeightSubspaces]] = {}
    for item in work:
        w = item.w
        key = (w.param.device, w.param.dtype, tuple(w.param.shape), w.side, tuple(w.ranks.items()), id(w.group))
        keyed.setdefault(key, []).append(w)
    groups = []
    for members in keyed.values():
        w0 = members[0]
        subs = w0.subspaces()
        spans, start = {}, 0
        for s in subs:
            spans[s] = (start, start + w0.ranks[s])
            start += w0.ranks[s]
        if fused.backend_for(opt, w0) != "torch":
            # a kernel backend writes the group (its contract takes each weight's own contiguous bases)
            groups.append(Group(members, w0.side, subs, spans, None))
            continue
        bases = torch.stack([torch.cat([w.work_bases[s] for s in subs], dim=1) for w in members])
        for g, w in enumerate(members):  # the weights' bases become views of the stack: held once
            for s in subs:
                view = bases[g, :, spans[s][0]:spans[s][1]]
                if w.bases[s] is w.work_bases[s]:
                    w.bases[s] = view
                w.work_bases[s] = view
        groups.append(Group(members, w0.side, subs, spans, bases))
    opt._torch_plan = Plan(_signature(opt, work), groups)
    return opt._torch_plan


def set_gradients(opt: "GemsOptimizer", group: Group, items: dict[int, "WorkItem"], storage: Tensor,
                  shared_w: list[float]) -> Tensor:
    """Give the group's coordinate tensors their zero storage (views of ``storage``, shaped (G, R, n) or
    (G, m, R)) and their gradients (the combined coordinates, views of one stacked tensor); returns the
    stacked coordinates, which hold δ after the inner step."""
    tasks = opt.config.tasks
    coords = storage.view(group.coord_shape())
    grads = torch.empty_like(coords)
    r_sh = group.spans[SHARED][1]
    shared = group.part(grads, 0, r_sh)
    first = True
    batched = (group.bases is not None and group.members[0].param.device.type in BATCHED
               and not any(items[w.index].projected for w in group.members))
    for i, (t, wt) in enumerate(zip(tasks, shared_w)):
        full_rank = r_sh + group.members[0].ranks[t]
        if batched:  # every member's [B_sh, B_t]ᵀ·G_t (or G_t·[B_sh, B_t]) from the stacked bases
            gs = torch.stack([items[w.index].grads[i] for w in group.members]).float()
            spans = [(0, r_sh)] + ([group.spans[t]] if t in group.spans else [])
            stacked = torch.cat([_project(group, gs, a, b) for a, b in spans], dim=group.rank_dim)
        else:
            per = [_task_coords(opt, w, t, items[w.index], i) for w in group.members]
            if all(p is None for p in per):
                if t in group.spans:
                    group.part(grads, *group.spans[t]).zero_()
                continue
            stacked = torch.stack([p if p is not None else _zeros(group, full_rank) for p in per])
        if first:
            shared.copy_(group.part(stacked, 0, r_sh) * wt if len(tasks) > 1 else group.part(stacked, 0, r_sh))
            first = False
        else:
            shared.add_(group.part(stacked, 0, r_sh), alpha=wt)
        if t in group.spans:
            group.part(grads, *group.spans[t]).copy_(group.part(stacked, r_sh, full_rank))
    if first:
        shared.zero_()
    for g, w in enumerate(group.members):
        for s in group.subs:
            a, b = group.spans[s]
            w.coords[s].data = group.part(coords[g:g + 1], a, b)[0]
            w.coords[s].grad = group.part(grads[g:g + 1], a, b)[0]
    return coords


def _project(group: Group, gs: Tensor, a: int, b: int) -> Tensor:
    """Columns [a, b) of every member's basis applied to the stacked gradients (G, m, n), as reference.project."""
    basis = group.bases[:, :, a:b]
    return torch.bmm(basis.transpose(1, 2), gs) if group.side == "left" else torch.bmm(gs, basis)


def _task_coords(opt: "GemsOptimizer", w: WeightSubspaces, task: str, item: "WorkItem", i: int) -> Tensor | None:
    """Task ``i``'s coordinates against [B_sh, B_t]: from the stash (projected) or by projecting its gradient."""
    if item.projected:
        return item.grads[i]
    return reference.project(item.grads[i].float(), w.task_bases(task), w.side)


def _zeros(group: Group, rank: int) -> Tensor:
    w0 = group.members[0]
    return torch.zeros(reference.coord_shape(w0.param.shape, w0.side, rank), device=w0.param.device)


def write(opt: "GemsOptimizer", group: Group, coords: Tensor, gates: list[float]) -> None:
    """W ← (1 − lr·wd)·W + Σ_s c_s·B_s·δ_s for every member: δ scaled by c_s in place (one op), then one GEMM."""
    from gems.step import coefficients, decay_basis

    w0 = group.members[0]
    if group.bases is None:
        # the kernels take contiguous δ: one copy per subspace for the group, not one per weight and subspace
        per_sub = {s: group.part(coords, *group.spans[s]).contiguous().unbind(0) for s in group.subs}
        batch = fused.WriteBatches()
        for g, w in enumerate(group.members):
            batch.add(fused.backend_for(opt, w), w, {s: per_sub[s][g] for s in group.subs}, decay_basis(opt, w))
        batch.launch(opt, gates)
        return
    coeffs = coefficients(opt, w0, gates)  # the same for every member (same subspaces)
    scale = torch.tensor([c for s, c in zip(group.subs, coeffs) for _ in range(group.spans[s][1] - group.spans[s][0])],
                         dtype=coords.dtype, device=coords.device)
    coords.mul_(scale.view(1, -1, 1) if group.side == "left" else scale.view(1, 1, -1))
    lr, wd = float(w0.group["lr"]), float(w0.group.get("weight_decay", 0.0))
    beta = 1.0 - lr * wd
    decay = [decay_basis(opt, w) for w in group.members]
    simple = w0.param.dtype == torch.float32 and (all(d is None for d in decay) or wd == 0 or lr == 0)
    params = [w.param for w in group.members]
    if simple and w0.param.device.type in BATCHED:
        update = torch.bmm(group.bases, coords) if group.side == "left" else torch.bmm(coords, group.bases.transpose(1, 2))
        if beta != 1.0:
            torch._foreach_mul_(params, beta)
        torch._foreach_add_(params, list(update.unbind(0)))
        return
    for g, w in enumerate(group.members):
        if simple:
            if group.side == "left":
                w.param.addmm_(group.bases[g], coords[g], beta=beta)
            else:
                w.param.addmm_(coords[g], group.bases[g].T, beta=beta)
            continue
        update = reference.project_back(coords[g], group.bases[g], group.side)
        reference.apply_update(w.param, update, lr=lr, weight_decay=wd, decay_basis=decay[g],
                               decay_side=nsp.acts_on(w.protect_side))
