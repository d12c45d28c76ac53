"""GemsOptimizer: multi-subspace gradient tuning as a wrapper around any torch optimizer."""
from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gems import diagnostics as diag
from gems import distributed, reference, split_backward
from gems import nullspace as nsp
from gems.dispatch import auto_backend_for, backend_module, requested_backend, resolve_backend
from gems.refresh import REFRESH_METHODS
from gems.subspaces import SHARED, RefreshBatch, RefreshJob, WeightSubspaces, clamp_report, refresh_bases
from gems.targets import TargetSpec, select_linear_modules, unwrap
from gems.tasks import TaskGradients, compute_gates, retain_flags, validate_gating, validate_tasks

FORMAT_VERSION = 1
TASK_BASES = ("residual", "independent")
NULLSPACE_MODES = ("update", "gradient")
STATE_TRANSFERS = ("keep", "rotate", "reset")
MAX_GAP_FACTOR = 8
NULLSPACE_DECAYS = ("project", "full")
STASHES = ("auto", "full", "projected")
REFRESH_SCHEDULES = ("aligned", "staggered")
BASIS_SIGNS = ("canonical", "solver")


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _split(w: WeightSubspaces, coords: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinates against [B_sh, B_t] → (shared part, task part)."""
    r_sh = w.ranks[SHARED]
    return (coords[:r_sh], coords[r_sh:]) if w.side == "left" else (coords[:, :r_sh], coords[:, r_sh:])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of reductions over gradients: fp32, or fp64 for fp64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _indices_by(keys) -> dict[Any, list[int]]:
    """Positions of the items per key, in order (for one batched op per device and dtype)."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def _norm(t: Tensor) -> Tensor:
    """‖t‖₂ accumulated in fp32 (fp64 for fp64 tensors), as a 0-d tensor (no host sync)."""
    return torch.linalg.vector_norm(t, dtype=_acc_dtype(t.dtype))


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """``_norm`` of each tensor, with one multi-tensor reduction per (device, dtype) instead of one launch per
    tensor (per-tensor reductions are ~900 launches per SmolLM2 step: `python benches/bench_overhead.py`)."""
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for (_, dtype), idx in _indices_by((t.device, t.dtype) for t in tensors).items():
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, dtype=_acc_dtype(dtype))):
            out[i] = n
    return out


def _shared_gradients(task_grads: list[list[Tensor]], weights: list[float]) -> list[Tensor]:
    """reference.shared_gradient for many parameters at once (their task gradients ``task_grads[i][t]``), with
    one multi-tensor op per task and (device, dtype) instead of a fill and T adds per parameter."""
    out: list[Tensor] = [None] * len(task_grads)  # type: ignore[list-item]
    for (_, dtype), idx in _indices_by((g[0].device, g[0].dtype) for g in task_grads).items():
        acc = _acc_dtype(dtype)
        sums = torch._foreach_mul([task_grads[i][0].to(acc) for i in idx], float(weights[0]))
        for t in range(1, len(weights)):
            torch._foreach_add_(sums, [task_grads[i][t].to(acc) for i in idx], alpha=float(weights[t]))
        for i, total in zip(idx, sums):
            out[i] = total
    return out


def _finite(t: Tensor) -> bool:
    """All elements finite, with one reduction and no full-size temporary.

    The 2-norm is NaN or inf whenever an element is, and is ~20× faster on CPU than max |x| (0.09 ms vs
    2.29 ms at 576×1536, `python benches/bench_micro.py --threads 1`); only when it is not finite, which a huge finite tensor can also cause
    by overflowing the sum of squares, does max |x| decide."""
    if t.numel() == 0 or bool(torch.isfinite(_norm(t))):
        return True
    return bool(torch.isfinite(torch.linalg.vector_norm(t, ord=float("inf"))))


def _held_bytes(job: RefreshJob, grads: list[Tensor]) -> int:
    """Bytes of gradients a pending backward refresh keeps alive: the shared gradient, the task gradients and
    any projected copies of them (nullspace_mode="gradient")."""
    held = {id(t): t for t in (job.shared, *job.tasks.values(), *grads)}
    return sum(t.numel() * t.element_size() for t in held.values())


def _read_scalars(values: list[Tensor]) -> list[float]:
    """0-d tensors to floats with one transfer per device (they may live on several)."""
    out: list[float] = [0.0] * len(values)
    for idx in _indices_by(v.device for v in values).values():
        by_dtype = [[idx[j] for j in js] for js in _indices_by(values[i].dtype for i in idx).values()]
        # one stack and one cast per dtype, one transfer per device (not one cast per value)
        flat = torch.cat([torch.stack([values[i] for i in ids]).double() for ids in by_dtype])
        for i, x in zip((i for ids in by_dtype for i in ids), flat.tolist()):
            out[i] = x
    return out


