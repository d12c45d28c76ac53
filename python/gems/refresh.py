"""Basis refresh: the one place where a subspace's basis is computed from a gradient.

Every caller goes through :func:`compute_basis` (one matrix) or :func:`compute_bases` (many matrices,
same-shape ones batched), so a faster engine only has to be added here.

Engines (``method``):

- ``"svd"``: exact, ``torch.linalg.svd(full_matrices=False)`` as GaLore calls it (bit-identical bases).
- ``"subspace_iter"``: block subspace (power) iteration on A·Aᵀ, where A is the matrix (``side="left"``)
  or its transpose (``side="right"``). The start block is a sketch A·Ω of width ``rank + oversample``
  with a signed-hashing Ω (one ±1 per row: one pass over A, no GEMM; see :func:`gems.solvers._sketch`); ``previous``
  (the basis being replaced), when given and shape-compatible, is used as a prior: the sketch's component
  inside span(previous) is amplified by WARM_START_WEIGHT. Each iteration is two GEMMs and a QR,
  Y ← A·(Aᵀ·qr(Y)); by default one iteration, and a second one when the spectrum is flat (see
  SUBSPACE_FLAT_RATIO). The last block Y = Q·R is turned into ordered approximate singular vectors Q·U_R
  through the SVD of the small k×k factor R (no further pass over A). ``iters=0``: Rayleigh–Ritz on the
  start block (one GEMM).
- ``"randomized"``: the same range finder, never warm-started, with a fixed number of power iterations
  (RANDOMIZED_POWER_ITERS): Y = (A·Aᵀ)^q·A·Ω and the same extraction.

Speed (AMD EPYC, one thread, fp32, benches/results/refresh_cpu.md): at 576×1536 rank 128 one call is
two GEMMs (≈ 3.3 ms each) plus ≈ 6 ms of QR/SVD/sketch, ≈ 13 ms against ≈ 135 ms for torch.linalg.svd
(≈ 10×); 2048×2048 rank 128: ≈ 25–45×.

All engines compute in fp32 (fp64 if given fp64) whatever the input dtype and return fp32 orthonormal
columns. Zero and rank-deficient matrices still get a full orthonormal basis: Householder QR returns
orthonormal factors for any input, and when ``rank`` exceeds ``min(m, n)`` (possible on the longer side)
the basis is completed with seeded random directions orthogonal to the singular vectors.

The solvers themselves (sketch, iterations, QR and small-SVD paths, their tuning constants) live in
:mod:`gems.solvers`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gems import reference, solvers
from gems.reference import SIDES, top_singular_basis
from gems.solvers import orthonormality_errors  # noqa: F401  (the one orthonormality measure, public here)

REFRESH_METHODS = ("svd", "subspace_iter", "randomized")

# dtype of the GEMM operands in the iterative engines (products accumulate in fp32 either way); None
# keeps the working dtype (fp32). torch.bfloat16 halves each GEMM (~1.3x end to end) on CPUs with native bf16 dot
# products (AVX512-BF16/AMX) and on GPUs, with the same captured energy to 1e-4 on every measured case;
# it is much slower on CPUs without them, hence not the default.
ITER_MATMUL_DTYPE: torch.dtype | None = None

# Seed used when no generator is given, so refreshes stay deterministic without touching torch's global
# random stream (which would change dropout etc. in the user's training run).
DEFAULT_SEED = 0x6E5


def _side_dim(shape: Sequence[int], side: str) -> int:
    return shape[-2] if side == "left" else shape[-1]


def _check_args(shape: Sequence[int], rank: int, side: str, method: str) -> None:
    if method not in REFRESH_METHODS:
        raise ValueError(f"refresh must be one of {REFRESH_METHODS}, got {method!r}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if len(shape) != 2:
        raise ValueError(f"a basis is computed from a 2-D matrix, got shape {tuple(shape)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    dim = _side_dim(shape, side)
    if rank > dim:
        raise ValueError(
            f"rank {rank} exceeds the {side} dimension {dim} of a {tuple(shape)} matrix; clamp it first"
        )


def _default_generator(device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(DEFAULT_SEED)
    return gen


def compute_bases(
    matrices: Sequence[Tensor],
    rank: int,
    side: str,
    *,
    method: str = "svd",
    previous: Sequence[Tensor | None] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    oversample: int | None = None,
    iters: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """:func:`compute_basis` for many matrices; those of the same shape go through one batched pass.

    ``previous`` is ``None`` or a list aligned with ``matrices`` (entries may be ``None``). ``generator``
    is one generator shared by all matrices or a list aligned with ``matrices``. Random draws are taken
    per matrix in list order, the same draws a loop of :func:`compute_basis` calls would take (sharing one
    generator: when every matrix has the same shape), so batched and looped results agree to rounding. The
    iterative engines decide a second power iteration per matrix, so a matrix gets the same basis in a batch
    as alone."""
    matrices = list(matrices)
    if previous is None:
        previous = [None] * len(matrices)
    previous = list(previous)
    if len(previous) != len(matrices):
        raise ValueError(f"previous has {len(previous)} entries for {len(matrices)} matrices")
    for mat in matrices:
        _check_args(tuple(mat.shape), rank, side, method)
    if not matrices:
        return []
    if generator is None:
        generator = _default_generator(matrices[0].device)
    if isinstance(generator, torch.Generator):
        generators = [generator] * len(matrices)
    else:
        generators = list(generator)
        if len(generators) != len(matrices):
            raise ValueError(f"generator has {len(generators)} entries for {len(matrices)} matrices")
    groups: dict[tuple, list[int]] = {}
    for i, mat in enumerate(matrices):
        groups.setdefault((tuple(mat.shape), mat.device), []).append(i)
    out: list[Tensor | None] = [None] * len(matrices)
    for (shape, device), idx in groups.items():
        dim = _side_dim(shape, side)
        if rank == 0:
            for i in idx:
                out[i] = torch.zeros((dim, 0), dtype=torch.float32, device=device)
            continue
        work_dtype = torch.float64 if all(matrices[i].dtype == torch.float64 for i in idx) else torch.float32
        if len(idx) == 1:
            stack = matrices[idx[0]].to(work_dtype).unsqueeze(0)
        else:
            stack = torch.stack([matrices[i].to(work_dtype) for i in idx])
        inner = min(shape)
        core_rank = min(rank, inner)
        if method == "svd":
            solvers._abs_max(stack)  # finiteness guard only: the SVD path stays bit-identical to GaLore's
            # one GaLore call per matrix even in a batch: LAPACK and cuSOLVER loop over a batched SVD anyway
            # (H100, 576×1536: 24.9 ms per matrix batched vs 24.8 alone, benches/bench_micro.py)
            bases = torch.stack([top_singular_basis(m, core_rank, side) for m in stack])
        else:
            a = stack if side == "left" else stack.transpose(-2, -1)
            mdtype = ITER_MATMUL_DTYPE if matmul_dtype is None else matmul_dtype
            if work_dtype == torch.float64:
                mdtype = None
            bases = solvers._iterative(a, core_rank, method, [previous[i] for i in idx],
                                       [generators[i] for i in idx], oversample, iters, mdtype)
            # the signs of U_R's columns are the small SVD's choice, which can flip between nearly equal
            # matrices; canonical ones keep moments carried across a refresh meaningful (design notes §10)
            bases = canonical_signs(bases)
        if rank > core_rank:
            bases = solvers._complete(bases, rank, [generators[i] for i in idx])
        for j, i in enumerate(idx):
            basis = bases[j].float().contiguous()
            # own storage for each basis of a batch: a view would keep the whole stack alive
            out[i] = basis.clone() if len(idx) > 1 and basis.data_ptr() == bases[j].data_ptr() else basis
    return out  # type: ignore[return-value]


def orthonormalize_against_many(
    vectors: Sequence[Tensor], bases: Sequence[Tensor], generators: Sequence[torch.Generator]
) -> list[Tensor]:
    """:func:`gems.reference.orthonormalize_against` for many (vectors, basis) pairs; same-shape pairs go
    through one batched projection and orthonormalisation (CholeskyQR2 on CUDA, see
    :func:`gems.solvers._orthonormalize`). A pair with a vanishing column takes the reference function, which
    replaces it with a seeded random direction drawn from that pair's generator.

    Each output column's sign is canonical (its largest entry is positive, :func:`canonical_signs`): the
    input vectors come from an SVD whose signs are not stable between nearly equal gradients, and a QR that
    keeps them (CholeskyQR) passes a flip on to the kept moments. Measured on an H100: two
    GemsOptimizer runs whose weights differed by 5e-8 before a refresh ended 2e-3 apart with the solver's
    signs, 9e-8 with canonical ones (docs/design_notes.md §10)."""
    out: list[Tensor | None] = [None] * len(vectors)
    groups: dict[tuple, list[int]] = {}
    for i, (v, b) in enumerate(zip(vectors, bases)):
        groups.setdefault((tuple(v.shape), tuple(b.shape), v.device, v.dtype), []).append(i)
    for (vshape, _, _, _), idx in groups.items():
        if vshape[1] == 0:
            for i in idx:
                out[i] = vectors[i]
            continue
        v = torch.stack([vectors[i] for i in idx])
        b = torch.stack([bases[i] for i in idx])
        # fp64 on CUDA (d×r blocks, cheap): a TF32 GEMM would leave the result only ~1e-3 orthogonal to B
        x = v.double() if solvers._gpu_path(v) else v
        if x.dtype != v.dtype:
            b = b.to(x.dtype)
        for _ in range(2):
            if b.shape[-1]:
                x = x - b @ (b.transpose(-2, -1) @ x)
        q, r = solvers._orthonormalize(x)
        q = q.to(v.dtype)
        # same criterion as the reference: a column whose part outside everything before it is tiny
        scale = v.norm(dim=-2).clamp_min(torch.finfo(v.dtype).tiny)
        bad = (r.diagonal(dim1=-2, dim2=-1).abs() <= 1e-4 * scale).any(dim=-1)
        bad |= ~torch.isfinite(q).flatten(1).all(dim=1)
        bad_list = bad.tolist()
        for j, i in enumerate(idx):
            if bad_list[j]:
                out[i] = canonical_signs(reference.orthonormalize_against(vectors[i], bases[i], generators[i]))
            else:
                out[i] = canonical_signs(q[j]).contiguous()
    return out  # type: ignore[return-value]


def canonical_signs(q: Tensor) -> Tensor:
    """``q`` with every column's sign flipped so that its entry of largest magnitude is positive."""
    if q.numel() == 0:
        return q
    top = q.gather(-2, q.abs().argmax(dim=-2, keepdim=True))
    return q * torch.where(top < 0, -1.0, 1.0).to(q.dtype)


