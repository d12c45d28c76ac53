"""Statistics for the benchmark's results table: seed spread, paired bootstrap, per-example metrics.

Why paired: every method is evaluated on the same users, so the per-user difference removes the (large)
between-user variance that an unpaired comparison of two means would carry. The unit of resampling is
the user (one value per user, averaged over seeds with :func:`per_user_mean` first), not the seed: with
three seeds, a seed-level interval says almost nothing.

>>> mean_std([1.0, 2.0, 3.0])
(2.0, 1.0)
>>> hr_at([0, 4, 5], 5).tolist()
[1.0, 1.0, 0.0]
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["mean_std", "paired_bootstrap", "per_user_mean", "ndcg_at", "hr_at"]


def _vector(values: Sequence[float] | Tensor, name: str) -> Tensor:
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    # One NaN would silently turn every bootstrap mean into NaN and the interval into nonsense.
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must hold finite values")
    return v


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of ``values``; the std of a single value is 0.0.

    ddof=1 because the values are a few seeds out of many possible ones, and the table reports the spread
    one would expect from another seed.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, std


def paired_bootstrap(
    a: Sequence[float] | Tensor,
    b: Sequence[float] | Tensor,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Paired bootstrap of ``mean(a - b)`` over units (users) aligned by position.

    Resamples the units with replacement ``n_boot`` times (a seeded ``torch.Generator``, so the same
    inputs and seed give the same interval). Returns ``diff`` (the observed mean difference), ``lo`` and
    ``hi`` (the percentile interval of the bootstrap means at ``level``, linear interpolation) and
    ``p_le_0`` (the fraction of bootstrap means <= 0: a one-sided bootstrap p-value for "a is better").
    """
    va, vb = _vector(a, "a"), _vector(b, "b")
    if va.numel() != vb.numel():
        raise ValueError(f"a and b must have the same length, got {va.numel()} and {vb.numel()}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = va - vb
    n = d.numel()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=gen)
    means = d[idx].mean(1)
    alpha = (1.0 - level) / 2.0
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return {
        "diff": float(d.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "p_le_0": float((means <= 0).double().mean()),
    }


def per_user_mean(values_per_seed: Sequence[Sequence[float]]) -> list[float]:
    """Column means of a seeds x units table: each unit's (user's) metric averaged over seeds.

    All rows must have the same length, because a unit missing from one seed would misalign the pairing.
    """
    rows = [list(r) for r in values_per_seed]
    if not rows:
        raise ValueError("per_user_mean needs at least one row (seed)")
    width = len(rows[0])
    for s, r in enumerate(rows):
        if len(r) != width:
            raise ValueError(f"ragged input: row 0 has {width} values but row {s} has {len(r)}")
    if width == 0:
        raise ValueError("per_user_mean needs at least one unit per row")
    return torch.tensor(rows, dtype=torch.float64).mean(0).tolist()


def _ranks(ranks: Sequence[int] | Tensor, k: int) -> Tensor:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = torch.as_tensor(ranks, dtype=torch.float64).reshape(-1)
    if bool((r < 0).any()) or not bool(torch.isfinite(r).all()):
        raise ValueError("ranks must be finite and >= 0 (0-based)")
    return r


def ndcg_at(ranks: Sequence[int] | Tensor, k: int) -> Tensor:
    """Per-example NDCG@k for one relevant item at 0-based ``ranks``: ``1/log2(rank+2)`` if rank < k."""
    r = _ranks(ranks, k)
    return torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))


def hr_at(ranks: Sequence[int] | Tensor, k: int) -> Tensor:
    """Per-example hit rate HR@k for 0-based ``ranks``: 1.0 if rank < k, else 0.0."""
    r = _ranks(ranks, k)
    return (r < k).double()

