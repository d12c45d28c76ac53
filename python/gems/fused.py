"""The kernel backends' batches: projection + subspace Adam (``project_adam``) and back-projection + decay + the
write of W (``back_project_update``), one launch per group of weights that share shape, dtype, side, ranks and
param group; plus the inner step counters they advance. The kernels' contract is docs/kernel_contract.md."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gems import nullspace as nsp
from gems import reference
from gems.dispatch import auto_backend_for, backend_module
from gems.subspaces import WeightSubspaces

if TYPE_CHECKING:
    from gems.optimizer import GemsOptimizer
    from gems.step import WorkItem


def eligible(opt: "GemsOptimizer") -> bool:
    """Whether the kernel backend can run the whole subspace step itself: torch Adam/AdamW with the
    standard flags, whose state tensors (step, exp_avg, exp_avg_sq) it then updates directly."""
    if opt.backend == "torch" or opt._stash_mode == "projected" or type(opt.inner) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    return all(not g.get("amsgrad") and not g.get("maximize") and not g.get("capturable")
               and not g.get("differentiable") for g in opt.inner.param_groups)


def backend_for(opt: "GemsOptimizer", w: WeightSubspaces) -> str:
    """The backend that steps weight ``w``: the resolved one, except that backend="auto" keeps the weights
    for which the kernel backend was measured slower on torch (gems.dispatch.auto_backend_for)."""
    if not opt._auto_backend:
        return opt.backend
    return auto_backend_for(opt.backend, tuple(w.param.shape), w.param.dtype, sum(w.ranks.values()))


def placeholder(opt: "GemsOptimizer", shape: tuple[int, ...], device: torch.device, role: str) -> Tensor:
    """The zero-size fp32 tensor that stands for a rank-0 subspace's basis or moment (``role``): never
    written, and the same tensor at every step, so the launchers' checks stay memoised
    (gems_kernels._utils.CHECKED)."""
    key = (role, tuple(shape), device)
    if key not in opt._placeholders:
        opt._placeholders[key] = torch.zeros(shape, dtype=torch.float32, device=device)
    return opt._placeholders[key]


def coefficients(opt: "GemsOptimizer", gates: list[float]) -> list[float]:
    """c_s in the contract's subspace order (shared, then every task): gems.step.coefficients for a weight
    that has all subspaces (the kernels keep rank-0 ones in place)."""
    scale = opt.config.scale
    return [scale] + [scale * g for g in gates]


def kernel_bases(opt: "GemsOptimizer", w: WeightSubspaces) -> list[Tensor]:
    """Bases of all S subspaces in contract order; a rank-0 task gets a d×0 basis."""
    return [w.work_bases[s] if w.ranks[s] else
            placeholder(opt, (reference.side_dim(w.param.shape, w.side), 0), w.param.device, "basis")
            for s in opt.config.subspace_names]


@dataclass
class _Group:
    """Weights that one ``project_adam`` and one ``back_project_update`` launch serve, with the operand lists
    the launches take (kept between steps: they change only at a refresh or a load)."""

    members: list[WeightSubspaces]
    bases: list[list[Tensor]]
    exp_avg: list[list[Tensor]]
    exp_avg_sq: list[list[Tensor]]
    decay: list[Tensor | None]
    count: float  # the inner states' step count (one bias correction per launch)
    per_weight_write: bool  # δ projected per weight first (null space on the non-basis side)
    deltas: list[list[Tensor]] = field(default_factory=list)


@dataclass
class Plan:
    """The fused step's grouping, built when the set of fused weights, their bases or the inner state
    changes (``signature``), reused at every other step: host work per step is then a loop over groups."""

    signature: tuple
    groups: list[_Group]
    leftover: list[int]  # indices of weights whose subspaces' step counts disagree: the generic path
    counters: list[dict[str, Any]]  # the inner states the launches step (their "step" entries advance)
    moments: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # each counter's (exp_avg, exp_avg_sq)
    expected: Tensor | None = None  # the step-counter buffer as this plan left it


def _signature(opt: "GemsOptimizer", work: list["WorkItem"]) -> tuple:
    # a refresh, a load and a reset bump opt._plan_epoch; a new state dict of the inner optimizer has a new identity
    return tuple(item.w.index for item in work), opt._plan_epoch, id(opt.inner.state)


def _still_valid(opt: "GemsOptimizer", plan: Plan | None, work: list["WorkItem"]) -> bool:
    """The plan fits this step: same weights, no refresh or load since, every step counter still the buffer's
    view with the value the last step left, and every moment the state's own (a counter or moment replaced or
    set by hand, as torch.optim allows, rebuilds the plan, which reads the state again)."""
    if plan is None or plan.expected is None or plan.signature != _signature(opt, work):
        return False
    buf, views = opt._step_buffer
    if len(views) != len(plan.counters) or any(st["step"] is not v for st, v in zip(plan.counters, views)):
        return False
    # a moment replaced by hand (opt.inner.state[c]["exp_avg"] = ...) is the one to step, as in torch.optim
    if any(st["exp_avg"] is not m or st["exp_avg_sq"] is not v for st, (m, v) in zip(plan.counters, plan.moments)):
        return False
    return torch.equal(buf, plan.expected)


def _build_plan(opt: "GemsOptimizer", work: list["WorkItem"]) -> Plan:
    from gems.step import decay_basis

    names = opt.config.subspace_names
    current = _buffered_steps(opt)
    keyed: dict[tuple, _Group] = {}
    leftover, counters = [], []
    for item in work:
        w = item.w
        per, steps, counted = [], set(), []
        for sub in names:
            if w.ranks[sub] == 0:  # the contract keeps every subspace in place, empty ones included
                per.append({name: placeholder(opt, w.coord_shape(sub), w.param.device, name)
                            for name in ("exp_avg", "exp_avg_sq")})  # distinct, like real moments
                continue
            st = opt.inner.state[w.coords[sub]]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros(w.coord_shape(sub), dtype=torch.float32, device=w.param.device)
                st["exp_avg_sq"] = torch.zeros(w.coord_shape(sub), dtype=torch.float32, device=w.param.device)
            # Adam's bias correction follows the inner state's own count, which restarts when
            # state_transfer="reset" drops the state at a refresh (w.step does not)
            step = st["step"]
            steps.add(current[id(step)] if id(step) in current else float(step))  # one read for the buffered
            per.append(st)
            counted.append(st)
        if len(steps) > 1:
            leftover.append(w.index)
            continue
        count = steps.pop() if steps else 0.0
        key = (tuple(w.param.shape), w.param.dtype, w.side, tuple(w.ranks.items()), id(w.group), count)
        g = keyed.get(key)
        if g is None:
            g = keyed[key] = _Group([], [], [], [], [], count, False)
        g.members.append(w)
        g.bases.append(kernel_bases(opt, w))
        g.exp_avg.append([st["exp_avg"] for st in per])
        g.exp_avg_sq.append([st["exp_avg_sq"] for st in per])
        g.decay.append(decay_basis(opt, w))
        g.per_weight_write |= w.delta_projector is not None
        counters += counted
    return Plan(_signature(opt, work), list(keyed.values()), leftover, counters,
                [(st["exp_avg"], st["exp_avg_sq"]) for st in counters])


def project_adam(opt: "GemsOptimizer", work: list["WorkItem"], shared_w: list[float]) -> Plan:
    """Projection + Adam of the fused weights by the kernel backend, one launch per group of weights that
    share shape, dtype, side, ranks, param group and inner step count; each group's δ stays in the plan for
    ``write``. ``plan.leftover``: the weights left to the generic path, whose subspaces' inner step counters
    disagree (one launch applies one bias correction)."""
    plan = opt._fused_plan
    if not _still_valid(opt, plan, work):
        plan = opt._fused_plan = _build_plan(opt, work)
    mod = backend_module(opt.backend)
    grads = {item.w.index: item.grads for item in work}
    for g in plan.groups:
        group = g.members[0].group
        beta1, beta2 = group["betas"]
        g.deltas = mod.project_adam(
            [grads[w.index] for w in g.members], list(shared_w), g.bases, g.exp_avg, g.exp_avg_sq,
            side=g.members[0].side, step=int(g.count) + 1, lr=float(group["lr"]),
            beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]))
    for g in plan.groups:
        g.count += 1
    _advance_step_counters(opt, plan.counters)
    buf, views = opt._step_buffer
    plan.expected = buf.clone() if len(views) == len(plan.counters) and all(
        st["step"] is v for st, v in zip(plan.counters, views)) else None
    return plan


def write(opt: "GemsOptimizer", plan: Plan, gates: list[float]) -> list[tuple[WeightSubspaces, dict[str, Tensor]]]:
    """W ← W − lr·wd·D(W) + Σ_s c_s·B'_s·δ_s for the fused weights, one ``back_project_update`` per group.
    Returns the (weight, δ) of the groups that need the per-weight write (gems.step.write_updates): a δ
    projected first (null space on the non-basis side), or update statistics being recorded."""
    names = opt.config.subspace_names
    coeffs = coefficients(opt, gates)
    mod = backend_module(opt.backend)
    per_weight = []
    for g in plan.groups:
        if g.per_weight_write or opt.track_update_stats:
            per_weight += [(w, dict(zip(names, ds))) for w, ds in zip(g.members, g.deltas)]
        else:
            w0 = g.members[0]
            mod.back_project_update(
                [w.param for w in g.members], g.bases, coeffs, g.deltas, side=w0.side, lr=float(w0.group["lr"]),
                weight_decay=float(w0.group.get("weight_decay", 0.0)), decay_bases=g.decay,
                decay_side=nsp.acts_on(w0.protect_side))
        g.deltas = []
    return per_weight


class WriteBatches:
    """The kernel-backend weights of one step's write, grouped by what one ``back_project_update`` call shares."""

    def __init__(self) -> None:
        self.batches: dict[tuple, list[tuple[WeightSubspaces, dict[str, Tensor], Tensor | None]]] = {}

    def add(self, backend: str, w: WeightSubspaces, ds: dict[str, Tensor], decay: Tensor | None) -> None:
        key = (backend, tuple(w.param.shape), w.param.dtype, w.side, tuple(w.ranks.items()), id(w.group),
               w.protect_side)
        self.batches.setdefault(key, []).append((w, ds, decay))

    def launch(self, opt: "GemsOptimizer", gates: list[float]) -> None:
        names = opt.config.subspace_names
        coeffs = coefficients(opt, gates)
        for (backend, *_), members in self.batches.items():
            w0 = members[0][0]
            backend_module(backend).back_project_update(
                [w.param for w, _, _ in members], [kernel_bases(opt, w) for w, _, _ in members],
                coeffs,
                [[ds[s] if s in ds else torch.zeros(w.coord_shape(s), device=w.param.device) for s in names]
                 for w, ds, _ in members],
                side=w0.side, lr=float(w0.group["lr"]), weight_decay=float(w0.group.get("weight_decay", 0.0)),
                decay_bases=[d for _, _, d in members], decay_side=nsp.acts_on(w0.protect_side))