class GemsOptimizer(torch.optim.Optimizer):
    """Wraps ``inner`` (any torch optimizer instance) so that every targeted weight is trained in a shared
    low-rank subspace plus one low-rank subspace per task.

    The inner optimizer keeps its own class, hyper-parameters, param groups, schedulers and state: its
    targeted weights are replaced by small coordinate tensors (one per subspace), and GEMS maps the inner
    optimizer's coordinate updates back onto the weights. Parameters that are not targeted (embeddings,
    norms, biases, the LM head) get the inner optimizer's ordinary update on the shared gradient.

    Weight decay of a targeted weight is decoupled and applied by GEMS to the full weight, using the
    ``weight_decay`` and ``lr`` of the weight's param group, whatever the inner class (for Adam, SGD and
    the like that means decoupled decay instead of their L2 term). The inner optimizer sees coordinates
    that are zero before each of its steps: optimizers whose step depends on the parameter's value see
    zero (Adafactor's relative step size falls to its floor eps2·ρ_t, LAMB-style trust ratios degenerate),
    so prefer optimizers whose update depends on gradients only.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        *,
        model: nn.Module | None = None,
        tasks: Sequence[str] | None = None,
        rank: int = 128,
        task_rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        task_basis: str = "residual",
        gating: str | Mapping[str, float] = "heuristic",
        nullspace: "nsp.NullSpace | None" = None,
        nullspace_mode: str = "update",
        nullspace_weight_decay: str = "project",
        target_modules: TargetSpec = None,
        backend: str | None = None,
        refresh: str = "svd",
        state_transfer: str = "keep",
        adaptive_refresh: float | None = None,
        seed: int = 0,
        sync: str = "auto",
        stash: str = "auto",
        refresh_schedule: str = "aligned",
        target_embeddings: bool = False,
        warm_start: bool = False,
        basis_signs: str = "canonical",
    ) -> None:
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"inner must be a torch.optim.Optimizer instance, got {type(inner).__name__}")
        if isinstance(inner, GemsOptimizer):
            raise TypeError("inner is already a GemsOptimizer")
        self.tasks = validate_tasks(tasks)
        self.single_task = len(self.tasks) == 1
        if task_rank is None:
            task_rank = 0 if self.single_task else max(rank // 2, 1)
        for name, value, low in (("rank", rank, 1), ("task_rank", task_rank, 0), ("update_proj_gap", update_proj_gap, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        reference.side_for((2, 1), proj_type)  # validates proj_type
        _one_of("task_basis", task_basis, TASK_BASES)
        _one_of("refresh", refresh, REFRESH_METHODS)
        _one_of("state_transfer", state_transfer, STATE_TRANSFERS)
        if adaptive_refresh is not None and not (isinstance(adaptive_refresh, float) and 0 < adaptive_refresh <= 1):
            raise ValueError(f"adaptive_refresh must be None or a similarity in (0, 1], got {adaptive_refresh!r}")
        if sync not in ("auto", "none"):
            raise ValueError(f"sync must be 'auto' or 'none', got {sync!r}")
        if nullspace is not None and not isinstance(nullspace, nsp.NullSpace):
            raise TypeError(f"nullspace must be a gems.NullSpace, got {type(nullspace).__name__}")
        _one_of("nullspace_mode", nullspace_mode, NULLSPACE_MODES)
        _one_of("nullspace_weight_decay", nullspace_weight_decay, NULLSPACE_DECAYS)
        _one_of("stash", stash, STASHES)
        _one_of("refresh_schedule", refresh_schedule, REFRESH_SCHEDULES)
        _one_of("basis_signs", basis_signs, BASIS_SIGNS)
        if not isinstance(target_embeddings, bool):
            raise TypeError(f"target_embeddings must be a bool, got {target_embeddings!r}")
        if target_embeddings and model is None:
            raise ValueError("target_embeddings=True needs model= (embeddings are found among its modules)")

        self.inner = inner
        self.rank, self.task_rank, self.update_proj_gap, self.scale = rank, task_rank, update_proj_gap, float(scale)
        self.proj_type, self.task_basis, self.refresh_method = proj_type, task_basis, refresh
        self.state_transfer, self.adaptive_refresh = state_transfer, adaptive_refresh
        self.gating = validate_gating(gating, self.tasks)
        self.seed, self.sync = int(seed), sync
        self.nullspace, self.nullspace_mode, self.nullspace_weight_decay = nullspace, nullspace_mode, nullspace_weight_decay
        self._update_stats: dict[str, dict[str, float]] = {}
        self.track_update_stats = False
        self.backend_request = backend
        self.stash, self.refresh_schedule, self.target_embeddings = stash, refresh_schedule, target_embeddings
        self.warm_start, self.basis_signs = bool(warm_start), basis_signs
        self._task_grads = TaskGradients(self.tasks)
        self.last_gates: dict[str, float] = {t: 1.0 / len(self.tasks) for t in self.tasks}
        self.last_skipped: list[str] = []
        # rank-0 subspaces' bases and moments for the kernels, which keep every subspace in place: zero-size,
        # never written, and the same tensors at every step, so the launchers' checks stay memoised
        # (gems_kernels._utils.CHECKED); by (role, shape, device)
        self._placeholders: dict[tuple, Tensor] = {}
        # the fused path's inner step counters as views of one buffer (see _advance_step_counters)
        self._step_buffer: tuple[Tensor, list[Tensor]] = (torch.zeros(0), [])

        # torch.optim.Optimizer plumbing (hooks, profiling) without a second set of param groups.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        # everything that can fail runs before the inner optimizer is touched, so a failed constructor
        # leaves it as it was and a retry works
        self._check_inner_params()
        self._subspaces = self._build_subspaces(model, target_modules)
        self._attach_nullspace(model)
        devices = {w.param.device.type for w in self._subspaces} or {"cpu"}
        # None: the GEMS_BACKEND environment variable, else "auto" (kernels on GPU, torch on CPU)
        self.backend = resolve_backend(backend, device_type="cuda" if "cuda" in devices else "cpu")
        self._auto_backend = requested_backend(backend) == "auto"
        clamp_report(self._subspaces, rank, task_rank)
        self._install_coordinates()

    # ----------------------------------------------------------------------------------------------
    # construction
    def _inner_params(self) -> list[Tensor]:
        return [p for g in self.inner.param_groups for p in g["params"]]

    def _check_inner_params(self) -> None:
        """Parameters GEMS cannot step are refused here, not at the first step()."""
        for i, p in enumerate(self._inner_params()):
            if p.is_complex():
                raise TypeError(f"parameter {i} {tuple(p.shape)} is complex ({p.dtype}): GEMS steps real "
                                "floating-point parameters only (view it as real with torch.view_as_real)")
            if p.device.type == "meta":
                raise ValueError(f"parameter {i} {tuple(p.shape)} is on the meta device: materialise the model "
                                 "(e.g. model.to_empty(device=...) and load its weights) before building GEMS")

    def _build_subspaces(self, model: nn.Module | None, target_modules: TargetSpec) -> list[WeightSubspaces]:
        held = {id(p): p for p in self._inner_params()}
        if model is not None:
            model = unwrap(model)
            modules = select_linear_modules(model, target_modules)
            named = [(f"{n}.weight", m.weight) for n, m in modules]
            if self.target_embeddings:
                embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
                sparse = [n for n, m in embeddings if m.sparse]
                if sparse:
                    raise ValueError(f"target_embeddings=True: {sparse} use sparse gradients, which GEMS cannot "
                                     "project; build them with sparse=False")
                named += [(f"{n}.weight", m.weight) for n, m in embeddings]
        else:
            if target_modules is not None:
                raise ValueError("target_modules needs model=")
            names = {}
            named = [(names.setdefault(id(p), f"param{i}"), p) for i, p in enumerate(self._inner_params()) if p.dim() == 2]
        chosen, seen = [], set()
        for name, p in named:
            if id(p) in seen or id(p) not in held or not p.requires_grad:
                continue  # frozen, shared (tied) twice, or not given to the inner optimizer: GEMS leaves it alone
            seen.add(id(p))
            chosen.append(WeightSubspaces.create(len(chosen), name, p, tasks=self.tasks, rank=self.rank,
                                                 task_rank=self.task_rank, proj_type=self.proj_type,
                                                 task_basis=self.task_basis))
        if not chosen:
            raise ValueError("GEMS found no trainable 2-D weight held by the inner optimizer to project")
        # targeted nn.Linear layers learn to hand their (X, dY) to opt.backward(row_losses, task_ids=...)
        self._row_split = split_backward.convert(model, {id(w.param) for w in chosen}) if model is not None else set()
        return chosen

    def _install_coordinates(self) -> None:
        """Replace each targeted weight in the inner optimizer by its coordinate tensors, in place, so the
        number and order of param groups (what LR schedulers and state dicts key on) stay the same."""
        by_id = {id(w.param): w for w in self._subspaces}
        for group in self.inner.param_groups:
            params = []
            for p in group["params"]:
                w = by_id.get(id(p))
                if w is None:
                    params.append(p)
                    continue
                self.inner.state.pop(p, None)
                w.group = group
                params.extend(w.coords[s] for s in w.subspaces())
            group["params"] = params
        coord_ids = {id(c) for w in self._subspaces for c in w.coords.values()}
        self._plain_params = [p for p in self._inner_params() if id(p) not in coord_ids]
        self._all_params = [w.param for w in self._subspaces] + self._plain_params

    # ----------------------------------------------------------------------------------------------
    # torch.optim.Optimizer surface
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.inner.param_groups = value

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        self.inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.inner.defaults = value

    def __getstate__(self) -> dict[str, Any]:  # Optimizer's keeps only three keys; GEMS needs all
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        shapes = sorted({tuple(w.param.shape) for w in self._subspaces})
        return (f"GemsOptimizer(tasks={self.tasks}, rank={self.rank}, task_rank={self.task_rank}, "
                f"update_proj_gap={self.update_proj_gap}, scale={self.scale}, proj_type={self.proj_type!r}, "
                f"task_basis={self.task_basis!r}, gating={self.gating!r}, backend={self.backend!r}, "
                f"refresh={self.refresh_method!r}, stash={self.stash!r}, refresh_schedule={self.refresh_schedule!r}, "
                f"targeted_weights={len(self._subspaces)}, shapes={shapes},\n  inner={self.inner!r})")

    @property
    def _stash_mode(self) -> str:
        """What this step's stash holds for targeted weights: "projected" (coordinates between refreshes) or
        "full". ``stash="auto"``: projected for the one-backward form (its coordinates cost no m×n matrix),
        full for the dict form (the kernels' fused projection reads full gradients)."""
        if self.stash == "auto":
            return "projected" if self._task_grads.form == "rows" else "full"
        return self.stash

    @property
    def subspaces(self) -> list[WeightSubspaces]:
        """Per targeted weight: name, side, ranks, bases and step (read-only view for tools and tests)."""
        return list(self._subspaces)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the stashed task gradients and every parameter's ``.grad``."""
        self._task_grads.clear()
        for p in self._all_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()
        for w in self._subspaces:
            for c in w.coords.values():
                c.grad = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("add the group to the inner optimizer before wrapping it in GemsOptimizer")

    # ----------------------------------------------------------------------------------------------
    # gradients
    def backward(self, losses: Mapping[str, Tensor] | Tensor, num_samples: Mapping[str, float] | None = None, *,
                 task_ids: Sequence[str] | Tensor | None = None, row_weights: Sequence[float] | Tensor | None = None,
                 retain_graph: bool = False) -> None:
        """Compute and stash each task's gradient (accumulating over calls until ``step``/``zero_grad``).

        ``num_samples[t]`` is the number of samples behind task t's (mean) loss in this call (0: the task is
        absent from it). Over several calls (gradient accumulation) G_t is the sample-weighted mean of the
        calls' gradients, the gradient of the task's mean loss over all its samples, and the shared gradient
        is Σ_t (N_t / N)·G_t, the gradient of the mean loss over every sample of the step. So pass each call's
        per-sample mean losses, not losses divided by the number of calls. Omitted: one sample per task.

        One-backward form: ``opt.backward(row_losses, task_ids=ids)`` with one loss per batch row (a 1-D
        tensor from one forward over a mixed batch) and each row's task (names, or indices into ``tasks``);
        ``row_weights`` (default 1) weights the rows, e.g. by their label tokens. One backward gives every
        task's exact gradient (with the default ``stash="auto"``, between refreshes, only its coordinates) for the
        targeted nn.Linear/nn.Embedding weights and the mixed gradient for the other parameters; task t counts Σ of its rows' weights as its
        samples. A single-task optimizer needs no ``task_ids``. See gems.split_backward."""
        if isinstance(losses, Tensor):
            if num_samples is not None:
                raise ValueError("num_samples is for the dict form; with per-row losses use row_weights")
            if task_ids is None:
                if not self.single_task:
                    raise ValueError(f"per-row losses need task_ids (one of {self.tasks} per row); or pass a "
                                     "dict {task: loss}")
                task_ids = torch.zeros(losses.numel() if losses.dim() == 1 else 0, dtype=torch.long)
            split_backward.run(self, losses, task_ids, row_weights, retain_graph)
            self._task_grads.calls += 1
            return
        if task_ids is not None or row_weights is not None:
            raise ValueError("task_ids and row_weights go with a 1-D tensor of per-row losses, not a dict")
        counts = self._task_grads.check_inputs(losses, num_samples)
        self._task_grads.begin("dict")
        params = [p for p in self._all_params if p.requires_grad]
        keep = retain_flags([losses[t] for t in self.tasks], retain_graph)  # shared forward graph?
        if self._stash_mode == "projected":
            self._backward_projected(losses, counts, params, keep)
        else:
            for i, t in enumerate(self.tasks):
                if counts[t] == 0:
                    continue  # no samples of this task in this call: its gradient has weight 0
                grads = torch.autograd.grad(losses[t], params, retain_graph=keep[i], allow_unused=True)
                self._task_grads.add(t, params, grads, float(losses[t].detach()), counts[t])
        self._task_grads.calls += 1

    def _backward_projected(self, losses, counts: dict[str, float], params: list[Tensor], keep: list[bool]) -> None:
        """``stash="projected"``: every parameter's gradient is handled the moment autograd has accumulated it
        (a post-accumulate-grad hook), so no full set of task gradients is ever alive.

        A targeted weight with bases is projected at once onto [B_sh, B_t] and only its coordinates are kept.
        A weight due for a refresh keeps the full gradients of the first T−1 tasks; when the last task's
        gradient arrives its bases are refreshed from this call's gradients and all T are projected (on CUDA
        together with other due weights, up to REFRESH_BATCH_BYTES, or after the last backward: a refresh that
        raises there leaves the batches before it refreshed, and the call must be redone after zero_grad; with
        gradient accumulation the bases come from the first micro-batch of the step; under DDP the refresh
        waits for the step, where the gradients are averaged first). Other parameters keep full gradients."""
        stash = self._task_grads
        total = sum(counts.values())
        mix = [counts[t] / total for t in self.tasks]
        by_id = {id(w.param): w for w in self._subspaces}
        # the bases of a due weight come from this call's gradients only if every task is in it (a micro-batch
        # without some task would give that task a basis from a zero gradient); otherwise, and under DDP,
        # the full gradients wait for the step
        refresh_here = not distributed.should_sync(self.sync) and all(counts[t] > 0 for t in self.tasks)
        due = {k for k, w in by_id.items() if w.step >= w.next_refresh and k not in stash.refreshed}
        # due weights whose last task gradient has arrived, refreshed together once they hold REFRESH_BATCH_BYTES
        # of gradients (CUDA) or at once (CPU), as step() does; autograd runs the hooks of each device on its
        # own thread, hence the lock
        pending = self._backward_refresh_batch()
        lock = threading.Lock()
        held = {}
        for p in params:  # the user's own .grad (if any) is set aside, untouched
            held[id(p)] = p.grad
            p.grad = None
        last_task = self.tasks[-1]

        def on_grad(p: Tensor, task: str) -> None:
            g, p.grad = p.grad, None
            w = by_id.get(id(p))
            if w is not None and id(p) in stash.nonfinite:
                return  # skipped this step whatever comes next: no refresh, no state change
            if w is None or (id(p) in due and not (refresh_here and task == last_task)):
                stash.add_full(task, p, g, alpha=alphas[task])
            elif id(p) in due:
                earlier = [stash.grads[t].pop(id(p), None) for t in self.tasks[:-1]]  # already weighted
                g = g if alphas[task] == 1.0 else g * alphas[task]
                item = self._backward_refresh_job(w, [*earlier, g], mix)
                if item is not None:
                    with lock:
                        pending.add(item, p.device)
            else:
                self._stash_projected(w, task, g, alphas[task])

        alphas = {}
        try:
            for i, t in enumerate(self.tasks):
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

    def _backward_refresh_batch(self) -> RefreshBatch:
        """Due weights refreshed in backward, together (see _backward_projected)."""
        return RefreshBatch(self._refresh_in_backward, lambda item: _held_bytes(*item))

    def _stash_projected(self, w: WeightSubspaces, task: str, g: Tensor, alpha: float = 1.0) -> None:
        # no host sync here (this runs inside autograd): a NaN/Inf gradient makes its squared norm non-finite,
        # and step() checks all of them at once (a gradient whose norm overflows counts as non-finite too)
        sq = _norm(g).float().square()
        self._task_grads.add_projected(task, id(w.param), self._coordinates(w, task, g), sq, alpha)

    def _coordinates(self, w: WeightSubspaces, task: str, g: Tensor) -> Tensor:
        """One raw task gradient → its coordinates against [B_sh, B_t] (``nullspace_mode="gradient"``: after
        removing the protected directions, as the full-stash step does before projecting)."""
        g = g.float()
        if self.nullspace_mode == "gradient" and w.protected is not None:
            g = nsp.project_gradient(g, w.protected, w.protect_side)
        return reference.project(g, self._task_bases(w, task), w.side)

    def _backward_refresh_job(self, w: WeightSubspaces, grads: list[Tensor | None],
                              mix: list[float]) -> tuple[RefreshJob, list[Tensor]] | None:
        """The refresh job of a due weight from this call's task gradients, and the gradients to project once
        it is done (None for a non-finite gradient: the weight is skipped this step)."""
        grads = [g if g is not None else torch.zeros_like(w.param) for g in grads]
        if not all(_finite(g) for g in grads):
            self._task_grads.nonfinite.add(id(w.param))
            return None
        used = grads
        if self.nullspace_mode == "gradient" and w.protected is not None:
            used = [nsp.project_gradient(g, w.protected, w.protect_side) for g in grads]
        shared = reference.shared_gradient(used, mix) if len(used) > 1 else used[0].float()
        return RefreshJob(w, shared, dict(zip(self.tasks, used)), self._generator(w)), grads

    def _refresh_in_backward(self, pending: list[tuple[RefreshJob, list[Tensor]]]) -> None:
        """Refresh the pending weights together, then stash their gradients projected; empties ``pending``."""
        jobs = [job for job, _ in pending]
        todo = [(job.w, grads) for job, grads in pending]
        pending.clear()
        self._install(self._refresh(jobs))  # _refresh empties jobs: the shared gradients are freed here
        for w, grads in todo:
            self._task_grads.refreshed.add(id(w.param))
            for t, g in zip(self.tasks, grads):
                self._stash_projected(w, t, g)

    def _task_bases(self, w: WeightSubspaces, task: str) -> Tensor:
        """[B_sh, B_t] (work bases): one projection gives the shared and the task coordinates."""
        return torch.cat([w.work_bases[SHARED], w.work_bases[task]], dim=1) if w.ranks[task] else w.work_bases[SHARED]

    def shared_grad_norm(self) -> float:
        """L2 norm, over every parameter, of the shared gradient Σ_t (N_t/N)·G_t the stash holds now."""
        # fp64 sums: a finite gradient of 1e20 has a squared norm past fp32's range (torch's clip_grad_norm_
        # would report inf and zero the gradients; this one clips them)
        stash = self._task_grads
        if stash.empty:
            return math.sqrt(sum(float(torch.linalg.vector_norm(p.grad, dtype=torch.float64)) ** 2
                                 for p in self._all_params if p.grad is not None))
        stash.finalise()
        weights = stash.shared_weights()
        total = 0.0
        for p in self._all_params:
            grads = [stash.grads[t].get(id(p)) for t in self.tasks]
            if any(g is not None for g in grads):
                shared = reference.shared_gradient([g if g is not None else torch.zeros_like(p) for g in grads], weights)
                total += float(torch.linalg.vector_norm(shared, dtype=torch.float64)) ** 2
        total += sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in stash.mixed.values())
        return math.sqrt(total + self._projected_shared_sq(weights))

    def _projected_shared_sq(self, weights: list[float]) -> float:
        """‖Σ_t w_t·G_t‖² of the weights held as coordinates (``stash="projected"``), estimated from what was
        kept: Σ_t w_t²‖G_t‖² + 2Σ_{s<t} w_s·w_t·⟨G_s, G_t⟩, the cross-task terms measured in the shared
        subspace (exact when the tasks' gradients overlap only there, as the shared basis is built to capture).
        ‖G_t‖² is exact for one micro-batch; across micro-batches its cross terms are measured in [B_sh, B_t]
        (see TaskGradients.add_projected)."""
        stash = self._task_grads
        terms: list[Tensor] = []
        for w in self._subspaces:
            key = id(w.param)
            shared = []
            for t, wt in zip(self.tasks, weights):
                if key in stash.sqnorms[t]:
                    terms.append(stash.sqnorms[t][key] * (wt * wt))
                    shared.append(_split(w, stash.coords[t][key])[0] * wt)
            for i in range(len(shared)):
                for j in range(i + 1, len(shared)):
                    terms.append(2 * (shared[i] * shared[j]).sum())
        return max(sum(_read_scalars(terms)), 0.0)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip like ``torch.nn.utils.clip_grad_norm_`` on the shared (mixed-batch) gradient: when its norm
        exceeds ``max_norm``, every stashed task gradient is scaled by the same factor (which leaves the
        gates, built from norm shares, unchanged). Returns the norm before clipping."""
        norm = self.shared_grad_norm()
        if math.isfinite(norm) and norm > max_norm > 0:
            coef = max_norm / (norm + 1e-6)
            if self._task_grads.empty:
                for p in self._all_params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
            self._task_grads.scale_(coef)
        return torch.tensor(norm)

    def _gather_gradients(self) -> tuple[dict[int, list[Tensor | None]], list[float]]:
        """Per targeted weight (by id) its task gradients, and the shared-gradient weights w_t.

        Also sets ``.grad`` of every non-targeted parameter to its shared gradient for the inner step."""
        stash = self._task_grads
        if stash.empty:
            if not self.single_task and any(w.param.grad is not None for w in self._subspaces):
                raise RuntimeError(f"GEMS has {len(self.tasks)} tasks: call opt.backward({{task: loss}}) "
                                   "instead of loss.backward() so each task's gradient is known")
            return {id(w.param): [w.param.grad] for w in self._subspaces}, [1.0]
        foreign = [self._param_name(p) for p in self._all_params if p.grad is not None]
        if foreign:
            # opt.backward's gradients and a .grad from loss.backward() cannot both be meant: refuse rather
            # than drop one of them silently
            raise RuntimeError(f"{len(foreign)} parameter(s) have a .grad (from loss.backward()?) while "
                               f"opt.backward() gradients are stashed: {', '.join(foreign[:5])}. Put every "
                               "loss into opt.backward (as a task's loss) or call opt.zero_grad() first")
        stash.finalise()
        if distributed.should_sync(self.sync):
            distributed.all_reduce_task_gradients(stash, self._all_params, self._coordinate_layout(),
                                                  plain=self._plain_params)
        weights = stash.shared_weights()
        per_weight = {}
        for w in self._subspaces:
            per_weight[id(w.param)] = [stash.grads[t].get(id(w.param)) for t in self.tasks]
        plain, plain_grads = [], []
        for p in self._plain_params:
            if id(p) in stash.mixed:  # one-backward form: the mixed gradient itself
                p.grad = stash.mixed[id(p)].to(p.dtype)
                continue
            grads = [stash.grads[t].get(id(p)) for t in self.tasks]
            if all(g is None for g in grads):
                p.grad = None
                continue
            plain.append(p)
            plain_grads.append([g if g is not None else torch.zeros_like(p) for g in grads])
        for p, combined in zip(plain, _shared_gradients(plain_grads, weights)):
            p.grad = combined.to(p.dtype)
        return per_weight, weights

    def _coordinate_layout(self) -> dict[int, dict[str, tuple[int, int]]]:
        """For ``stash="projected"``: the weights whose task gradients are held as coordinates this step and
        the coordinate shape per task (the same on every rank: under DDP nothing is refreshed in backward)."""
        if self._stash_mode != "projected":
            return {}
        return {id(w.param): {t: reference.coord_shape(w.param.shape, w.side, w.ranks[SHARED] + w.ranks[t])
                              for t in self.tasks}
                for w in self._subspaces if w.bases[SHARED] is not None and w.step < w.next_refresh}

    def _checked_sqnorms(self, per_weight: dict[int, list[Tensor | None]]
                         ) -> tuple[dict[int, list[float] | None], set[int]]:
        """Per targeted weight, ‖G_t‖² of each task gradient (0 where a task has none), or None when one of
        them is not finite; and the ids of the non-targeted parameters whose ``.grad`` is not finite. One
        2-norm per gradient serves the gates and the finiteness check alike (a finite norm proves every
        element finite; a non-finite one is re-checked with max|x|, since a huge but finite gradient can
        overflow the sum of squares), and all norms are read back in one go."""
        stash = self._task_grads
        out: dict[int, list[float] | None] = {key: [0.0] * len(grads) for key, grads in per_weight.items()}
        where, grads_flat = [], []
        for key, grads in per_weight.items():
            for i, g in enumerate(grads):
                if g is not None:
                    where.append((key, i))
                    grads_flat.append(g)
        plain = [p for p in self._plain_params if p.grad is not None]
        # stash="projected": the squared norms taken in backward are checked here, in the same transfer
        held = [(i, key) for i, t in enumerate(self.tasks) for key in stash.sqnorms[t]]
        values = _read_scalars(_norms(grads_flat + [p.grad for p in plain])
                               + [stash.sqnorms[self.tasks[i]][key] for i, key in held])
        plain_values = values[len(where):len(where) + len(plain)]
        bad_plain = {id(p) for p, v in zip(plain, plain_values) if not math.isfinite(v) and not _finite(p.grad)}
        for (key, i), v in zip(where, values):
            if out[key] is None:
                continue
            if not math.isfinite(v) and not _finite(per_weight[key][i]):
                out[key] = None
                continue
            out[key][i] = v * v
        projected = values[len(where) + len(plain):]
        stash.nonfinite.update(key for (_, key), v in zip(held, projected) if not math.isfinite(v))
        for (i, key), v in zip(held, projected):
            if key not in stash.nonfinite:
                out.setdefault(key, [0.0] * len(self.tasks))[i] += v
        return out, bad_plain

    def _gates(self, sqnorms: dict[int, list[float] | None]) -> list[float]:
        if self.single_task or not isinstance(self.gating, str) or self.gating == "uniform":
            return compute_gates(self.gating, self.tasks, None, None, None)
        sq = [0.0] * len(self.tasks)
        for per_task in sqnorms.values():
            if per_task is not None:
                for i, v in enumerate(per_task):
                    sq[i] += v
        norms = [math.sqrt(s) for s in sq]
        return compute_gates(self.gating, self.tasks, self._task_grads.mean_losses(), norms,
                             [self._task_grads.samples[t] for t in self.tasks])

    # ----------------------------------------------------------------------------------------------
    # the step
    def _generator(self, w: WeightSubspaces) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + w.index * 7919 + w.step)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One GEMS step: refresh bases every ``update_proj_gap`` steps, project every task gradient, run
        the inner optimizer on all coordinates (and on the non-targeted parameters), map back, decay.

        A weight whose gradient is not finite is skipped (no refresh, no inner step, no decay; weight and
        state untouched) and listed in ``opt.last_skipped`` with a warning. ``opt.backward``'s gradients are
        consumed: a second step without a new ``opt.backward`` steps nothing. A step that raises (a failed
        refresh) changes nothing and can be retried."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from_stash = not self._task_grads.empty
        per_weight, shared_w = self._gather_gradients()
        try:
            self._step(per_weight, shared_w)
        except BaseException:
            if from_stash:  # the shared .grad written for the other parameters is rebuilt by a retry
                for p in self._plain_params:
                    p.grad = None
            raise
        return loss

    def _step(self, per_weight: dict[int, list[Tensor | None]], shared_w: list[float]) -> None:
        sqnorms, bad_plain = self._checked_sqnorms(per_weight)
        gates = self._gates(sqnorms)
        self.last_gates = dict(zip(self.tasks, gates))
        skipped: list[str] = []
        work: list[tuple[WeightSubspaces, Tensor, list[Tensor]]] = []
        refreshed: list[tuple[WeightSubspaces, dict[str, Tensor]]] = []
        # weights due for a refresh, refreshed together; installed only once every refresh of the step succeeded
        pending = RefreshBatch(lambda jobs: refreshed.extend(self._refresh(jobs)), RefreshJob.nbytes)
        stash = self._task_grads
        for w in self._subspaces:
            if id(w.param) in stash.nonfinite:
                skipped.append(w.name)
                continue
            grads = per_weight.get(id(w.param))
            coords = [stash.coords[t].get(id(w.param)) for t in self.tasks]
            if any(c is not None for c in coords):  # stash="projected": coordinates only
                if grads is not None and any(g is not None for g in grads):
                    coords = self._merge_late_full(w, grads, coords)
                    if coords is None:
                        skipped.append(w.name)
                        continue
                work.append((w, shared_w, coords, True))
                continue
            if grads is None or all(g is None for g in grads):
                continue  # no gradient at all: like torch, the weight is not stepped
            if sqnorms[id(w.param)] is None:
                skipped.append(w.name)
                continue
            grads = [g if g is not None else torch.zeros_like(w.param) for g in grads]
            if self.nullspace_mode == "gradient" and w.protected is not None:
                grads = [nsp.project_gradient(g, w.protected, w.protect_side) for g in grads]
            if w.step >= w.next_refresh:  # the full shared gradient is only ever built for a refresh
                shared = reference.shared_gradient(grads, shared_w) if len(grads) > 1 else grads[0].float()
                pending.add(RefreshJob(w, shared, dict(zip(self.tasks, grads)), self._generator(w)), w.param.device)
                del shared
            work.append((w, shared_w, grads, False))
        pending.finish()
        self._install(refreshed)
        del refreshed
        for p in self._plain_params:
            if p.grad is not None and id(p) in bad_plain:
                skipped.append(self._plain_name(p))
                p.grad = None
        if self._fused_adam():
            fused, rest = [], []
            for item in work:
                (rest if self._backend_for(item[0]) == "torch" else fused).append(item)
            deltas, leftover = self._fused_project_adam(fused, shared_w)
            # the other weights (backend="auto" keeps large ones on torch, and any the kernels left) and the
            # non-targeted parameters; the fused weights' coordinates have no gradient and are skipped
            deltas.update(self._inner_step(rest + leftover))
        else:
            deltas = self._inner_step(work)
        self._write_updates(work, deltas, gates)
        if not stash.empty:
            # opt.backward's gradients are consumed by the step, the shared .grad GEMS gave the other
            # parameters included: a second step() without a new opt.backward steps nothing, targeted or not
            # (the HF Trainer clears grads with model.zero_grad(), which never reaches GEMS' stash)
            for p in self._plain_params:
                p.grad = None
        self.last_skipped = skipped
        if skipped:
            warnings.warn(f"GEMS skipped {len(skipped)} parameter(s) with non-finite gradients this step "
                          f"(weights and state untouched): {', '.join(skipped[:8])}", RuntimeWarning, stacklevel=3)
        self._task_grads.clear()

    def _refresh(self, jobs: list[RefreshJob]) -> list[tuple[WeightSubspaces, dict[str, Tensor]]]:
        """(weight, new bases) for the jobs, not yet assigned. Empties ``jobs``, so the shared gradients built
        for the refresh are freed before the step goes on."""
        if not jobs:
            return []
        news = refresh_bases(jobs, task_basis=self.task_basis, method=self.refresh_method, warm_start=self.warm_start,
                             basis_signs=self.basis_signs)
        done = [(j.w, new) for j, new in zip(jobs, news)]
        jobs.clear()
        return done

    def _install(self, refreshed: list[tuple[WeightSubspaces, dict[str, Tensor]]]) -> None:
        """Give the weights their new bases, once every refresh of the step succeeded (rank 0's under DDP),
        then move the inner state into them and schedule the next refresh."""
        swapped = []
        for w, new in refreshed:
            swapped.append((w, dict(w.bases)))
            w.bases.update(new)
        if swapped and distributed.should_sync(self.sync):
            distributed.broadcast_bases([w for w, _ in swapped])
        for w, old in swapped:
            self._after_refresh(w, old)

    def _after_refresh(self, w: WeightSubspaces, old: dict[str, Tensor | None]) -> None:
        if self.adaptive_refresh is not None:
            similar = w.basis_similarity(old) >= self.adaptive_refresh
            w.gap_factor = min(2 * w.gap_factor, MAX_GAP_FACTOR) if similar else 1
        gap = self.update_proj_gap * w.gap_factor
        if self.refresh_schedule == "staggered" and old.get(SHARED) is None:
            # first bases: weight i refreshes next after (i+1)/N of a gap, so later refreshes are spread one
            # weight (or a few) per step instead of all weights on the same step (no stall, no memory spike)
            gap = max(1, ((w.index + 1) * self.update_proj_gap) // len(self._subspaces))
        w.next_refresh = w.step + gap
        w.transfer_state(old, self.inner.state, self.state_transfer)
        w.fold_nullspace(self.nullspace_mode)

    def _merge_late_full(self, w: WeightSubspaces, grads, coords) -> list[Tensor | None] | None:
        """A projected weight that also got full gradients (a task that first reached it in a later
        micro-batch of a refresh step): project those too. None if one is not finite."""
        out = list(coords)
        for i, (t, g) in enumerate(zip(self.tasks, grads)):
            if g is None:
                continue
            if not _finite(g):
                return None
            proj = self._coordinates(w, t, g)
            out[i] = proj if out[i] is None else out[i].add_(proj)
        return out

    def _inner_step(self, work) -> dict[int, dict[str, Tensor]]:
        """Generic path, any inner optimizer: coordinates get the projected gradients, the inner optimizer
        steps, and each coordinate's new value is its update δ."""
        # every coordinate tensor is a view of one zero-filled buffer per device (one fill, not one per tensor)
        spans, totals = {}, {}
        for w, *_ in work:
            start, n = totals.get(w.param.device, 0), w.coord_numel()
            spans[w.index] = slice(start, start + n)
            totals[w.param.device] = start + n
        storage = {d: torch.zeros(n, dtype=torch.float32, device=d) for d, n in totals.items()}
        for w, shared_w, grads, projected in work:
            w.materialize_coords(storage[w.param.device][spans[w.index]])
            projs = grads if projected else self._task_projections(w, grads)
            for s, r in self._combine(w, projs, shared_w).items():
                w.coords[s].grad = r
        try:
            self.inner.step()
        except BaseException:
            for w, *_ in work:
                w.release_coords()
            raise
        deltas = {}
        for w, *_ in work:
            deltas[w.index] = {s: w.coords[s].data for s in w.subspaces()}
            for c in w.coords.values():
                c.grad = None
        return deltas

    def _task_projections(self, w: WeightSubspaces, grads: list[Tensor]) -> list[Tensor]:
        """Each task gradient read once against [B_sh, B_t] (the shared gradient is never materialised)."""
        return [reference.project(g.float(), self._task_bases(w, t), w.side) for t, g in zip(self.tasks, grads)]

    def _combine(self, w: WeightSubspaces, projs: list[Tensor | None], shared_w: list[float]) -> dict[str, Tensor]:
        """Coordinates of every subspace's gradient from each task's [B_sh, B_t] coordinates:
        R_sh = Σ_t w_t·B_shᵀG_t and R_t = B_tᵀG_t (a task without gradient contributes zeros)."""
        out: dict[str, Tensor] = {}
        for t, proj, wt in zip(self.tasks, projs, shared_w):
            if proj is None:
                if w.ranks[t]:
                    out[t] = torch.zeros(w.coord_shape(t), device=w.param.device)
                continue
            part_sh, part_t = _split(w, proj)
            if SHARED in out:
                out[SHARED].add_(part_sh, alpha=wt)
            else:
                out[SHARED] = part_sh.mul(wt) if len(projs) > 1 else part_sh.contiguous()
            if w.ranks[t]:
                out[t] = part_t.contiguous()
        if SHARED not in out:
            out[SHARED] = torch.zeros(w.coord_shape(SHARED), device=w.param.device)
        return out

    def _fused_adam(self) -> bool:
        """Whether the kernel backend can run the whole subspace step itself: torch Adam/AdamW with the
        standard flags, whose state tensors (step, exp_avg, exp_avg_sq) it then updates directly."""
        if self.backend == "torch" or self._stash_mode == "projected" or type(self.inner) not in (torch.optim.Adam, torch.optim.AdamW):
            return False
        return all(not g.get("amsgrad") and not g.get("maximize") and not g.get("capturable")
                   and not g.get("differentiable") for g in self.inner.param_groups)

    def _backend_for(self, w: WeightSubspaces) -> str:
        """The backend that steps weight ``w``: the resolved one, except that backend="auto" keeps the weights
        for which the kernel backend was measured slower on torch (gems.dispatch.auto_backend_for)."""
        if not self._auto_backend:
            return self.backend
        return auto_backend_for(self.backend, tuple(w.param.shape), w.param.dtype, sum(w.ranks.values()))

    def _fused_project_adam(self, work, shared_w) -> tuple[dict[int, dict[str, Tensor]], list]:
        """Projection + Adam of the fused weights by the kernel backend, one launch per group of weights that
        share shape, dtype, side, ranks, param group and inner step count. Returns the δ and the work items
        left to the generic path: a weight whose subspaces' inner step counters disagree (one launch applies
        one bias correction)."""
        mod = backend_module(self.backend)
        names = self._all_subspace_names()
        current = self._buffered_steps()
        groups: dict[tuple, list] = {}
        leftover = []
        for item in work:
            w, _, grads, _ = item
            for c in w.coords.values():
                c.grad = None
            per, steps = [], set()
            for sub in names:
                if w.ranks[sub] == 0:  # the contract keeps every subspace in place, empty ones included
                    per.append({name: self._placeholder(w.coord_shape(sub), w.param.device, name)
                                for name in ("exp_avg", "exp_avg_sq")})  # distinct, like real moments
                    continue
                st = self.inner.state[w.coords[sub]]
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
            groups.setdefault(key, []).append((w, grads, per))
        deltas = {}
        counted: list[dict[str, Any]] = []  # inner states the kernels stepped
        for key, members in groups.items():
            group = members[0][0].group
            beta1, beta2 = group["betas"]
            out = mod.project_adam(
                [g for _, g, _ in members], list(shared_w),
                [self._kernel_bases(w) for w, *_ in members],
                [[st["exp_avg"] for st in per] for _, _, per in members],
                [[st["exp_avg_sq"] for st in per] for _, _, per in members],
                side=members[0][0].side, step=int(key[-1]) + 1, lr=float(group["lr"]),
                beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]))
            for (w, _, per), ds in zip(members, out):
                deltas[w.index] = dict(zip(names, ds))
                counted += [st for st in per if "step" in st]  # not the rank-0 placeholders
        self._advance_step_counters(counted)
        return deltas, leftover

    def _buffered_steps(self) -> dict[int, float]:
        """Current values of the step counters held in the step buffer, by counter object id (one read)."""
        buf, views = self._step_buffer
        return dict(zip(map(id, views), buf.tolist())) if views else {}

    def _advance_step_counters(self, states: list[dict[str, Any]]) -> None:
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
        buf, views = self._step_buffer
        if len(views) == len(counters) and all(a is b for a, b in zip(views, counters)):
            buf.add_(1)
            return
        torch._foreach_add_(counters, 1)
        if all(c.dim() == 0 and c.device.type == "cpu" and c.dtype == counters[0].dtype for c in counters):
            buf = torch.stack(counters)
            views = list(buf.unbind(0))
            for st, v in zip(states, views):
                st["step"] = v
            self._step_buffer = (buf, views)

    def _all_subspace_names(self) -> list[str]:
        return [SHARED, *self.tasks]

    def _kernel_bases(self, w: WeightSubspaces) -> list[Tensor]:
        """Bases of all S subspaces in contract order; a rank-0 task gets a d×0 basis."""
        return [w.work_bases[s] if w.ranks[s] else
                self._placeholder((reference.side_dim(w.param.shape, w.side), 0), w.param.device, "basis")
                for s in self._all_subspace_names()]

    def _placeholder(self, shape: tuple[int, ...], device: torch.device, role: str) -> Tensor:
        """The zero-size fp32 tensor that stands for a rank-0 subspace's basis or moment (``role``)."""
        key = (role, tuple(shape), device)
        if key not in self._placeholders:
            self._placeholders[key] = torch.zeros(shape, dtype=torch.float32, device=device)
        return self._placeholders[key]

    def _coefficients(self, w: WeightSubspaces, gates: list[float]) -> list[float]:
        return [self.scale if s == SHARED else self.scale * gates[self.tasks.index(s)] for s in w.subspaces()]

    def _decay_basis(self, w: WeightSubspaces) -> Tensor | None:
        if w.protected is None or self.nullspace_weight_decay == "full":
            return None
        return w.protected

    def _write_updates(self, work, deltas: dict[int, dict[str, Tensor]], gates: list[float]) -> None:
        """W ← W − lr·wd·D(W) + Σ_s c_s·B'_s·δ_s for every stepped weight, through the backend (kernels get
        every weight of one shape, dtype, side, ranks and param group in one call)."""
        batches: dict[tuple, list] = {}
        for w, *_ in work:
            ds = deltas[w.index]
            if w.delta_projector is not None:
                ds = {s: nsp.project_update(d, w.delta_projector, w.protect_side) for s, d in ds.items()}
            if self.track_update_stats:
                self._record_update_stats(w, ds, self._coefficients(w, gates))
            lr, wd = float(w.group["lr"]), float(w.group.get("weight_decay", 0.0))
            backend = self._backend_for(w)
            if backend == "torch":
                self._apply_torch(w, ds, self._coefficients(w, gates), lr, wd)
            else:
                key = (backend, tuple(w.param.shape), w.param.dtype, w.side, tuple(w.ranks.items()), id(w.group),
                       w.protect_side)
                batches.setdefault(key, []).append((w, ds))
        for (backend, *_), members in batches.items():
            mod = backend_module(backend)
            w0 = members[0][0]
            names = self._all_subspace_names()
            mod.back_project_update(
                [w.param for w, _ in members], [self._kernel_bases(w) for w, _ in members],
                [self.scale] + [self.scale * g for g in gates],
                [[ds[s] if s in ds else torch.zeros(w.coord_shape(s), device=w.param.device) for s in names]
                 for w, ds in members],
                side=w0.side, lr=float(w0.group["lr"]), weight_decay=float(w0.group.get("weight_decay", 0.0)),
                decay_bases=[self._decay_basis(w) for w, _ in members], decay_side=nsp.acts_on(w0.protect_side))
        for w, *_ in work:
            w.release_coords()
            w.step += 1

    def _apply_torch(self, w: WeightSubspaces, ds: dict[str, Tensor], coeffs: list[float], lr: float, wd: float) -> None:
        """W ← (1 − lr·wd)·W + Σ_s c_s·B'_s·δ_s on the torch backend.

        An fp32 weight without null-space-aware decay takes it as one in-place GEMM over the concatenated,
        gate-scaled bases (W.addmm_): no full-size temporary and one pass over W, instead of one product
        per subspace plus separate decay and add passes."""
        subs = w.subspaces()
        decay_basis = self._decay_basis(w)
        if w.param.dtype == torch.float32 and (decay_basis is None or wd == 0 or lr == 0):
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
        reference.apply_update(w.param, update, lr=lr, weight_decay=wd, decay_basis=decay_basis,
                               decay_side=nsp.acts_on(w.protect_side))

    def _plain_name(self, p: Tensor) -> str:
        return f"param{next(i for i, q in enumerate(self._plain_params) if q is p)} {tuple(p.shape)}"

    def _param_name(self, p: Tensor) -> str:
        w = next((w for w in self._subspaces if w.param is p), None)
        return w.name if w is not None else self._plain_name(p)

    # ----------------------------------------------------------------------------------------------
    # null space and diagnostics
    def _attach_nullspace(self, model: nn.Module | None) -> None:
        ns = self.nullspace
        if ns is None:
            return
        if model is not None:
            ns.check_compatible(model)
        protected = 0
        for w in self._subspaces:
            module = w.name.removesuffix(".weight")
            if module in ns:
                q = ns.basis(module)
                if q is not None and q.shape[1] > 0:
                    w.protected = q.to(device=w.param.device, dtype=torch.float32)
                    protected += 1
            w.protect_side = ns.protect_side
        if model is not None:
            self._refuse_unprotected(unwrap(model), ns)
        if protected == 0:
            warnings.warn("the null space protects none of the targeted weights (module names differ, or "
                          "every protected dimension is 0): updates are unconstrained", stacklevel=3)

    def _refuse_unprotected(self, model: nn.Module, ns: "nsp.NullSpace") -> None:
        """A module the null space protects but GEMS does not target would get the inner optimizer's plain,
        unconstrained update: refuse, naming the modules, instead of silently breaking the guarantee."""
        targeted = {w.name.removesuffix(".weight") for w in self._subspaces}
        trainable = {id(p) for p in self._inner_params() if p.requires_grad}
        loose = [name for name, mod in model.named_modules()
                 if name in ns and name not in targeted and ns.basis(name) is not None
                 and isinstance(getattr(mod, "weight", None), Tensor) and id(mod.weight) in trainable]
        if loose:
            raise ValueError(f"the null space protects {len(loose)} module(s) that GEMS does not target, whose "
                             f"updates would leave the null space: {', '.join(loose[:8])}. Target them "
                             "(target_modules=), freeze them, or calibrate the null space for the targeted "
                             "modules only")

    def _record_update_stats(self, w: WeightSubspaces, ds: dict[str, Tensor], coeffs: list[float]) -> None:
        """Leakage of the update that is applied, and the share of the raw update that the null-space
        projection removed (raw: the same δ mapped back through the unprojected bases)."""
        applied = sum(c * reference.project_back(ds[s], w.work_bases[s], w.side) for s, c in zip(w.subspaces(), coeffs))
        raw = sum(c * reference.project_back(ds[s], w.bases[s], w.side) for s, c in zip(w.subspaces(), coeffs))
        stats = {}
        if w.protected is not None:
            stats["leakage"] = nsp.leakage(applied, w.protected, w.protect_side)
            norm = float(raw.norm())
            stats["nullspace_removed"] = float((raw - applied).norm()) / norm if norm > 0 else 0.0
        self._update_stats[w.name] = stats

    def diagnostics(self) -> dict[str, float]:
        """Per targeted weight scalars, flat and ready for any logger (opt-in, computed on call).

        Call it after ``opt.backward`` and before ``opt.step`` to get gradient diagnostics for the current
        step: cosine between each pair of task gradients (``<weight>/cos/<a>-<b>``), conflict ratio, energy
        of each gradient captured by the shared and by its own subspace, the smallest principal angle
        between the shared and each task subspace; plus the gates (``gate/<task>``). With ``stash="projected"``
        the full task gradients are gone: a projected weight reports ``<weight>/cos_shared/<a>-<b>``, the
        cosine between the tasks' gradients inside the shared subspace (B_shᵀG_a vs B_shᵀG_b), instead. Set
        ``opt.track_update_stats = True`` to also get, for protected weights, the null-space leakage of the
        last applied update and the share of it the projection removed."""
        per_layer: dict[str, dict[str, float]] = {}
        stash = self._task_grads
        for w in self._subspaces:
            grads = {} if stash.empty else {t: stash.grads[t][id(w.param)] for t in self.tasks
                                             if id(w.param) in stash.grads[t]}
            bases = {s: w.bases[s] for s in w.subspaces() if w.bases[s] is not None}
            entry = diag.layer_diagnostics(grads, bases=bases or None, side=w.side,
                                           shared_grad=reference.shared_gradient(list(grads.values()), stash.shared_weights())
                                           if len(grads) == len(self.tasks) and grads else None) if (grads or bases) else {}
            coords = {t: stash.coords[t][id(w.param)] for t in self.tasks if id(w.param) in stash.coords[t]}
            if len(coords) >= 2:  # stash="projected": the tasks compared inside the shared subspace
                entry["cos_shared"] = diag.gradient_cosines({t: _split(w, c)[0] for t, c in coords.items()})
            entry.update(self._update_stats.get(w.name, {}))
            if entry:
                per_layer[w.name.removesuffix(".weight")] = entry
        return diag.flatten_diagnostics(per_layer, self.last_gates)

    # ----------------------------------------------------------------------------------------------
    # checkpoints
    def _config(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "rank": self.rank, "task_rank": self.task_rank,
                "update_proj_gap": self.update_proj_gap, "scale": self.scale, "proj_type": self.proj_type,
                "task_basis": self.task_basis, "refresh": self.refresh_method,
                "state_transfer": self.state_transfer, "adaptive_refresh": self.adaptive_refresh,
                "stash": self.stash, "refresh_schedule": self.refresh_schedule, "warm_start": self.warm_start,
                "basis_signs": self.basis_signs,
                "target_embeddings": self.target_embeddings,
                "gating": dict(self.gating) if isinstance(self.gating, dict) else self.gating}

    @staticmethod
    def _check_saved_weight(w: WeightSubspaces, s: Any) -> None:
        """One saved weight's entry fits ``w``: keys, shape, side, ranks, and finite orthonormal bases."""
        lacking = [k for k in ("shape", "step", "bases") if not isinstance(s, Mapping) or k not in s]
        if lacking:
            raise ValueError(f"state dict entry for {w.name} lacks {lacking}")
        if list(s["shape"]) != list(w.param.shape) or s.get("side", w.side) != w.side:
            raise ValueError(f"state dict weight {s.get('name')} {tuple(s['shape'])} does not match "
                             f"{w.name} {tuple(w.param.shape)} (side {w.side})")
        if "ranks" in s and dict(s["ranks"]) != w.ranks:
            raise ValueError(f"{w.name}: saved ranks {dict(s['ranks'])} differ from {w.ranks}")
        unknown = sorted(set(s["bases"]) - set(w.bases))
        if unknown:
            raise ValueError(f"{w.name}: saved bases for unknown subspaces {unknown}")
        dim = reference.side_dim(w.param.shape, w.side)
        for name, b in s["bases"].items():
            if not isinstance(b, Tensor) or tuple(b.shape) != (dim, w.ranks[name]):
                raise ValueError(f"{w.name}: saved {name} basis has shape {tuple(getattr(b, 'shape', ()))}, "
                                 f"expected {(dim, w.ranks[name])}")
            if not b.is_floating_point() or not bool(torch.isfinite(b).all()):
                raise ValueError(f"{w.name}: saved {name} basis is not a finite floating-point tensor")
            err = float((b.double().T @ b.double() - torch.eye(b.shape[1], dtype=torch.float64, device=b.device))
                        .abs().max()) if b.shape[1] else 0.0
            if err > 1e-3:
                raise ValueError(f"{w.name}: saved {name} basis is not orthonormal (max |BᵀB − I| = {err:.1e})")

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: loads with ``torch.load(weights_only=True)``."""
        weights = []
        for w in self._subspaces:
            weights.append({"name": w.name, "shape": list(w.param.shape), "side": w.side, "ranks": dict(w.ranks),
                            "step": torch.tensor(w.step, dtype=torch.int64),
                            "next_refresh": w.next_refresh, "gap_factor": w.gap_factor,
                            "bases": {s: b.clone() for s, b in w.bases.items() if b is not None}})
        return {"format_version": FORMAT_VERSION, "config": self._config(), "seed": self.seed,
                "last_gates": dict(self.last_gates), "weights": weights, "inner": self.inner.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore bases, steps and the inner optimizer's state; bases and coordinate moments stay fp32.

        The whole dict is checked first (keys, shapes, ranks, finite orthonormal bases), so a bad checkpoint
        raises and loads nothing."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = [k for k in ("weights", "inner") if k not in state_dict]
        if missing:
            raise ValueError(f"not a GEMS state dict: missing {missing} (got keys {sorted(state_dict)}); "
                             "save it with GemsOptimizer.state_dict()")
        version = int(state_dict.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise ValueError(f"this GEMS state dict has format_version {version}; this gems reads ≤ {FORMAT_VERSION}. "
                             "Upgrade gems to load it.")
        config = state_dict.get("config", {})
        if config.get("tasks", self.tasks) != self.tasks:
            raise ValueError(f"state dict was saved for tasks {config['tasks']}, this optimizer has {self.tasks}")
        saved = state_dict["weights"]
        if len(saved) != len(self._subspaces):
            raise ValueError(f"state dict has {len(saved)} targeted weights, this optimizer {len(self._subspaces)}: "
                             "build it with the same model, target_modules and inner param groups")
        for w, s in zip(self._subspaces, saved):
            self._check_saved_weight(w, s)
        self.inner.load_state_dict(state_dict["inner"])
        for w, s in zip(self._subspaces, saved):
            w.step = int(s["step"])
            gap = self.update_proj_gap
            w.next_refresh = int(s.get("next_refresh", -(-w.step // gap) * gap))
            w.gap_factor = int(s.get("gap_factor", 1))
            for name in w.bases:
                b = s["bases"].get(name)
                w.bases[name] = None if b is None else b.to(device=w.param.device, dtype=torch.float32).clone()
            if all(w.bases[name] is not None for name in w.subspaces()):
                w.fold_nullspace(self.nullspace_mode)
        self.seed = int(state_dict.get("seed", self.seed))
        self.last_gates = dict(state_dict.get("last_gates", self.last_gates))
