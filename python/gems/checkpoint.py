"""GemsOptimizer's state dict in torch's layout (top-level ``state`` / ``param_groups`` keyed by the model's
parameters, so torch.distributed.checkpoint can save and load it): per targeted weight its bases, step and
refresh schedule beside the inner optimizer's state of its coordinates. Loading checks the whole dict first
and then loads all of it or nothing; format 1 checkpoints (``weights`` + ``inner``) keep loading."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import dataclasses

import torch
from torch import Tensor

from gems import nullspace as nsp
from gems import reference
from gems.subspaces import WeightSubspaces

if TYPE_CHECKING:
    from gems.optimizer import GemsOptimizer

FORMAT_VERSION = 2
BASIS_TOL = 1e-3  # saved subspace bases: fp32 bases written by torch.save and read back are orthonormal to ~1e-6


def weight_state(opt: "GemsOptimizer", w: WeightSubspaces) -> dict[str, Any]:
    """A targeted weight's state, as ``opt.state[W]`` and the state dict hold it: GEMS' own under
    ``"gems"`` (gems_entry) and the inner optimizer's state of each coordinate tensor under ``"coords"``."""
    return {"gems": gems_entry(opt, w),
            "coords": {s: opt.inner.state[c] for s, c in w.coords.items() if c in opt.inner.state}}


def gems_entry(opt: "GemsOptimizer", w: WeightSubspaces) -> dict[str, Any]:
    """Step, refresh schedule, seed, shape, side, ranks and bases of one weight. A basis not computed yet is
    a zero placeholder of its shape with ``has_basis`` False, so the dict of a fresh optimizer is a complete
    template for ``torch.distributed.checkpoint.load`` (which fills only the entries it is given)."""
    dim = reference.side_dim(w.param.shape, w.side)
    bases = {s: (b.clone() if b is not None else torch.zeros(dim, w.ranks[s], device=w.param.device))
             for s, b in w.bases.items() if w.ranks[s] > 0}
    return {"step": torch.tensor(w.step, dtype=torch.int64), "next_refresh": w.next_refresh,
            "gap_factor": w.gap_factor, "seed": opt.config.seed,
            "shape": torch.tensor(list(w.param.shape), dtype=torch.int64), "left_side": w.side == "left",
            "ranks": dict(w.ranks), "bases": bases, "has_basis": {s: w.bases[s] is not None for s in bases}}


def _inner_slots(opt: "GemsOptimizer") -> list[list[tuple[Tensor, str | None]]]:
    """Per param group, the inner optimizer's parameters in order as (model parameter, subspace): a
    targeted weight expands to its coordinate tensors, any other parameter is itself (subspace None)."""
    by_id = {id(w.param): w for w in opt._subspaces}
    out = []
    for view in opt.param_groups:
        slots = []
        for p in view["params"]:
            w = by_id.get(id(p))
            slots.extend([(p, s) for s in w.subspaces()] if w is not None else [(p, None)])
        out.append(slots)
    return out


def state_dict(opt: "GemsOptimizer") -> dict[str, Any]:
    """torch's layout, keyed by the model's parameters (``state``, ``param_groups`` with integer ids in
    ``opt.param_groups`` order), so ``torch.distributed.checkpoint.state_dict`` maps it to parameter names;
    each targeted weight's entry is gems.checkpoint.weight_state. ``format_version``, ``tasks``, ``config``
    and ``last_gates`` beside them are informative (DCP keeps only ``state`` and ``param_groups``).
    Tensors and plain values only: loads with ``torch.load(weights_only=True)``."""
    inner = opt.inner.state_dict()  # the inner optimizer's own packing (its hooks, its state classes)
    pid: dict[int, int] = {}
    groups = []
    for view, packed in zip(opt.param_groups, inner["param_groups"]):
        group = {k: v for k, v in packed.items() if k != "params"}
        group["params"] = [pid.setdefault(id(p), len(pid)) for p in view["params"]]
        groups.append(group)
    state: dict[int, Any] = {}
    coords: dict[int, dict[str, Any]] = {id(w.param): {} for w in opt._subspaces}
    flat = [slot for slots in _inner_slots(opt) for slot in slots]
    for i, (p, s) in enumerate(flat):  # inner ids are positions in this order
        if i in inner["state"]:
            if s is None:
                state[pid[id(p)]] = inner["state"][i]
            else:
                coords[id(p)][s] = inner["state"][i]
    for w in opt._subspaces:
        state[pid[id(w.param)]] = {"gems": gems_entry(opt, w), "coords": coords[id(w.param)]}
    return {"state": state, "param_groups": groups, "format_version": FORMAT_VERSION,
            "tasks": list(opt.config.tasks), "config": opt.config.saved(), "last_gates": dict(opt.last_gates)}


