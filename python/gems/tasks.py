"""Per-task gradients: how ``GemsOptimizer.backward`` collects them and how tasks are weighted.

The shared gradient is derived, never computed by an extra backward pass: when each task loss is a mean
over its N_t samples, the gradient of the mixed-batch mean loss is Σ_t (N_t / N)·G_t."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gems import reference

GATINGS = ("heuristic", "uniform")


def validate_tasks(tasks: Sequence[str] | None) -> list[str]:
    if tasks is None:
        return ["default"]
    if isinstance(tasks, str):
        raise TypeError("tasks must be a list of task names, e.g. ['search', 'rec'], not a string")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one task")
    for t in tasks:
        if not isinstance(t, str) or not t:
            raise TypeError(f"task names must be non-empty strings, got {t!r}")
        if t == "shared":
            raise ValueError("'shared' is reserved for the shared subspace; rename that task")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be unique, got {tasks}")
    return tasks


def validate_gating(gating, tasks: Sequence[str]):
    if isinstance(gating, str):
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS} or a dict of fixed weights, got {gating!r}")
        return gating
    if isinstance(gating, Mapping):
        if set(gating) != set(tasks):
            raise ValueError(f"fixed gates must name exactly the tasks {list(tasks)}, got {sorted(gating)}")
        values = {t: float(gating[t]) for t in tasks}
        if any(not math.isfinite(v) or v < 0 for v in values.values()) or sum(values.values()) <= 0:
            raise ValueError(f"fixed gates must be finite, non-negative and not all zero, got {values}")
        return values
    raise TypeError(f"gating must be a string or a dict, got {type(gating).__name__}")


class TaskGradients:
    """Per-task gradient sums over micro-batches, with the loss and sample counts the gates need.

    ``grads[t][id(p)]``: full gradients. With ``stash="projected"`` a targeted weight's task gradient is
    instead kept as ``coords[t][id(W)]``, its coordinates against [B_sh, B_t] (what the step needs between
    refreshes), plus ``sqnorms[t][id(W)]`` (Σ over micro-batches of ‖G_t‖², for the gates and clipping)."""

    def __init__(self, tasks: Sequence[str]):
        self.tasks = list(tasks)
        self.clear()

    def clear(self) -> None:
        self.grads: dict[str, dict[int, Tensor]] = {t: {} for t in self.tasks}
        self.coords: dict[str, dict[int, Tensor]] = {t: {} for t in self.tasks}
        self.sqnorms: dict[str, dict[int, Tensor]] = {t: {} for t in self.tasks}
        self.nonfinite: set[int] = set()  # projected weights that saw a NaN/Inf gradient this step
        self.refreshed: set[int] = set()  # weights whose bases were refreshed during this step's backward
        self.loss_sum = {t: 0.0 for t in self.tasks}  # Σ over calls of N_t·loss_t
        self.samples = {t: 0.0 for t in self.tasks}  # N_t: Σ over calls of the task's sample counts
        # The stash of task t holds Σ_c (N_t^c / base_t)·g_t^c, so that G_t = stash·base_t / N_t is the
        # sample-weighted mean over calls (the gradient of the task's mean loss over all its samples). base_t
        # is N_t of the first call that had the task: one call per step needs no rescaling pass at all.
        self.base = {t: 0.0 for t in self.tasks}
        self.calls = 0
        # the one-backward form (opt.backward(row_losses, task_ids=...)): every non-targeted parameter's
        # mixed-batch gradient, kept once instead of per task; weighted over calls like a task's stash, with
        # the call's total row weight as its samples
        self.mixed: dict[int, Tensor] = {}
        self.mixed_base = 0.0
        self.mixed_samples = 0.0
        self.form: str | None = None  # "dict" or "rows": the form of this step's opt.backward calls
        self.reduced = False  # under DDP: already the mean over ranks (clipping or the norm needed it before step)

    def begin(self, form: str) -> None:
        if self.reduced:
            raise RuntimeError("this step's gradients were already averaged across ranks (by clip_grad_norm_ or "
                               "shared_grad_norm); call every opt.backward of the step before those, or "
                               "opt.zero_grad() to start a new step")
        if self.form not in (None, form):
            raise RuntimeError("this step's gradients came from the other form of opt.backward (a dict of task "
                               "losses vs per-row losses with task_ids); use one form per step, or call "
                               "opt.zero_grad() first")
        self.form = form

    @property
    def empty(self) -> bool:
        return self.calls == 0

    def check_inputs(self, losses: Mapping[str, Tensor], num_samples) -> dict[str, float]:
        if not isinstance(losses, Mapping):
            raise TypeError("opt.backward takes a dict {task name: scalar loss}")
        unknown = sorted(set(losses) - set(self.tasks))
        missing = [t for t in self.tasks if t not in losses]
        if unknown or missing:
            raise KeyError(f"losses must name exactly the tasks {self.tasks}: unknown {unknown}, missing {missing}")
        for t, loss in losses.items():
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"loss of task {t!r} must be a scalar tensor")
            if not loss.requires_grad:
                raise ValueError(f"loss of task {t!r} does not require grad (computed under no_grad, or detached?)")
        if num_samples is None:
            return {t: 1.0 for t in self.tasks}
        if not isinstance(num_samples, Mapping) or set(num_samples) != set(self.tasks):
            raise KeyError(f"num_samples must be a dict naming exactly the tasks {self.tasks}")
        counts = {t: float(num_samples[t]) for t in self.tasks}
        if any(not math.isfinite(c) or c < 0 for c in counts.values()) or sum(counts.values()) <= 0:
            raise ValueError(f"num_samples must be finite, non-negative and not all zero, got {counts}")
        return counts

    def add(self, task: str, params: Sequence[Tensor], grads: Sequence[Tensor | None], loss: float, samples: float):
        seen: set[int] = set()
        alpha = self.weight_of(task, samples)
        for p, g in zip(params, grads):
            if g is not None:
                self.add_full(task, p, g, seen, alpha)
        self.count(task, loss, samples)

    def weight_of(self, task: str, samples: float) -> float:
        """The coefficient N_t^c / base_t with which this call's gradients of ``task`` enter the stash."""
        if self.base[task] == 0:
            self.base[task] = samples
        return samples / self.base[task] if self.base[task] else 0.0

    def count(self, task: str, loss: float, samples: float) -> None:
        if samples == 0:
            return  # absent from this call: its loss (often NaN, a mean over nothing) does not count
        self.loss_sum[task] += loss * samples
        self.samples[task] += samples

    def finalise(self) -> None:
        """Turn every task's stash into its sample-weighted mean over the calls so far (idempotent; more
        calls may follow)."""
        for t in self.tasks:
            n = self.samples[t]
            if n == 0 or self.base[t] == n:
                continue
            coef = self.base[t] / n
            for g in (*self.grads[t].values(), *self.coords[t].values()):
                g.mul_(coef)
            for sq in self.sqnorms[t].values():
                sq.mul_(coef * coef)
            self.base[t] = n
        if self.mixed_samples and self.mixed_base != self.mixed_samples:
            for g in self.mixed.values():
                g.mul_(self.mixed_base / self.mixed_samples)
            self.mixed_base = self.mixed_samples

    def weight_of_mixed(self, samples: float) -> float:
        if self.mixed_base == 0:
            self.mixed_base = samples
        return samples / self.mixed_base

    def count_mixed(self, samples: float) -> None:
        self.mixed_samples += samples

    def add_mixed(self, p: Tensor, g: Tensor, alpha: float) -> None:
        """Accumulate a non-targeted parameter's mixed-batch gradient (one-backward form)."""
        key = id(p)
        if key in self.mixed:
            self.mixed[key].add_(g, alpha=alpha)
        elif alpha != 1.0 or not g.is_contiguous():
            self.mixed[key] = g.detach() * alpha if alpha != 1.0 else g.detach().contiguous()
        else:
            self.mixed[key] = g.detach()

    def add_full(self, task: str, p: Tensor, g: Tensor, seen: set[int] | None = None, alpha: float = 1.0) -> None:
        stash = self.grads[task]
        key = id(p)
        if key in stash:
            stash[key].add_(g, alpha=alpha)
            return
        if alpha != 1.0:  # a task first seen in a later call (alpha is 1 for the call that sets base)
            stash[key] = g.detach() * alpha
            return
        # autograd hands back fresh tensors: keep them, unless one is an expanded view or is shared by two
        # parameters (then in-place accumulation would write through it), and copy those only.
        fresh = g.is_contiguous() and (seen is None or g.data_ptr() not in seen)
        if seen is not None:
            seen.add(g.data_ptr())
        stash[key] = g.detach() if fresh else g.detach().clone(memory_format=torch.contiguous_format)

    def add_projected(self, task: str, key: int, coords: Tensor, sqnorm: Tensor, alpha: float = 1.0) -> None:
        """Accumulate one micro-batch's coordinates C and ‖g‖² (weighted by ``alpha``, see weight_of). The norm
        of the sum needs ⟨G_acc, g⟩, whose full-size operands are gone: it is estimated by ⟨C_acc, C⟩ (the
        part inside the subspace)."""
        if alpha != 1.0:
            coords, sqnorm = coords * alpha, sqnorm * (alpha * alpha)
        if key in self.coords[task]:
            acc = self.coords[task][key]
            self.sqnorms[task][key].add_(sqnorm + 2 * (acc * coords).sum())
            acc.add_(coords)
        else:
            self.coords[task][key] = coords
            self.sqnorms[task][key] = sqnorm

    def scale_(self, coef: float) -> None:
        """Multiply every stashed gradient by ``coef`` (gradient clipping)."""
        for t in self.tasks:
            for g in (*self.grads[t].values(), *self.coords[t].values()):
                g.mul_(coef)
            for sq in self.sqnorms[t].values():
                sq.mul_(coef * coef)
        for g in self.mixed.values():
            g.mul_(coef)

    def held_bytes(self) -> int:
        """Bytes of every stashed gradient and coordinate tensor."""
        return sum(g.numel() * g.element_size() for t in self.tasks
                   for g in (*self.grads[t].values(), *self.coords[t].values())) \
            + sum(g.numel() * g.element_size() for g in self.mixed.values())

    def shared_weights(self) -> list[float]:
        total = sum(self.samples.values())
        return [self.samples[t] / total for t in self.tasks]

    def mean_losses(self) -> list[float]:
        """Each task's loss averaged over its samples (calls without the task do not count)."""
        return [self.loss_sum[t] / self.samples[t] if self.samples[t] else 0.0 for t in self.tasks]


def _graph_nodes(loss: Tensor) -> set:
    """Autograd nodes that ``loss``'s backward frees (leaf AccumulateGrad nodes hold nothing and are skipped)."""
    seen: set = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen or type(fn).__name__ == "AccumulateGrad":
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return seen


def retain_flags(losses: Sequence[Tensor], retain_graph: bool) -> list[bool]:
    """For backward passes run in order over ``losses``: whether each must keep its graph, i.e. whether a
    later loss still needs part of it (a shared forward). Losses from separate forwards free their
    activations right after their own backward instead of holding them until the last task's."""
    if retain_graph:
        return [True] * len(losses)
    flags, later = [], set()
    for loss in reversed(losses):
        nodes = _graph_nodes(loss)
        flags.append(bool(nodes & later))
        later |= nodes
    return flags[::-1]


def compute_gates(gating, tasks: Sequence[str], losses, grad_norms, samples) -> list[float]:
    """Gate g_t of every task subspace, summing to 1 (heuristic and uniform) or as fixed by the user."""
    fixed = [gating[t] for t in tasks] if isinstance(gating, Mapping) else gating
    return reference.gates(fixed, losses, grad_norms, samples if samples is not None else [1.0] * len(tasks))
