"""Basis refresh: the one place where a subspace's basis is computed from a gradient.

Every caller goes through :func:`compute_basis`, so a faster engine only has to be added here."""
from __future__ import annotations

import torch
from torch import Tensor

from gems.reference import top_singular_basis

REFRESH_METHODS = ("svd",)


def compute_basis(
    matrix: Tensor,
    rank: int,
    side: str,
    *,
    method: str = "svd",
    previous: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Orthonormal fp32 basis (``side`` dim × ``rank``) of the top-``rank`` singular directions of ``matrix``.

    ``previous`` (the basis being replaced) allows warm starts for iterative engines; ``generator`` seeds
    any randomness. The caller guarantees ``matrix`` is finite."""
    if method not in REFRESH_METHODS:
        raise ValueError(f"refresh must be one of {REFRESH_METHODS}, got {method!r}")
    if rank == 0:
        dim = matrix.shape[0] if side == "left" else matrix.shape[1]
        return matrix.new_zeros((dim, 0), dtype=torch.float32)
    return top_singular_basis(matrix, rank, side).float()
