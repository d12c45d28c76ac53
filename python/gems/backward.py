"""The dict form ``opt.backward({task: loss}, num_samples)``: one autograd pass per task, each task's gradient
stashed in full or, with ``stash="projected"``, as its coordinates the moment autograd has it. The one-backward
form (per-row losses) is gems.split_backward; both fill the same stash (gems.tasks.TaskGradients)."""
from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gems import distributed, reference, schedule
from gems import nullspace as nsp
from gems.reductions import norm
from gems.subspaces import WeightSubspaces
from gems.tasks import retain_flags

if TYPE_CHECKING:
    from gems.optimizer import GemsOptimizer


def coordinates(opt: "GemsOptimizer", w: WeightSubspaces, task: str, g: Tensor) -> Tensor:
    """One raw task gradient → its coordinates against [B_sh, B_t] (``nullspace_mode="gradient"``: after
    removing the protected directions, as the full-stash step does before projecting)."""
    g = g.float()
    if opt.config.nullspace_mode == "gradient" and w.protected is not None:
        g = nsp.project_gradient(g, w.protected, w.protect_side)
    return reference.project(g, w.task_bases(task), w.side)


def stash_projected(opt: "GemsOptimizer", w: WeightSubspaces, task: str, g: Tensor, alpha: float = 1.0) -> None:
    # no host sync here (this runs inside autograd): a NaN/Inf gradient makes its squared norm non-finite,
    # and step() checks all of them at once (a gradient whose norm overflows counts as non-finite too)
    sq = norm(g).float().square()
    opt._task_grads.add_projected(task, id(w.param), coordinates(opt, w, task, g), sq, alpha)


def backward_batch(opt: "GemsOptimizer"):
    """The batch of due weights a backward refreshes (their gradients are then stashed projected)."""
    return schedule.backward_batch(opt, lambda w, t, g: stash_projected(opt, w, t, g))


def dict_backward(opt: "GemsOptimizer", losses: Mapping[str, Tensor], num_samples, retain_graph: bool) -> None:
    stash, tasks = opt._task_grads, opt.config.tasks
    counts = stash.check_inputs(losses, num_samples)
    stash.begin("dict")
    params = [p for p in opt._all_params if p.requires_grad]
    keep = retain_flags([losses[t] for t in tasks], retain_graph)  # shared forward graph?
    if opt._stash_mode == "projected":
        _backward_projected(opt, losses, counts, params, keep)
        return
    for i, t in enumerate(tasks):
        if counts[t] == 0:
            continue  # no samples of this task in this call: its gradient has weight 0
        grads = torch.autograd.grad(losses[t], params, retain_graph=keep[i], allow_unused=True)
        stash.add(t, params, grads, float(losses[t].detach()), counts[t])


def _backward_projected(opt: "GemsOptimizer", losses, counts: dict[str, float], params: list[Tensor],
                        keep: list[bool]) -> None:
    """``stash="projected"``: every parameter's gradient is handled the moment autograd has accumulated it
    (a post-accumulate-grad hook), so no full set of task gradients is ever alive.

    A targeted weight with bases is projected at once onto [B_sh, B_t] and only its coordinates are kept.
    A weight due for a refresh keeps the full gradients of the first T−1 tasks; when the last task's
    gradient arrives its bases are refreshed from this call's gradients and all T are projected (on CUDA
    together with other due weights, up to REFRESH_BATCH_BYTES, or after the last backward: a refresh that
    raises there leaves the batches before it refreshed, and the call must be redone after zero_grad; with
    gradient accumulation the bases come from the first micro-batch of the step; under DDP the refresh
    waits for the step, where the gradients are averaged first). Other parameters keep full gradients."""
    stash, tasks = opt._task_grads, opt.config.tasks
    total = sum(counts.values())
    mix = [counts[t] / total for t in tasks]
    by_id = {id(w.param): w for w in opt._subspaces}
    # the bases of a due weight come from this call's gradients only if every task is in it (a micro-batch
    # without some task would give that task a basis from a zero gradient); otherwise, and under DDP,
    # the full gradients wait for the step
    refresh_here = not distributed.should_sync(opt.config.sync) and all(counts[t] > 0 for t in tasks)
    due = {k for k, w in by_id.items() if schedule.due(w) and k not in stash.refreshed}
    # due weights whose last task gradient has arrived, refreshed together once they hold REFRESH_BATCH_BYTES
    # of gradients (CUDA) or at once (CPU), as step() does; autograd runs the hooks of each device on its
    # own thread, hence the lock
    pending = backward_batch(opt)
    lock = threading.Lock()
    held = {}
    for p in params:  # the user's own .grad (if any) is set aside, untouched
        held[id(p)] = p.grad
        p.grad = None
    last_task = tasks[-1]

    def on_grad(p: Tensor, task: str) -> None:
        g, p.grad = p.grad, None
        w = by_id.get(id(p))
        if w is not None and id(p) in stash.nonfinite:
            return  # skipped this step whatever comes next: no refresh, no state change
        if w is None or (id(p) in due and not (refresh_here and task == last_task)):
            stash.add_full(task, p, g, alpha=alphas[task])
        elif id(p) in due:
            earlier = [stash.grads[t].pop(id(p), None) for t in tasks[:-1]]  # already weighted
            g = g if alphas[task] == 1.0 else g * alphas[task]
            item = schedule.backward_job(opt, w, [*earlier, g], mix)
            if item is not None:
                with lock:
                    pending.add(item, p.device)
        else:
            stash_projected(opt, w, task, g, alphas[task])

    alphas = {}
    try:
        for i, t in enumerate(tasks):
            if counts[t] == 0:
                continue  # absent from this call (refresh_here is False then)
            alphas[t] = stash.weight_of(t, counts[t])
            handles = [p.register_post_accumulate_grad_hook(lambda q, t=t: on_grad(q, t)) for p in params]
            try:
                torch.autograd.backward(losses[t], inputs=params, retain_graph=keep[i])
            finally:
                for h in handles:
                    h.remove()
            stash.count(t, float(losses[t].detach()), counts[t])
        pending.finish()
    finally:
        for p in params:
            p.grad = held[id(p)]
