"""GemsConfig: every option of GemsOptimizer, validated once and frozen.

The optimizer's modules read their options from here (``opt.config``) instead of from a score of attributes
of the optimizer; ``GemsOptimizer.<option>`` still reads them. A frozen object, because options that change
under a running optimizer (a rank, a side, a task list) would silently disagree with the bases and moments
already built; ``dataclasses.replace`` makes a changed copy where a caller really means it (a bench switching
the refresh schedule after the first refresh)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from gems import reference
from gems.refresh import REFRESH_METHODS
from gems.tasks import validate_gating, validate_tasks

TASK_BASES = ("residual", "independent")
NULLSPACE_MODES = ("update", "gradient")
NULLSPACE_DECAYS = ("project", "full")
STATE_TRANSFERS = ("keep", "rotate", "reset")
STASHES = ("auto", "full", "projected")
REFRESH_SCHEDULES = ("aligned", "staggered")
BASIS_SIGNS = ("canonical", "solver")
SYNCS = ("auto", "none")
MAX_GAP_FACTOR = 8  # adaptive_refresh doubles a stable weight's gap up to this factor

# the options a checkpoint records (its "config" entry; load_state_dict compares the tasks)
SAVED = ("tasks", "rank", "task_rank", "update_proj_gap", "scale", "proj_type", "task_basis", "refresh",
         "state_transfer", "adaptive_refresh", "stash", "refresh_schedule", "warm_start", "basis_signs",
         "target_embeddings", "gating")


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GemsConfig:
    """The options of :class:`~gems.GemsOptimizer` (see its docstring); ``task_rank=None`` resolves to 0 for one
    task and ``max(rank // 2, 1)`` otherwise, ``gating`` to its validated form."""

    tasks: tuple[str, ...] = ("default",)
    rank: int = 128
    task_rank: int | None = None
    update_proj_gap: int = 200
    scale: float = 1.0
    proj_type: str = "std"
    task_basis: str = "residual"
    gating: str | Mapping[str, float] = "heuristic"
    nullspace_mode: str = "update"
    nullspace_weight_decay: str = "project"
    backend: str | None = None          # the request; GemsOptimizer.backend is the resolved backend
    refresh: str = "svd"
    state_transfer: str = "keep"
    adaptive_refresh: float | None = None
    seed: int = 0
    sync: str = "auto"
    stash: str = "auto"
    refresh_schedule: str = "aligned"
    target_embeddings: bool = False
    warm_start: bool = False
    basis_signs: str = "canonical"

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: set once here)
        tasks = validate_tasks(self.tasks)
        put("tasks", tuple(tasks))
        if self.task_rank is None:
            put("task_rank", 0 if len(tasks) == 1 else max(self.rank // 2, 1) if isinstance(self.rank, int) else None)
        for name, low in (("rank", 1), ("task_rank", 0), ("update_proj_gap", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) \
                or self.scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {self.scale!r}")
        put("scale", float(self.scale))
        reference.side_for((2, 1), self.proj_type)  # validates proj_type
        for name, choices in (("task_basis", TASK_BASES), ("refresh", REFRESH_METHODS),
                              ("state_transfer", STATE_TRANSFERS), ("nullspace_mode", NULLSPACE_MODES),
                              ("nullspace_weight_decay", NULLSPACE_DECAYS), ("stash", STASHES),
                              ("refresh_schedule", REFRESH_SCHEDULES), ("basis_signs", BASIS_SIGNS)):
            _one_of(name, getattr(self, name), choices)
        if self.sync not in SYNCS:
            raise ValueError(f"sync must be 'auto' or 'none', got {self.sync!r}")
        a = self.adaptive_refresh
        if a is not None and not (isinstance(a, float) and 0 < a <= 1):
            raise ValueError(f"adaptive_refresh must be None or a similarity in (0, 1], got {a!r}")
        if not isinstance(self.target_embeddings, bool):
            raise TypeError(f"target_embeddings must be a bool, got {self.target_embeddings!r}")
        put("gating", validate_gating(self.gating, list(tasks)))
        put("seed", int(self.seed))
        put("warm_start", bool(self.warm_start))

    @property
    def single_task(self) -> bool:
        return len(self.tasks) == 1

    @property
    def subspace_names(self) -> list[str]:
        """Every subspace in the kernels' contract order: the shared one, then one per task."""
        from gems.subspaces import SHARED
        return [SHARED, *self.tasks]

    def saved(self) -> dict[str, Any]:
        """The checkpoint's record of the options (plain values only)."""
        out = {name: getattr(self, name) for name in SAVED}
        out["tasks"] = list(self.tasks)
        out["gating"] = dict(self.gating) if isinstance(self.gating, Mapping) else self.gating
        return out

    @classmethod
    def build(cls, tasks: Sequence[str] | None, **options: Any) -> "GemsConfig":
        """The config of ``GemsOptimizer(tasks=tasks, **options)`` (``tasks=None``: one task)."""
        return cls(tasks=tuple(validate_tasks(tasks)), **options)
