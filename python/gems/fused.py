"""The kernel backends' batches: projection + subspace Adam (``project_adam``) and back-projection + decay + the
write of W (``back_project_update``), one launch per group of weights that share shape, dtype, side, ranks and
param group; plus the inner step counters they advance. The kernels' contract is docs/kernel_contract.md."""
from __future__ import annotations

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


def kernel_bases(opt: "GemsOptimizer", w: WeightSubspaces) -> list[Tensor]:
    """Bases of all S subspaces in contract order; a rank-0 task gets a d×0 basis."""
    return [w.work_bases[s] if w.ranks[s] else
            placeholder(opt, (reference.side_dim(w.param.shape, w.side), 0), w.param.device, "basis")
            for s in opt.config.subspace_names]


def project_adam(opt: "GemsOptimizer", work: list["WorkItem"], shared_w: list[float]
                 ) -> tuple[dict[int, dict[str, Tensor]], list["WorkItem"]]:
    """Projection + Adam of the fused weights by the kernel backend, one launch per group of weights that
    share shape, dtype, side, ranks, param group and inner step count. Returns the δ and the work items
    left to the generic path: a weight whose subspaces' inner step counters disagree (one launch applies
    one bias correction)."""
    mod = backend_module(opt.backend)
    names = opt.config.subspace_names
    current = _buffered_steps(opt)
    groups: dict[tuple, list] = {}
    leftover = []
    for item in work:
        w = item.w
        for c in w.coords.values():
            c.grad = None
        per, steps = [], set()
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
        if len(steps) > 1:
            leftover.append(item)
            continue
        count = steps.pop() if steps else 0.0
        key = (tuple(w.param.shape), w.param.dtype, w.side, tuple(w.ranks.items()), id(w.group), count)
        groups.setdefault(key, []).append((w, item.grads, per))
    deltas = {}
    counted: list[dict[str, Any]] = []  # inner states the kernels stepped
    for key, members in groups.items():
        group = members[0][0].group
        beta1, beta2 = group["betas"]
        out = mod.project_adam(
            [g for _, g, _ in members], list(shared_w),
            [kernel_bases(opt, w) for w, *_ in members],
            [[st["exp_avg"] for st in per] for _, _, per in members],
            [[st["exp_avg_sq"] for st in per] for _, _, per in members],
            side=members[0][0].side, step=int(key[-1]) + 1, lr=float(group["lr"]),
            beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]))
        for (w, _, per), ds in zip(members, out):
            deltas[w.index] = dict(zip(names, ds))
            counted += [st for st in per if "step" in st]  # not the rank-0 placeholders
    _advance_step_counters(opt, counted)
    return deltas, leftover


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
        scale = opt.config.scale
        for (backend, *_), members in self.batches.items():
            w0 = members[0][0]
            backend_module(backend).back_project_update(
                [w.param for w, _, _ in members], [kernel_bases(opt, w) for w, _, _ in members],
                [scale] + [scale * g for g in gates],
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