def check_saved_weight(w: WeightSubspaces, s: Any) -> None:
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
        err = nsp.orthonormality_error(b)
        if err > BASIS_TOL:
            raise ValueError(f"{w.name}: saved {name} basis is not orthonormal (max |BᵀB − I| = {err:.1e})")


def load_state_dict(opt: "GemsOptimizer", state_dict: Mapping[str, Any]) -> None:
    """Restore bases, steps and the inner optimizer's state; bases and coordinate moments stay fp32.

    Reads torch's layout (this version's, also as ``torch.distributed.checkpoint`` hands it back, keyed by
    parameter names) and format 1 (``weights`` + ``inner``). The whole dict is checked first (keys, shapes,
    ranks, finite orthonormal bases), so a bad checkpoint raises and loads nothing."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    version = int(state_dict.get("format_version", 2 if "state" in state_dict else 1))
    if version > FORMAT_VERSION:
        raise ValueError(f"this GEMS state dict has format_version {version}; this gems reads ≤ {FORMAT_VERSION}. "
                         "Upgrade gems to load it.")
    tasks = list(opt.config.tasks)
    saved_tasks = list(state_dict.get("tasks", state_dict.get("config", {}).get("tasks", tasks)))
    if saved_tasks != tasks:
        raise ValueError(f"state dict was saved for tasks {saved_tasks}, this optimizer has {tasks}")
    if "state" in state_dict and "param_groups" in state_dict:
        inner, saved = _split_torch_layout(opt, state_dict)
    elif "weights" in state_dict and "inner" in state_dict:
        inner, saved = _split_v1(opt, state_dict)
    else:
        raise ValueError(f"not a GEMS state dict: expected 'state' and 'param_groups' (got keys "
                         f"{sorted(map(str, state_dict))}); save it with GemsOptimizer.state_dict()")
    for w, s in zip(opt._subspaces, saved):
        check_saved_weight(w, s)
    opt.inner.load_state_dict(inner)
    _relink_groups(opt)
    _install(opt, saved, int(state_dict.get("seed", next((s["seed"] for s in saved if "seed" in s), opt.config.seed))))
    opt.last_gates = dict(state_dict.get("last_gates", opt.last_gates))


def _split_v1(opt: "GemsOptimizer", state_dict: Mapping[str, Any]) -> tuple[Mapping, list[Mapping]]:
    saved = state_dict["weights"]
    if len(saved) != len(opt._subspaces):
        raise ValueError(f"state dict has {len(saved)} targeted weights, this optimizer {len(opt._subspaces)}: "
                         "build it with the same model, target_modules and inner param groups")
    return state_dict["inner"], list(saved)


def _split_torch_layout(opt: "GemsOptimizer", state_dict: Mapping[str, Any]) -> tuple[dict, list[dict]]:
    """torch's layout → (the inner optimizer's state dict, one format-1 style entry per targeted weight).

    Saved groups are matched to ``opt.param_groups`` by position and their parameter keys (ids, or names
    from DCP) to the parameters by position, as torch.optim.Optimizer.load_state_dict does."""
    groups, state = state_dict["param_groups"], state_dict["state"]
    views = opt.param_groups
    if len(groups) != len(views) or any(len(g["params"]) != len(v["params"]) for g, v in zip(groups, views)):
        raise ValueError(f"state dict has param groups of sizes {[len(g['params']) for g in groups]}, this optimizer "
                         f"{[len(v['params']) for v in views]}: build it with the same model, target_modules and "
                         "inner param groups")
    key_of = {id(p): k for g, v in zip(groups, views) for p, k in zip(v["params"], g["params"])}
    saved = []
    for w in opt._subspaces:
        entry = state.get(key_of[id(w.param)])
        if not isinstance(entry, Mapping) or not isinstance(entry.get("gems"), Mapping):
            raise ValueError(f"state dict has no GEMS state for {w.name} (key {key_of[id(w.param)]!r}): the "
                             "targeted weights differ (saved by another optimizer, or with other target_modules?)")
        g = entry["gems"]
        has = g.get("has_basis", {})
        if "left_side" in g:
            g = {**g, "side": "left" if g["left_side"] else "right"}
        saved.append({**g, "name": w.name, "shape": [int(d) for d in g.get("shape", w.param.shape)],
                      "bases": {s: b for s, b in g.get("bases", {}).items() if bool(has.get(s, True))},
                      "coords": entry.get("coords", {})})
    by_id = {id(w.param): s for w, s in zip(opt._subspaces, saved)}
    extra = [opt._plain_name(p) for p in opt._plain_params
             if isinstance(state.get(key_of.get(id(p))), Mapping) and "gems" in state[key_of[id(p)]]]
    if extra:
        raise ValueError(f"state dict has GEMS state for {', '.join(extra[:5])}, which this optimizer does not "
                         "target: the targeted weights differ (build it with the same target_modules)")
    inner_state, inner_groups, i = {}, [], 0
    for slots, g in zip(_inner_slots(opt), groups):
        ids = []
        for p, s in slots:
            held = by_id[id(p)]["coords"].get(s) if s is not None else state.get(key_of[id(p)])
            if held:  # an empty entry: no state yet (DCP can hand back {} for it)
                inner_state[i] = held
            ids.append(i)
            i += 1
        inner_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    return {"state": inner_state, "param_groups": inner_groups}, saved


def _relink_groups(opt: "GemsOptimizer") -> None:
    """torch's load_state_dict replaces the inner optimizer's group dicts by new ones: point the views and
    each weight's group (its lr and weight_decay) at them, or a scheduler would write the old ones."""
    targeted = {id(w.param): w for w in opt._subspaces}
    for view, group in zip(opt.param_groups, opt.inner.param_groups):
        view.inner_group = group
        for p in view["params"]:
            if id(p) in targeted:
                targeted[id(p)].group = group


