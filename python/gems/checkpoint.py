"""GemsOptimizer's state dict: per targeted weight its bases, step and refresh schedule, beside the inner
optimizer's own state dict. Loading checks the whole dict first and then loads all of it or nothing."""
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

FORMAT_VERSION = 1
BASIS_TOL = 1e-3  # saved subspace bases: fp32 bases written by torch.save and read back are orthonormal to ~1e-6


def state_dict(opt: "GemsOptimizer") -> dict[str, Any]:
    """Tensors and plain values only: loads with ``torch.load(weights_only=True)``."""
    weights = []
    for w in opt._subspaces:
        weights.append({"name": w.name, "shape": list(w.param.shape), "side": w.side, "ranks": dict(w.ranks),
                        "step": torch.tensor(w.step, dtype=torch.int64),
                        "next_refresh": w.next_refresh, "gap_factor": w.gap_factor,
                        "bases": {s: b.clone() for s, b in w.bases.items() if b is not None}})
    return {"format_version": FORMAT_VERSION, "config": opt.config.saved(), "seed": opt.config.seed,
            "last_gates": dict(opt.last_gates), "weights": weights, "inner": opt.inner.state_dict()}


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
    tasks = list(opt.config.tasks)
    saved_tasks = list(state_dict.get("config", {}).get("tasks", tasks))
    if saved_tasks != tasks:
        raise ValueError(f"state dict was saved for tasks {saved_tasks}, this optimizer has {tasks}")
    saved = state_dict["weights"]
    if len(saved) != len(opt._subspaces):
        raise ValueError(f"state dict has {len(saved)} targeted weights, this optimizer {len(opt._subspaces)}: "
                         "build it with the same model, target_modules and inner param groups")
    for w, s in zip(opt._subspaces, saved):
        check_saved_weight(w, s)
    opt.inner.load_state_dict(state_dict["inner"])
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
    opt.config = dataclasses.replace(opt.config, seed=int(state_dict.get("seed", opt.config.seed)))
    opt.last_gates = dict(state_dict.get("last_gates", opt.last_gates))
