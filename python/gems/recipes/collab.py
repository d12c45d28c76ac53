"""Collaborative item vectors from the training split, for item tokens and the recommendation head.

Why: on the CPU budget a run sees ~3 % of an epoch of recommendation transitions, too few to learn which
items follow which from title-initialised tokens (every method stayed at the popularity count,
benches/results/unified_sr_cpu_full.md before this change). LLM recommenders start item tokens from a
conventional recommender's embeddings (LLaRA, CoLLM, E4SRec); here the conventional part is the cheapest
one that carries the signal: a rank-``dim`` factorisation of the training split's next-item PPMI matrix.
Validation pilot (AdamW, default budget, 150 validation users, CHANGELOG issue 15): rec NDCG@10 0.085 with
the factors in the tokens, 0.007 with titles only, 0.056 at twice the injected norm (and perplexity 86);
popularity 0.022, the transition count 0.094, the factors alone (``baselines.factor_scores``) 0.092.

Only the training split is read (the validation and test targets never enter a count).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gems.recipes.baselines import transition_counts

__all__ = ["transition_factors", "inject_factors", "energy_directions"]


def transition_factors(train_seqs: Mapping[str, Sequence[int]], num_items: int, dim: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)``, each ``num_items × dim`` fp32: ``left[a]·right[b]`` approximates the positive PMI of
    "b directly follows a" (truncated SVD, singular values split as square roots). Items that never occur in
    a transition get zero rows."""
    if not 1 <= dim <= num_items:
        raise ValueError(f"dim must be in [1, {num_items}], got {dim}")
    c = transition_counts(train_seqs, num_items)
    total = c.sum()
    if total == 0:
        raise ValueError("the training split has no transitions")
    expected = c.sum(1, keepdim=True) * c.sum(0, keepdim=True) / total
    ppmi = torch.where(c > 0, torch.log(c / expected.clamp_min(1e-12)), torch.zeros((), dtype=c.dtype)).clamp_min(0)
    u, s, vh = torch.linalg.svd(ppmi)
    root = s[:dim].sqrt()
    left, right = u[:, :dim] * root, vh[:dim].T * root
    # SVD signs are arbitrary per component; fix them (largest-|entry| of each left column positive) so the
    # vectors do not depend on the LAPACK build
    sign = torch.sign(left.gather(0, left.abs().argmax(0, keepdim=True))).squeeze(0)
    sign[sign == 0] = 1
    return (left * sign).float(), (right * sign).float()


def energy_directions(hidden: torch.Tensor, energy: float) -> torch.Tensor:
    """The fewest leading eigenvectors of ``hiddenᵀ·hidden`` (uncentred, ``hidden`` is tokens × dim) that
    hold ``energy`` of its trace, as a dim × k orthonormal matrix (k = 0 for ``energy == 0``)."""
    hidden = torch.as_tensor(hidden, dtype=torch.float64)
    if hidden.dim() != 2 or hidden.shape[0] < 1 or not bool(torch.isfinite(hidden).all()):
        raise ValueError("hidden must be a finite, non-empty tokens × dim matrix")
    if not 0.0 <= energy < 1.0:
        raise ValueError(f"energy must be in [0, 1), got {energy}")
    vals, vecs = torch.linalg.eigh(hidden.T @ hidden)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    k = int((vals.cumsum(0) / vals.sum().clamp_min(1e-300) < energy).sum()) + (1 if energy > 0 else 0)
    return vecs[:, :min(k, hidden.shape[1])].float()


def inject_factors(rows: torch.Tensor, factors: torch.Tensor, weight: float, *, seed: int = 0,
                   avoid: torch.Tensor | None = None) -> torch.Tensor:
    """``rows + weight · (factors @ Qᵀ)``, with ``Q`` a seeded orthonormal ``hidden × dim`` map orthogonal to
    the columns of ``avoid`` (hidden × k), and the injected part scaled so its mean row norm is ``weight`` ×
    the mean norm of ``rows`` (the title means): a fixed orthonormal map keeps the factors' geometry, and
    the scale keeps the tokens at the size the model reads.

    ``avoid``: the directions where the LM's final hidden states on general text live
    (:func:`energy_directions`). With tied embeddings an item row is also an output row, and its logit on
    general text is h·row: a part in a random direction made the base model's held-out perplexity 29 → 373
    (item tokens drew probability mass from text); outside the top 99 % of that energy it stays ≈ 29."""
    rows = torch.as_tensor(rows, dtype=torch.float32)
    factors = torch.as_tensor(factors, dtype=torch.float32)
    hidden, dim = rows.shape[-1], factors.shape[-1]
    if rows.dim() != 2 or factors.dim() != 2 or rows.shape[0] != factors.shape[0] or dim > hidden:
        raise ValueError(f"rows ({tuple(rows.shape)}) and factors ({tuple(factors.shape)}) must be items × hidden "
                         "and items × dim with dim <= hidden")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(hidden, dim, generator=g, dtype=torch.float64)
    if avoid is not None and avoid.numel():
        p = torch.linalg.qr(torch.as_tensor(avoid, dtype=torch.float64))[0]
        if p.shape[0] != hidden or p.shape[1] + dim > hidden:
            raise ValueError(f"avoid ({tuple(avoid.shape)}) must be hidden × k with k + dim <= hidden ({hidden})")
        a = a - p @ (p.T @ a)
        a = a - p @ (p.T @ a)  # twice: one pass leaves ~1e-16·‖a‖ along p, which QR would then renormalise
    q = torch.linalg.qr(a)[0].float()
    part = factors @ q.T
    norm = part.norm(dim=1).mean()
    if norm == 0:
        return rows.clone()
    return rows + weight * part * (rows.norm(dim=1).mean() / norm)