def _install(opt: "GemsOptimizer", saved: list[Mapping], seed: int) -> None:
    opt._plan_epoch += 1  # new bases and moments: the fused step's operand lists are rebuilt
    gap = opt.config.update_proj_gap
    for w, s in zip(opt._subspaces, saved):
        w.step = int(s["step"])
        w.next_refresh = int(s.get("next_refresh", -(-w.step // gap) * gap))
        w.gap_factor = int(s.get("gap_factor", 1))
        for name in w.bases:
            b = s["bases"].get(name)
            w.bases[name] = None if b is None else b.to(device=w.param.device, dtype=torch.float32).clone()
        if all(w.bases[name] is not None for name in w.subspaces()):
            w.fold_nullspace(opt.config.nullspace_mode)
    opt.config = dataclasses.replace(opt.config, seed=seed)


def init_state(opt: "GemsOptimizer") -> None:
    """The state ``torch.distributed.checkpoint`` creates before loading into a fresh optimizer: it sets
    every parameter's ``.grad`` to zeros, the lr to 0, and steps. GEMS then steps the inner optimizer once
    on zero coordinate gradients (no refresh: a basis from a zero gradient means nothing), so every
    coordinate and parameter has inner state of its final shape for the checkpoint to fill, and puts the
    step counters it created back to 0: for optimizers whose fresh state is zeros at step 0 (Adam, AdamW,
    gems.AdamW8bit) training then continues exactly as without it (a plain torch AdamW is left one step
    ahead by DCP)."""
    had = set(opt.inner.state)
    for w in opt._subspaces:
        w.param.grad = None
        w.materialize_coords(torch.zeros(w.coord_numel(), device=w.param.device))
        for c in w.coords.values():
            c.grad = torch.zeros_like(c)
    try:
        opt.inner.step()
    finally:
        for w in opt._subspaces:
            w.release_coords()
    for p, st in opt.inner.state.items():
        if p not in had and "step" in st:
            st["step"] = st["step"].zero_() if isinstance(st["step"], Tensor) else type(st["step"])(0)


def is_state_init(opt: "GemsOptimizer") -> bool:
    """Whether this step is DCP's state initialisation: nothing stepped yet, nothing stashed, every lr 0
    and every ``.grad`` set is zero (no real training step looks like that)."""
    if not opt._task_grads.empty or opt.state:  # the stash first: an ordinary step costs one check
        return False
    if any(float(g["lr"]) != 0 for g in opt.inner.param_groups):
        return False
    grads = [p.grad for p in opt._all_params if p.grad is not None]
    return bool(grads) and all(not bool(g.any()) for g in grads)