def compute_basis(
    matrix: Tensor,
    rank: int,
    side: str,
    *,
    method: str = "svd",
    previous: Tensor | None = None,
    generator: torch.Generator | None = None,
    oversample: int | None = None,
    iters: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> Tensor:
    """Orthonormal fp32 basis (``side`` dim × ``rank``) of the top-``rank`` singular directions of ``matrix``.

    ``side="left"``: left singular vectors (m × rank); ``"right"``: right singular vectors (n × rank).
    ``previous`` (the basis being replaced) warm-starts ``"subspace_iter"``; it is ignored when its
    shape does not fit and by the other engines. ``generator`` seeds any randomness (a fixed-seed local
    generator when ``None``; the global random stream is never used). ``oversample`` and ``iters``
    override the engine's defaults (``iters`` is the number of power iterations; ``None`` lets
    ``"subspace_iter"`` run one, or two on a flat spectrum, see ``gems.solvers.SUBSPACE_FLAT_RATIO``).
    ``matmul_dtype=torch.bfloat16`` runs the iterative engines' GEMMs on bf16 operands with fp32
    accumulation (default ``ITER_MATMUL_DTYPE``: the working dtype).

    Raises ``ValueError`` for a non-finite matrix (NaN/Inf never reaches a factorisation), for
    ``rank`` larger than the side's dimension (the caller clamps), and for unknown methods or sides.
    Columns beyond ``min(m, n)`` (only possible on the longer side) are seeded random directions
    orthogonal to the singular vectors."""
    return compute_bases(
        [matrix],
        rank,
        side,
        method=method,
        previous=[previous],
        generator=generator,
        oversample=oversample,
        iters=iters,
        matmul_dtype=matmul_dtype,
    )[0]
