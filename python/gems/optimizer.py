"""GemsOptimizer: multi-subspace gradient tuning as a wrapper around any torch optimizer.

This class is the orchestrator; each stage lives in its own module (README, "Layout"): gems.config (options),
gems.backward / gems.split_backward (gradient collection), gems.collect (what the step reads), gems.schedule
(refreshes), gems.step and gems.fused (the step), gems.checkpoint, gems.diagnostics."""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gems import backward as dict_form
from gems import checkpoint, collect, split_backward, step as step_impl
from gems import diagnostics as diag
from gems import nullspace as nsp
from gems.config import GemsConfig
from gems.dispatch import requested_backend, resolve_backend
from gems.subspaces import WeightSubspaces, clamp_report
from gems.surface import ParamGroupView, StateView
from gems.targets import TargetSpec, select_linear_modules, unwrap
from gems.tasks import TaskGradients

FORMAT_VERSION = checkpoint.FORMAT_VERSION
_OPTIONS = frozenset(f.name for f in dataclasses.fields(GemsConfig)) - {"backend"}  # opt.backend: the resolved one


def _is_dtensor(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(p, DTensor)


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
        config = GemsConfig.build(
            tasks, rank=rank, task_rank=task_rank, update_proj_gap=update_proj_gap, scale=scale,
            proj_type=proj_type, task_basis=task_basis, gating=gating, nullspace_mode=nullspace_mode,
            nullspace_weight_decay=nullspace_weight_decay, backend=backend, refresh=refresh,
            state_transfer=state_transfer, adaptive_refresh=adaptive_refresh, seed=seed, sync=sync, stash=stash,
            refresh_schedule=refresh_schedule, target_embeddings=target_embeddings, warm_start=warm_start,
            basis_signs=basis_signs)
        if nullspace is not None and not isinstance(nullspace, nsp.NullSpace):
            raise TypeError(f"nullspace must be a gems.NullSpace, got {type(nullspace).__name__}")
        if target_embeddings and model is None:
            raise ValueError("target_embeddings=True needs model= (embeddings are found among its modules)")
        if config.state_transfer == "rotate" and not getattr(inner, "rotatable_state", True):
            raise ValueError(f"state_transfer='rotate' needs moments shaped like the coordinates; "
                             f"{type(inner).__name__} stores them otherwise: use 'keep' (default) or 'reset'")

        self.config = config
        self.inner = inner
        self.nullspace = nullspace
        self._update_stats: dict[str, dict[str, float]] = {}
        self.track_update_stats = False
        self._task_grads = TaskGradients(config.tasks)
        self.last_gates: dict[str, float] = {t: 1.0 / len(config.tasks) for t in config.tasks}
        self.last_skipped: list[str] = []
        # rank-0 subspaces' bases and moments for the kernels (gems.fused.placeholder), by (role, shape, device)
        self._placeholders: dict[tuple, Tensor] = {}
        # the fused path's inner step counters as views of one buffer (gems.fused._advance_step_counters)
        self._step_buffer: tuple[Tensor, list[Tensor]] = (torch.zeros(0), [])
        # the fused step's grouping (gems.fused.Plan), rebuilt after a refresh or a load (they bump the epoch)
        self._fused_plan = None
        self._torch_plan = None  # the torch path's shape groups (gems.grouped.Plan), same epoch
        self._plan_epoch = 0

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
        clamp_report(self._subspaces, config.rank, config.task_rank)
        self._install_coordinates()

    # ----------------------------------------------------------------------------------------------
    # options: read from the frozen config
    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails; "config" missing means a half-built or unpickling object
        if name in _OPTIONS and "config" in self.__dict__:
            value = getattr(self.__dict__["config"], name)
            return list(value) if name == "tasks" else value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OPTIONS:
            raise AttributeError(f"GemsOptimizer.{name} is an option of the frozen opt.config; build a new "
                                 f"optimizer, or set opt.config = dataclasses.replace(opt.config, {name}=...) "
                                 "if the change is safe for the bases and state already built")
        super().__setattr__(name, value)

    @property
    def single_task(self) -> bool:
        return self.config.single_task

    @property
    def backend_request(self) -> str | None:
        return self.config.backend

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
            if _is_dtensor(p):
                # the bases and projections would be computed on each rank's shard, not on the weight
                raise NotImplementedError(
                    f"parameter {i} {tuple(p.shape)} is a DTensor (FSDP2 fully_shard, or tensor parallel): GEMS "
                    "does not step sharded parameters yet (design: docs/design_notes.md, 'FSDP2'). Train with "
                    "DDP, or plain data parallelism, whose gradients GEMS averages itself (gems.distributed)")

    def _build_subspaces(self, model: nn.Module | None, target_modules: TargetSpec) -> list[WeightSubspaces]:
        cfg = self.config
        held = {id(p): p for p in self._inner_params()}
        if model is not None:
            model = unwrap(model)
            modules = select_linear_modules(model, target_modules)
            named = [(f"{n}.weight", m.weight) for n, m in modules]
            if cfg.target_embeddings:
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
            chosen.append(WeightSubspaces.create(len(chosen), name, p, tasks=cfg.tasks, rank=cfg.rank,
                                                 task_rank=cfg.task_rank, proj_type=cfg.proj_type,
                                                 task_basis=cfg.task_basis))
        if not chosen:
            raise ValueError("GEMS found no trainable 2-D weight held by the inner optimizer to project")
        # targeted nn.Linear layers learn to hand their (X, dY) to opt.backward(row_losses, task_ids=...)
        self._row_split = split_backward.convert(model, {id(w.param) for w in chosen}) if model is not None else set()
        return chosen

    def _install_coordinates(self) -> None:
        """Replace each targeted weight in the inner optimizer by its coordinate tensors, in place, so the
        number and order of param groups (what LR schedulers and state dicts key on) stay the same."""
        by_id = {id(w.param): w for w in self._subspaces}
        self._group_views = [ParamGroupView(group, list(group["params"])) for group in self.inner.param_groups]
        self._state_view = StateView(self)
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

    # ----------------------------------------------------------------------------------------------
    # torch.optim.Optimizer surface
    @property
    def param_groups(self) -> list[ParamGroupView]:
        """The inner optimizer's groups with ``"params"`` = the model's parameters (gems.surface): LR
        schedulers write the inner lr, and torch tooling maps state to the model through them."""
        return self._group_views

    @param_groups.setter
    def param_groups(self, value) -> None:
        if value is not self.__dict__.get("_group_views"):
            raise TypeError("GemsOptimizer's param groups are fixed at construction (set a group's lr in place)")

    @property
    def state(self) -> StateView:
        """Per model parameter, like torch's (gems.surface.StateView); ``opt.inner.state`` is the inner
        optimizer's own, keyed by coordinate tensors."""
        return self._state_view

    @state.setter
    def state(self, value) -> None:
        raise TypeError("set the state with opt.load_state_dict(...)")

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
        c = self.config
        shapes = sorted({tuple(w.param.shape) for w in self._subspaces})
        return (f"GemsOptimizer(tasks={list(c.tasks)}, rank={c.rank}, task_rank={c.task_rank}, "
                f"update_proj_gap={c.update_proj_gap}, scale={c.scale}, proj_type={c.proj_type!r}, "
                f"task_basis={c.task_basis!r}, gating={c.gating!r}, backend={self.backend!r}, "
                f"refresh={c.refresh!r}, stash={c.stash!r}, refresh_schedule={c.refresh_schedule!r}, "
                f"targeted_weights={len(self._subspaces)}, shapes={shapes},\n  inner={self.inner!r})")

    @property
    def _stash_mode(self) -> str:
        """What this step's stash holds for targeted weights: "projected" (coordinates between refreshes) or
        "full". ``stash="auto"``: projected for the one-backward form (its coordinates cost no m×n matrix),
        full for the dict form (the kernels' fused projection reads full gradients)."""
        if self.config.stash == "auto":
            return "projected" if self._task_grads.form == "rows" else "full"
        return self.config.stash

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
                if not self.config.single_task:
                    raise ValueError(f"per-row losses need task_ids (one of {list(self.config.tasks)} per row); or pass a "
                                     "dict {task: loss}")
                task_ids = torch.zeros(losses.numel() if losses.dim() == 1 else 0, dtype=torch.long)
            split_backward.run(self, losses, task_ids, row_weights, retain_graph)
            self._task_grads.calls += 1
            return
        if task_ids is not None or row_weights is not None:
            raise ValueError("task_ids and row_weights go with a 1-D tensor of per-row losses, not a dict")
        dict_form.dict_backward(self, losses, num_samples, retain_graph)
        self._task_grads.calls += 1

    def shared_grad_norm(self) -> float:
        """L2 norm, over every parameter, of the shared gradient Σ_t (N_t/N)·G_t the stash holds now. Under
        DDP the global one: the stash is averaged across ranks first (a collective: call it on every rank)."""
        return collect.shared_grad_norm(self)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip like ``torch.nn.utils.clip_grad_norm_`` on the shared (mixed-batch) gradient: when its norm
        exceeds ``max_norm``, every stashed task gradient is scaled by the same factor (which leaves the
        gates, built from norm shares, unchanged). Returns the norm before clipping. Under DDP the norm is
        the global gradient's, as in one process (see :meth:`shared_grad_norm`)."""
        norm = collect.shared_grad_norm(self)
        if math.isfinite(norm) and norm > max_norm > 0:
            coef = max_norm / (norm + 1e-6)
            if self._task_grads.empty:
                for p in self._all_params:
                    if p.grad is not None:
                        p.grad.mul_(coef)
            self._task_grads.scale_(coef)
        return torch.tensor(norm)

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
        if checkpoint.is_state_init(self):
            checkpoint.init_state(self)
            return loss
        from_stash = not self._task_grads.empty
        per_weight, shared_w = collect.gather_gradients(self)
        try:
            step_impl.run(self, per_weight, shared_w)
        except BaseException:
            if from_stash:  # the shared .grad written for the other parameters is rebuilt by a retry
                for p in self._plain_params:
                    p.grad = None
            raise
        return loss

    def _plain_name(self, p: Tensor) -> str:
        return f"param{next(i for i, q in enumerate(self._plain_params) if q is p)} {tuple(p.shape)}"

    def _param_name(self, p: Tensor) -> str:
        w = next((w for w in self._subspaces if w.param is p), None)
        return w.name if w is not None else self._plain_name(p)

    # ----------------------------------------------------------------------------------------------
    # diagnostics and checkpoints
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
        return diag.optimizer_diagnostics(self)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only: loads with ``torch.load(weights_only=True)`` (gems.checkpoint)."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore bases, steps and the inner optimizer's state; bases and coordinate moments stay fp32.

        The whole dict is checked first (keys, shapes, ranks, finite orthonormal bases), so a bad checkpoint
        raises and loads nothing."""
        checkpoint.load_state_dict(self, state_dict)
