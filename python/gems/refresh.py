"""Basis refresh: the one place where a subspace's basis is computed from a gradient.

Every caller goes through :func:`compute_basis` (one matrix) or :func:`compute_bases` (many matrices,
same-shape ones batched), so a faster engine only has to be added here.

Engines (``method``):

- ``"svd"``: exact, ``torch.linalg.svd(full_matrices=False)`` as GaLore calls it (bit-identical bases).
- ``"subspace_iter"``: block subspace (power) iteration on A·Aᵀ, where A is the matrix (``side="left"``)
  or its transpose (``side="right"``). It starts from ``previous`` (the basis being replaced) when that is
  given and shape-compatible, topped up with seeded Gaussian columns to ``rank + oversample``; otherwise
  from seeded Gaussian columns. Each iteration is two GEMMs and a QR, Y ← A·(Aᵀ·qr(Y)); by default it
  stops once the captured energy stops growing (2–4 iterations). The last block Y = Q·R is turned into
  ordered approximate singular vectors Q·U_R through the SVD of the small k×k factor R (a Rayleigh–Ritz-
  type extraction that needs no further pass over A).
- ``"randomized"``: Halko–Martinsson–Tropp randomized range finder, Y = A·Ω with Gaussian Ω, then
  ``iters`` power iterations and the same extraction. Never warm-started.

All engines compute in fp32 (fp64 if given fp64) whatever the input dtype and return fp32 orthonormal
columns. Zero and rank-deficient matrices still get a full orthonormal basis: Householder QR returns
orthonormal factors for any input, and when ``rank`` exceeds ``min(m, n)`` (possible on the longer side)
the basis is completed with seeded random directions orthogonal to the singular vectors.

Numerics: Aᵀ·Q is multiplied by 1/max|A| before the second GEMM, so that A·Aᵀ·Q neither underflows for
tiny gradients nor overflows for huge ones (the top singular value σ₁ ≥ max|A|, so the product stays
≥ σ₁ in size). The same max|A| reduction is the finiteness guard: NaN/Inf never reaches a factorisation.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gems.reference import SIDES, top_singular_basis

REFRESH_METHODS = ("svd", "subspace_iter", "randomized")

# Defaults, chosen by `python benches/bench_refresh.py` (results in benches/results/refresh_cpu.md):
# AMD EPYC, 2 cores, torch 2.13 CPU, fp32; real SmolLM2-135M gradients (576×1536, 576×576) and synthetic
# matrices with a decaying spectrum (576×1536, 2048×2048), ranks 64–512.
#
# Oversampling: extra columns carried through the iteration and dropped at the final extraction. A relative
# oversample (rank/4, at least 8) helps more per flop than extra iterations on real gradients, whose
# spectra are flat near rank r: at two iterations p = r/4 captured ≥ 99.5% of the exact top-r energy on
# every real gradient, p = 8 ≥ 99.3% (and 98.4% vs 98.7% on a flat synthetic spectrum) for ~10% less time.
SUBSPACE_OVERSAMPLE_FRACTION = 0.25
SUBSPACE_MIN_OVERSAMPLE = 8
# Iterations of Y ← A·(Aᵀ·qr(Y)), adaptive by default: stop once the energy ‖AᵀQ‖² captured by the block
# grew by less than SUBSPACE_TOL (relative) in the last iteration; at most SUBSPACE_MAX_ITERS, at least 2.
# Measured (576×1536 and 576×576 real gradients, ranks 64–256; synthetic power-law spectra): tol 3e-2
# stops after 3 iterations (6 GEMMs) on every real gradient, cold or warm (the previous batch's basis is
# not close enough to save one), keeps ≥ 99.7% of the exact top-r energy everywhere (worst: flat
# synthetic spectrum, cold start) and lets a close warm start stop after 2; tol 1e-2 costs a fourth
# iteration on some real gradients for +0.1%. Fixed iters=2 gives ≥ 99.5% on the real gradients but
# 98.7% on the flat synthetic spectrum; iters=1 only 97–99%.
SUBSPACE_TOL = 3e-2
SUBSPACE_MAX_ITERS = 4
# Randomized range finder: power iterations after Y = A·Ω (3 GEMMs for q = 1). q = 1 reaches ≥ 99% of the
# exact energy on the real gradients but ~98% on a flat synthetic spectrum; q = 2 costs two more GEMMs.
RANDOMIZED_OVERSAMPLE_FRACTION = 0.25
RANDOMIZED_MIN_OVERSAMPLE = 8
RANDOMIZED_POWER_ITERS = 1
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


def _oversample(rank: int, method: str, oversample: int | None) -> int:
    if oversample is not None:
        if oversample < 0:
            raise ValueError(f"oversample must be >= 0, got {oversample}")
        return oversample
    if method == "randomized":
        return max(RANDOMIZED_MIN_OVERSAMPLE, int(RANDOMIZED_OVERSAMPLE_FRACTION * rank))
    return max(SUBSPACE_MIN_OVERSAMPLE, int(SUBSPACE_OVERSAMPLE_FRACTION * rank))


def _default_generator(device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(DEFAULT_SEED)
    return gen


def _randn(rows: int, cols: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Draw in fp32 on the generator's device so every input dtype/device sees the same numbers.
    out = torch.randn(rows, cols, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def _inverse_scales(stack: Tensor) -> Tensor:
    """1/max|A| per matrix of a b×m×n stack (1 for a zero matrix); raises on NaN/Inf.

    One reduction pass, no copy of the matrices."""
    flat = stack.reshape(stack.shape[0], -1)
    scale = torch.maximum(flat.amax(dim=1).abs(), flat.amin(dim=1).abs())  # NaN propagates through both
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("basis refresh got a non-finite matrix (NaN or Inf); skip this refresh instead")
    return torch.where(scale > 0, scale.reciprocal(), torch.ones_like(scale))


def _complete(basis: Tensor, rank: int, generator: torch.Generator) -> Tensor:
    """Append seeded random orthonormal columns orthogonal to ``basis`` (b×d×k) up to ``rank`` columns."""
    b, d, k = basis.shape
    extra = torch.stack(
        [_randn(d, rank - k, generator, basis.device, basis.dtype) for _ in range(b)]
    )
    # Project out, orthonormalise, and repeat once: the first QR may amplify the residual overlap with
    # ``basis`` by the condition number of the (square, random) block; the second pass starts from
    # orthonormal columns, so it does not.
    for _ in range(2):
        extra = extra - basis @ (basis.transpose(-2, -1) @ extra)
        extra = torch.linalg.qr(extra).Q
    q = extra
    return torch.cat([basis, q], dim=-1)


def _start(
    previous: Sequence[Tensor | None],
    dim: int,
    width: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    scale: float = 1.0,
) -> Tensor:
    """b×dim×width starting block: the usable previous basis columns, topped up with Gaussian columns
    (multiplied by ``scale``)."""
    blocks = []
    for prev in previous:
        use = 0
        if prev is not None and prev.dim() == 2 and prev.shape[0] == dim and prev.shape[1] > 0:
            use = min(prev.shape[1], width)
            prev = prev[:, :use].to(device=device, dtype=dtype)
            if not bool(torch.isfinite(prev).all()):
                use = 0
        parts = [prev] if use else []
        if width - use:
            parts.append(_randn(dim, width - use, generator, device, dtype) * scale)
        blocks.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.stack(blocks)


def _iterative(
    a: Tensor,
    rank: int,
    method: str,
    previous: Sequence[Tensor | None],
    generator: torch.Generator,
    oversample: int | None,
    iters: int | None,
    matmul_dtype: torch.dtype | None,
) -> Tensor:
    """Top-``rank`` left singular vectors of each matrix of the b×m×n stack ``a`` (rank ≤ min(m, n))."""
    _, m, n = a.shape
    width = min(rank + _oversample(rank, method, oversample), min(m, n))
    inv = _inverse_scales(a).to(a.dtype).view(-1, 1, 1)
    low = a if matmul_dtype in (None, a.dtype) else a.to(matmul_dtype)
    low_t = low.transpose(-2, -1)

    def mm(x: Tensor, y: Tensor) -> Tensor:  # product in the matmul dtype (fp32 accumulation), result in a.dtype
        return torch.matmul(x, y.to(low.dtype)).to(a.dtype)

    if iters is not None and iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if method == "randomized":
        # Y = A·Ω: the range finder's first half-step (Gaussian columns scaled to unit expected norm)
        y = mm(low, _start([None] * a.shape[0], n, width, generator, a.device, a.dtype) * n ** -0.5)
        steps, adaptive, orthonormal = (RANDOMIZED_POWER_ITERS if iters is None else iters), False, True
    else:
        # start block as Y: previous columns (orthonormal) + Gaussian columns scaled to unit expected norm;
        # the first product does not need it orthonormalised, only the span matters
        y = _start(previous, m, width, generator, a.device, a.dtype, scale=m ** -0.5)
        adaptive = iters is None
        # the adaptive rule compares energies of orthonormal blocks, so it orthonormalises the start too
        steps, orthonormal = (SUBSPACE_MAX_ITERS if adaptive else iters), adaptive
    energy = None
    for _ in range(steps):
        q = torch.linalg.qr(y).Q if orthonormal else y
        z = mm(low_t, q) * inv
        y = mm(low, z)
        if adaptive and orthonormal:  # stop once the captured energy ‖AᵀQ‖² stops growing
            new_energy = z.square().sum(dim=(-2, -1))
            if energy is not None and not bool(((new_energy - energy) > SUBSPACE_TOL * new_energy).any()):
                break
            energy = new_energy
        orthonormal = True
    # Finish without another pass over A: Y = Q·R, and the left singular vectors of Y are Q·U_R with
    # U_R from the SVD of the small k×k factor R. They are ordered approximate singular vectors of A
    # (Y = (A·Aᵀ)^t·Q₀ weighs each direction by σ² once more than a Rayleigh–Ritz step on span(Q) would,
    # at the cost of one GEMM less; measured: same captured energy to 1e-3 at equal GEMM count).
    q, r = torch.linalg.qr(y)
    u = torch.linalg.svd(r).U
    return q @ u[..., :rank]


def compute_bases(
    matrices: Sequence[Tensor],
    rank: int,
    side: str,
    *,
    method: str = "svd",
    previous: Sequence[Tensor | None] | None = None,
    generator: torch.Generator | None = None,
    oversample: int | None = None,
    iters: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """:func:`compute_basis` for many matrices; those of the same shape go through one batched pass.

    ``previous`` is ``None`` or a list aligned with ``matrices`` (entries may be ``None``). Random draws
    are taken per matrix in list order, the same draws a loop of :func:`compute_basis` calls sharing
    ``generator`` would take when every matrix has the same shape, so batched and looped results agree
    to rounding."""
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
            _inverse_scales(stack)  # finiteness guard only: the SVD path stays bit-identical to GaLore's
            if len(idx) == 1:
                bases = top_singular_basis(stack[0], core_rank, side).unsqueeze(0)
            else:
                u, _, vh = torch.linalg.svd(stack, full_matrices=False)
                bases = u[..., :core_rank] if side == "left" else vh[..., :core_rank, :].transpose(-2, -1)
        else:
            a = stack if side == "left" else stack.transpose(-2, -1)
            mdtype = ITER_MATMUL_DTYPE if matmul_dtype is None else matmul_dtype
            if work_dtype == torch.float64:
                mdtype = None
            bases = _iterative(a, core_rank, method, [previous[i] for i in idx], generator, oversample, iters, mdtype)
        if rank > core_rank:
            bases = _complete(bases, rank, generator)
        for j, i in enumerate(idx):
            out[i] = bases[j].float().contiguous()
    return out  # type: ignore[return-value]


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
    ``"subspace_iter"`` stop once the captured energy grows by less than ``SUBSPACE_TOL``).
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
