"""What the step reads from the stash: each targeted weight's task gradients (or coordinates), the shared
gradient of the other parameters, the finiteness check, the gates, and the shared-gradient norm for clipping."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gems import distributed, reference
from gems.reductions import finite, norms, read_scalars, shared_gradients
from gems.subspaces import SHARED
from gems.tasks import compute_gates

if TYPE_CHECKING:
    from gems.optimizer import GemsOptimizer

PerWeight = dict[int, list[Tensor | None]]  # id(W) → one full gradient (or None) per task


def gather_gradients(opt: "GemsOptimizer") -> tuple[PerWeight, list[float]]:
    """Per targeted weight (by id) its task gradients, and the shared-gradient weights w_t.

    Also sets ``.grad`` of every non-targeted parameter to its shared gradient for the inner step."""
    stash, tasks = opt._task_grads, opt.config.tasks
    if stash.empty:
        if not opt.config.single_task and any(w.param.grad is not None for w in opt._subspaces):
            raise RuntimeError(f"GEMS has {len(tasks)} tasks: call opt.backward({{task: loss}}) "
                               "instead of loss.backward() so each task's gradient is known")
        return {id(w.param): [w.param.grad] for w in opt._subspaces}, [1.0]
    foreign = [opt._param_name(p) for p in opt._all_params if p.grad is not None]
    if foreign:
        # opt.backward's gradients and a .grad from loss.backward() cannot both be meant: refuse rather
        # than drop one of them silently
        raise RuntimeError(f"{len(foreign)} parameter(s) have a .grad (from loss.backward()?) while "
                           f"opt.backward() gradients are stashed: {', '.join(foreign[:5])}. Put every "
                           "loss into opt.backward (as a task's loss) or call opt.zero_grad() first")
    synchronise(opt)
    weights = stash.shared_weights()
    per_weight = {id(w.param): [stash.grads[t].get(id(w.param)) for t in tasks] for w in opt._subspaces}
    plain, plain_grads = [], []
    for p in opt._plain_params:
        if id(p) in stash.mixed:  # one-backward form: the mixed gradient itself
            p.grad = stash.mixed[id(p)].to(p.dtype)
            continue
        grads = [stash.grads[t].get(id(p)) for t in tasks]
        if all(g is None for g in grads):
            p.grad = None
            continue
        plain.append(p)
        plain_grads.append([g if g is not None else torch.zeros_like(p) for g in grads])
    for p, combined in zip(plain, shared_gradients(plain_grads, weights)):
        p.grad = combined.to(p.dtype)
    return per_weight, weights


def synchronise(opt: "GemsOptimizer") -> None:
    """Make the stash the step's gradient: the sample-weighted mean over its calls and, under DDP, over ranks.

    Once per step, whoever needs it first: the step, or clipping and the norm, which must see the global
    gradient (a rank clipping by its own norm would scale its share differently from one process). A
    collective under DDP: every rank calls it."""
    stash = opt._task_grads
    stash.finalise()
    if not stash.reduced and distributed.should_sync(opt.config.sync):
        distributed.all_reduce_task_gradients(stash, opt._all_params, coordinate_layout(opt),
                                              plain=opt._plain_params)
        stash.reduced = True


def coordinate_layout(opt: "GemsOptimizer") -> dict[int, dict[str, tuple[int, int]]]:
    """For ``stash="projected"``: the weights whose task gradients are held as coordinates this step and
    the coordinate shape per task (the same on every rank: under DDP nothing is refreshed in backward)."""
    if opt._stash_mode != "projected":
        return {}
    return {id(w.param): {t: reference.coord_shape(w.param.shape, w.side, w.ranks[SHARED] + w.ranks[t])
                          for t in opt.config.tasks}
            for w in opt._subspaces if w.bases[SHARED] is not None and w.step < w.next_refresh}


def checked_sqnorms(opt: "GemsOptimizer", per_weight: PerWeight) -> tuple[dict[int, list[float] | None], set[int]]:
    """Per targeted weight, ‖G_t‖² of each task gradient (0 where a task has none), or None when one of
    them is not finite; and the ids of the non-targeted parameters whose ``.grad`` is not finite. One
    2-norm per gradient serves the gates and the finiteness check alike (a finite norm proves every
    element finite; a non-finite one is re-checked with max|x|, since a huge but finite gradient can
    overflow the sum of squares), and all norms are read back in one go."""
    stash, tasks = opt._task_grads, opt.config.tasks
    out: dict[int, list[float] | None] = {key: [0.0] * len(grads) for key, grads in per_weight.items()}
    where, grads_flat = [], []
    for key, grads in per_weight.items():
        for i, g in enumerate(grads):
            if g is not None:
                where.append((key, i))
                grads_flat.append(g)
    plain = [p for p in opt._plain_params if p.grad is not None]
    # stash="projected": the squared norms taken in backward are checked here, in the same transfer
    held = [(i, key) for i, t in enumerate(tasks) for key in stash.sqnorms[t]]
    values = read_scalars(norms(grads_flat + [p.grad for p in plain])
                          + [stash.sqnorms[tasks[i]][key] for i, key in held])
    plain_values = values[len(where):len(where) + len(plain)]
    bad_plain = {id(p) for p, v in zip(plain, plain_values) if not math.isfinite(v) and not finite(p.grad)}
    for (key, i), v in zip(where, values):
        if out[key] is None:
            continue
        if not math.isfinite(v) and not finite(per_weight[key][i]):
            out[key] = None
            continue
        out[key][i] = v * v
    projected = values[len(where) + len(plain):]
    stash.nonfinite.update(key for (_, key), v in zip(held, projected) if not math.isfinite(v))
    for (i, key), v in zip(held, projected):
        if key not in stash.nonfinite:
            out.setdefault(key, [0.0] * len(tasks))[i] += v
    return out, bad_plain


def gates(opt: "GemsOptimizer", sqnorms: dict[int, list[float] | None]) -> list[float]:
    """This step's gate per task, from the summed squared norms of every finite weight's task gradients."""
    cfg = opt.config
    if cfg.single_task or not isinstance(cfg.gating, str) or cfg.gating == "uniform":
        return compute_gates(cfg.gating, list(cfg.tasks), None, None, None)
    sq = [0.0] * len(cfg.tasks)
    for per_task in sqnorms.values():
        if per_task is not None:
            for i, v in enumerate(per_task):
                sq[i] += v
    stash = opt._task_grads
    return compute_gates(cfg.gating, list(cfg.tasks), stash.mean_losses(), [math.sqrt(s) for s in sq],
                         [stash.samples[t] for t in cfg.tasks])


def shared_grad_norm(opt: "GemsOptimizer") -> float:
    """L2 norm, over every parameter, of the shared gradient Σ_t (N_t/N)·G_t the stash holds now."""
    # fp64 sums: a finite gradient of 1e20 has a squared norm past fp32's range (torch's clip_grad_norm_
    # would report inf and zero the gradients; this one clips them)
    stash, tasks = opt._task_grads, opt.config.tasks
    if stash.empty:
        return math.sqrt(sum(float(torch.linalg.vector_norm(p.grad, dtype=torch.float64)) ** 2
                             for p in opt._all_params if p.grad is not None))
    synchronise(opt)
    weights = stash.shared_weights()
    total = 0.0
    for p in opt._all_params:
        grads = [stash.grads[t].get(id(p)) for t in tasks]
        if any(g is not None for g in grads):
            shared = reference.shared_gradient([g if g is not None else torch.zeros_like(p) for g in grads], weights)
            total += float(torch.linalg.vector_norm(shared, dtype=torch.float64)) ** 2
    total += sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in stash.mixed.values())
    return math.sqrt(total + _projected_shared_sq(opt, weights))


def _projected_shared_sq(opt: "GemsOptimizer", weights: list[float]) -> float:
    """‖Σ_t w_t·G_t‖² of the weights held as coordinates (``stash="projected"``), estimated from what was
    kept: Σ_t w_t²‖G_t‖² + 2Σ_{s<t} w_s·w_t·⟨G_s, G_t⟩, the cross-task terms measured in the shared
    subspace (exact when the tasks' gradients overlap only there, as the shared basis is built to capture).
    ‖G_t‖² is exact for one micro-batch; across micro-batches its cross terms are measured in [B_sh, B_t]
    (see TaskGradients.add_projected)."""
    stash = opt._task_grads
    terms: list[Tensor] = []
    for w in opt._subspaces:
        key = id(w.param)
        shared = []
        for t, wt in zip(opt.config.tasks, weights):
            if key in stash.sqnorms[t]:
                terms.append(stash.sqnorms[t][key] * (wt * wt))
                shared.append(w.split_coords(stash.coords[t][key])[0] * wt)
        for i in range(len(shared)):
            for j in range(i + 1, len(shared)):
                terms.append(2 * (shared[i] * shared[j]).sum())
    return max(sum(read_scalars(terms)), 0.0)