def _buffered_steps(opt: "GemsOptimizer") -> dict[int, float]:
    """Current values of the step counters held in the step buffer, by counter object id (one read)."""
    buf, views = opt._step_buffer
    return dict(zip(map(id, views), buf.tolist())) if views else {}


def _advance_step_counters(opt: "GemsOptimizer", states: list[dict[str, Any]]) -> None:
    """``step += 1`` for the inner states the fused kernels stepped, as torch.optim would (after the
    launches: a launch that raises leaves the counters as they were).

    The counters are 0-d CPU tensors, one per coordinate tensor (630 on SmolLM2): even one foreach add
    walks them one by one, on a GPU machine too. So they are made views of one buffer
    the first time and advanced with one add while the same counter objects come back; any other set
    (a weight skipped, a loaded state dict, a user's edit) is advanced with a foreach add and becomes the
    new buffer."""
    for st in states:
        if not isinstance(st["step"], Tensor):  # a plain number (a hand-made state)
            st["step"] += 1
    states = [st for st in states if isinstance(st["step"], Tensor)]
    if not states:
        return
    counters = [st["step"] for st in states]
    buf, views = opt._step_buffer
    if len(views) == len(counters) and all(a is b for a, b in zip(views, counters)):
        buf.add_(1)
        return
    torch._foreach_add_(counters, 1)
    if all(c.dim() == 0 and c.device.type == "cpu" and c.dtype == counters[0].dtype for c in counters):
        buf = torch.stack(counters)
        views = list(buf.unbind(0))
        for st, v in zip(states, views):
            st["step"] = v
        opt._step_buffer = (buf, views)
