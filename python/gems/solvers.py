"""The basis solvers behind :mod:`gems.refresh`: the signed-hashing sketch, the warm-started subspace
iteration and the randomized range finder (:func:`_iterative`), their orthonormalisation (Householder QR,
batched CholeskyQR2 on CUDA), the SVD of the small factor with its CUDA driver fallbacks, the completion
of a basis past min(m, n), and the constants that tune them. Separate from the dispatch so that
:mod:`gems.refresh` reads as the one entry point (argument checks, batching by shape, engine choice)
while the numerics it calls, and the CUDA code paths they switch on (:func:`_gpu_path`), sit together.

Numerics: Aᵀ·Q is multiplied by 1/max|A| before the second GEMM, so that A·Aᵀ·Q neither underflows for
tiny gradients nor overflows for huge ones (the top singular value σ₁ ≥ max|A|, so the product stays
≥ σ₁ in size). A matrix whose max|A| is outside [2^-SAFE_EXPONENT, 2^SAFE_EXPONENT] (subnormal or near
the top of fp32's range) is first scaled by a power of two (exact) to max|A| in [0.5, 1): 1/max|A| of a
subnormal matrix overflows fp32, and Aᵀ·Q of one near 1e37 does. The same max|A| reduction is the
finiteness guard: NaN/Inf never reaches a factorisation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Defaults, chosen by `python benches/bench_refresh.py` (results in benches/results/refresh_cpu.md):
# AMD EPYC, 2 cores, torch 2.13 CPU, fp32; real SmolLM2-135M gradients (576×1536, 576×576) and synthetic
# matrices with a decaying spectrum (576×1536, 2048×2048), ranks 64–512.
#
# Oversampling: extra columns carried through the iteration and dropped at the final extraction. A relative
# oversample (rank/4, at least 8) is the cheapest quality knob after the power iterations themselves.
# Measured at 576×1536 rank 128 with one power iteration (sketch start): width 136 / 144 / 160 / 192 gave
# 0.9926 / 0.9937 / 0.9961 / 0.9980 of the exact top-r energy on the worst real gradient (L15.down_proj),
# 0.9979 / 0.9985 / 0.9992 / 0.9996 on the worst 576×576 one, and 0.970 / 0.974 / 0.978 / 0.985 on the
# flat synthetic spectrum (alpha 0.5); each GEMM grows with the width (≈ 2.7 ms at 136, 3.3 ms at 160).
SUBSPACE_OVERSAMPLE_FRACTION = 0.25
SUBSPACE_MIN_OVERSAMPLE = 8
# Iterations, adaptive by default: one power iteration (2 GEMMs) on the sketch start, Y = A·Aᵀ·A·Ω, then
# a second one only when the spectrum looks flat: (s_k/s_r)^(1/3) > SUBSPACE_FLAT_RATIO, with s the
# singular values of Y (≈ σ³) at the rank-th and the last (k-th) column. Measured after one iteration:
# real gradients (576×1536 and 576×576, rank 128) 0.53–0.75 with ≥ 99.6% of the exact energy; synthetic
# alpha 1.0: 0.75 (99.98%); alpha 0.7: 0.82 (99.6%); alpha 0.5: 0.87 (97.8% → 99.4% with the second
# iteration); rank 64 L15.down_proj: 0.80 (98.8% → 99.7%). One iteration more costs ≈ 2 GEMMs + QR + SVD.
# A Gaussian start instead of the sketch gave the same energy to 1e-3 for one more GEMM; a Rayleigh–Ritz
# step (one more GEMM) +0.0004; CholeskyQR / eigh of Gram matrices were not faster than Householder QR
# and svd of R at these sizes (k ≈ 136–160: QR ≈ 1.1 ms, eigh ≈ 0.7–1.4 ms, svd ≈ 1.5–2 ms).
SUBSPACE_FLAT_RATIO = 0.78
SUBSPACE_MAX_ITERS = 2
# Warm start: the sketch's component inside span(previous) is multiplied by 1 + WARM_START_WEIGHT. Putting
# previous columns in the block instead of sketch columns cost energy on the real gradients (the previous
# batch's basis is a weaker start than the σ-weighted sketch: L15.down_proj 0.990 vs 0.996); weight 4
# keeps them ≥ 99.5% and lifts the flat synthetic case (0.9942 → 0.9985 at 2 iterations), weight 1 was
# too weak for a nearly converged previous basis (tests/test_refresh.py).
WARM_START_WEIGHT = 4.0
# Randomized range finder: power iterations after the sketch Y = A·Ω (2 GEMMs for q = 1). q = 1 reaches
# ≥ 99.6% of the exact energy on the real gradients but ~98% on a flat synthetic spectrum.
RANDOMIZED_OVERSAMPLE_FRACTION = 0.25
RANDOMIZED_MIN_OVERSAMPLE = 8
RANDOMIZED_POWER_ITERS = 1

# cuSOLVER driver for the SVD of the small k×k factor on CUDA (CPU ignores it). Measured on an H100 at
# 576×1536 rank 128 (k = 160), with the code now in `python benches/bench_micro.py --device cuda`: torch's default took 3.65 ms of a 5.0 ms refresh and returned a basis
# orthonormal to only 9e-5; "gesvda" takes 1.28 ms (refresh 3.2 ms), with the same captured energy and
# orthonormal to 2.4e-7. ("gesvdj": 3.63 ms; "gesvd": 8.9 ms.)
CUDA_SMALL_SVD_DRIVER: str | None = "gesvda"

# Orthonormalisation of the iteration blocks on CUDA: "cholesky" (CholeskyQR2, below) or "householder"
# (torch.linalg.qr). cuSOLVER's QR runs one matrix at a time even on a batch: on an H100 a 576×160 QR takes
# 0.67 ms, 20 ms for a stack of 30, while the CholeskyQR steps (an fp64 Gram matrix, a batched Cholesky,
# a batched triangular solve) take 0.06 + 0.18 + 0.16 ms for the whole stack; likewise the small SVD with
# "gesvda" is truly batched (7.6 ms for 30 160×160 factors, 1.4 ms for one) while the other drivers and
# eigh loop (113 ms and 36–84 ms for 30). `python benches/bench_micro.py --device cuda --cuda-only`.
# On CPU Householder QR is as fast as CholeskyQR at these sizes and stays the only path.
CUDA_ORTHONORMALIZE = "cholesky"
# A CholeskyQR factor is accepted when its columns are orthonormal to this tolerance (measured in fp64, before
# the cast to fp32); a matrix that fails (rank-deficient or too ill-conditioned for the fp64 Gram matrix) is
# redone with Householder QR.
CHOLESKY_QR_TOL = 1e-6
# The small SVD's U on CUDA gets one more CholeskyQR pass when its columns are orthonormal to less than this.
POLISHED_TOL = 1e-6

# Iterative engines: a matrix with max|A| outside [2^-SAFE_EXPONENT, 2^SAFE_EXPONENT] is rescaled first
# (see _normalized). 2^±64 leaves ~2^60 of fp32 range for the sketch's sums, Aᵀ·Q and 1/max|A|, and
# ordinary gradients never get near it, so they keep the unscaled path.
SAFE_EXPONENT = 64


def _oversample(rank: int, method: str, oversample: int | None) -> int:
    if oversample is not None:
        if oversample < 0:
            raise ValueError(f"oversample must be >= 0, got {oversample}")
        return oversample
    if method == "randomized":
        return max(RANDOMIZED_MIN_OVERSAMPLE, int(RANDOMIZED_OVERSAMPLE_FRACTION * rank))
    return max(SUBSPACE_MIN_OVERSAMPLE, int(SUBSPACE_OVERSAMPLE_FRACTION * rank))



def _randn(rows: int, cols: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Draw in fp32 on the generator's device so every input dtype/device sees the same numbers.
    out = torch.randn(rows, cols, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def _abs_max(stack: Tensor) -> Tensor:
    """max|A| per matrix of a b×m×n stack; raises on NaN/Inf. One reduction pass, no copy of the matrices."""
    flat = stack.reshape(stack.shape[0], -1)
    scale = torch.maximum(flat.amax(dim=1).abs(), flat.amin(dim=1).abs())  # NaN propagates through both
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("basis refresh got a non-finite matrix (NaN or Inf); skip this refresh instead")
    return scale


def _normalized(a: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and 1/max|A| per matrix (b×1×1, ``a``'s dtype; 1 for a zero matrix); raises on NaN/Inf.

    A matrix with max|A| outside [2^-SAFE_EXPONENT, 2^SAFE_EXPONENT] is replaced by A·2^k with max|A·2^k|
    in [0.5, 1): exact (a power of two; entries pushed below fp32's normal range are < 2^-126 of the
    largest) and harmless (a basis does not depend on the matrix's scale). Other matrices are not touched,
    so an ordinary gradient costs one reduction and gets the same basis as without this step."""
    scale = _abs_max(a)
    lo, hi = 2.0 ** -SAFE_EXPONENT, 2.0 ** SAFE_EXPONENT
    if bool(((scale > 0) & ((scale < lo) | (scale > hi))).any()):
        vals = scale.tolist()
        shifts = [-math.frexp(v)[1] if v > 0 and not lo <= v <= hi else 0 for v in vals]
        halves = [k // 2 for k in shifts]

        def factors(exps: list[int]) -> Tensor:
            return torch.tensor([math.ldexp(1.0, e) for e in exps], dtype=a.dtype, device=a.device).view(-1, 1, 1)

        # two factors: 2^k itself is past fp32's range for a subnormal matrix (k up to 149), its halves are not
        a = a * factors(halves)
        a.mul_(factors([k - h for k, h in zip(shifts, halves)]))
        scale = torch.tensor([math.ldexp(v, k) for v, k in zip(vals, shifts)], dtype=scale.dtype,
                             device=scale.device)
    inv = torch.where(scale > 0, scale.reciprocal(), torch.ones_like(scale))
    return a, inv.to(a.dtype).view(-1, 1, 1)


def _complete(basis: Tensor, rank: int, generators: Sequence[torch.Generator]) -> Tensor:
    """Append seeded random orthonormal columns orthogonal to ``basis`` (b×d×k) up to ``rank`` columns
    (matrix i draws from ``generators[i]``)."""
    b, d, k = basis.shape
    extra = torch.stack([_randn(d, rank - k, gen, basis.device, basis.dtype) for gen in generators])
    # Project out, orthonormalise, and repeat once: the first QR may amplify the residual overlap with
    # ``basis`` by the condition number of the (square, random) block; the second pass starts from
    # orthonormal columns, so it does not.
    for _ in range(2):
        extra = extra - basis @ (basis.transpose(-2, -1) @ extra)
        extra = torch.linalg.qr(extra).Q
    q = extra
    return torch.cat([basis, q], dim=-1)


def _sketch(a: Tensor, width: int, generators: Sequence[torch.Generator]) -> Tensor:
    """b×m×width sketch A·Ω with a signed-hashing test matrix Ω (n×width, one ±1 per row).

    Column j of A is added to (or subtracted from) one sketch column, picked by a seeded random permutation
    (matrix i: from ``generators[i]``): one pass over A and no GEMM (a Gaussian Ω costs as much as a
    power-iteration half-step). The permutation spreads the n columns evenly over 2·width signed buckets,
    so every sketch column gets at least one column of A (width ≤ n) and the sketch has full rank whenever
    A has."""
    b, m, n = a.shape
    rows = a.stride(-1) == 1  # A row-major: add along dim 1; a transposed view (side="right"): along dim 0 of Aᵀ
    buckets = a.new_zeros((b, m, 2 * width) if rows else (b, 2 * width, m))
    # all permutations drawn on their generators' devices, then one copy to A's device
    perms = [torch.randperm(n, generator=gen, device=gen.device) for gen in generators]
    if len({p.device for p in perms}) > 1:
        perms = [p.to(a.device) for p in perms]
    perms = torch.stack(perms).to(a.device) % (2 * width)
    for i in range(b):
        if rows:
            buckets[i].index_add_(1, perms[i], a[i])
        else:
            buckets[i].index_add_(0, perms[i], a[i].transpose(0, 1))
    if rows:
        return buckets[..., :width] - buckets[..., width:]
    return (buckets[:, :width] - buckets[:, width:]).transpose(-2, -1)


def orthonormality_errors(q: Tensor) -> Tensor:
    """max |QᵀQ − I| per matrix of a b×d×k stack, computed in fp64 (an fp32 GEMM may run in TF32 on a GPU)."""
    q = q.double()
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return (q.transpose(-2, -1) @ q - eye).abs().amax(dim=(-2, -1))


def _cholesky_qr(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CholeskyQR2 of a b×d×k stack: Q, R with Y = Q·R, and a per-matrix bool "usable".

    Both passes in fp64 (Gram matrix, Cholesky, triangular solve): the first pass's Gram matrix squares Y's
    condition number, which fp64 absorbs up to ~1e8, the second restores orthogonality to rounding; fp64
    also keeps the result exact when the user runs fp32 GEMMs in TF32. Every step is one batched call for
    the whole stack (d·k² flops per matrix: small next to the power iteration's d·n·k)."""
    q = y.double()
    r = None
    ok = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(q.transpose(-2, -1) @ q)
        q = torch.linalg.solve_triangular(chol.transpose(-2, -1), q, upper=True, left=False)
        r = chol.transpose(-2, -1) if r is None else chol.transpose(-2, -1) @ r
        ok &= info == 0
    ok &= (orthonormality_errors(q) < CHOLESKY_QR_TOL) & torch.isfinite(r).flatten(1).all(dim=1)
    return q.to(y.dtype), r.to(y.dtype), ok


def _gpu_path(t: Tensor) -> bool:
    """Whether ``t`` takes the CUDA code paths (batched CholeskyQR, the small-SVD driver with its fallbacks,
    fp64 checks and products). One switch, so that tests can run those paths on CPU."""
    return t.is_cuda


def _driver_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd with CUDA_SMALL_SVD_DRIVER (CPU tensors, in tests, take LAPACK's default)."""
    if x.is_cuda:
        return torch.linalg.svd(x, driver=CUDA_SMALL_SVD_DRIVER)
    return torch.linalg.svd(x)


def _use_cholesky(y: Tensor) -> bool:
    return _gpu_path(y) and CUDA_ORTHONORMALIZE == "cholesky"


def _orthonormalize(y: Tensor) -> tuple[Tensor, Tensor]:
    """Q, R of a b×d×k stack (d ≥ k). CUDA: batched CholeskyQR2 (see CUDA_ORTHONORMALIZE), with Householder
    QR for the matrices it cannot handle; CPU: Householder QR (orthonormal Q for any input, zero included)."""
    if not _use_cholesky(y):
        return torch.linalg.qr(y)
    q, r, ok = _cholesky_qr(y)
    bad = (~ok).nonzero().flatten().tolist()
    if bad:
        q_bad, r_bad = torch.linalg.qr(y[bad])
        q[bad], r[bad] = q_bad, r_bad
    return q, r


def _small_svd(r: Tensor) -> tuple[Tensor, Tensor]:
    """U and singular values of the small k×k factor(s). On CUDA the faster, batched CUDA_SMALL_SVD_DRIVER is
    tried first. It can fail to converge (measured: rank 512 of a 576×576 gradient), which fails the whole
    batched call, and then each matrix is retried alone; a matrix that still fails, or whose
    vectors are not orthonormal to 1e-4 (the driver is approximate), gets torch's default driver. A result
    orthonormal to less than POLISHED_TOL is polished (:func:`_polish`): the default driver's vectors were
    orthonormal to only 9e-5 on an H100, gesvda's to 2.4e-7 on a real gradient."""
    if not _gpu_path(r):
        u, s, _ = torch.linalg.svd(r)
        return u, s
    if not CUDA_SMALL_SVD_DRIVER:
        u, s, _ = torch.linalg.svd(r)
        return _polish(u), s
    try:
        u, s, _ = _driver_svd(r)
    except torch.linalg.LinAlgError:
        u, s = torch.empty_like(r), r.new_empty(r.shape[:-1])
        for i in range(r.shape[0]):
            try:
                u[i], s[i], _ = _driver_svd(r[i])
            except torch.linalg.LinAlgError:
                u[i] = float("nan")  # redone below
    err = orthonormality_errors(u).tolist()  # the one host sync of this function
    bad = [i for i, e in enumerate(err) if not e < 1e-4]  # NaN counts as bad
    if bad:
        u_bad, s_bad, _ = torch.linalg.svd(r[bad])
        u[bad], s[bad] = u_bad, s_bad
    rough = [i for i, e in enumerate(err) if not e < POLISHED_TOL]  # the default driver's included
    if rough:
        u[rough] = _polish(u[rough])
    return u, s


def _polish(u: Tensor) -> Tensor:
    """One CholeskyQR pass on nearly orthonormal columns (gesvda's vectors are accepted up to an error of 1e-4,
    an approximate solver's): orthonormal to rounding afterwards and, the correction being triangular, the
    span of every leading set of columns is kept."""
    u64 = u.double()  # fp64: see _cholesky_qr
    chol, info = torch.linalg.cholesky_ex(u64.transpose(-2, -1) @ u64)
    polished = torch.linalg.solve_triangular(chol.transpose(-2, -1), u64, upper=True, left=False).to(u.dtype)
    ok = (info == 0).view(-1, 1, 1) & torch.isfinite(polished).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    return torch.where(ok, polished, u)


def _iterative(
    a: Tensor,
    rank: int,
    method: str,
    previous: Sequence[Tensor | None],
    generators: Sequence[torch.Generator],
    oversample: int | None,
    iters: int | None,
    matmul_dtype: torch.dtype | None,
) -> Tensor:
    """Top-``rank`` left singular vectors of each matrix of the b×m×n stack ``a`` (rank ≤ min(m, n))."""
    b, m, n = a.shape
    width = min(rank + _oversample(rank, method, oversample), min(m, n))
    if iters is not None and iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    a, inv = _normalized(a)
    low = a if matmul_dtype in (None, a.dtype) else a.to(matmul_dtype)
    low_t = low.transpose(-2, -1)

    def mm(x: Tensor, y: Tensor) -> Tensor:  # product in the matmul dtype (fp32 accumulation), result in a.dtype
        return torch.matmul(x, y.to(low.dtype)).to(a.dtype)

    # Start block: the sketch A·Ω (one pass over A; see _sketch); its signed sums cannot overflow, A having
    # been rescaled when huge (_normalized). subspace_iter puts the usable columns of ``previous`` in front.
    y = _sketch(a, width, generators)
    if method == "subspace_iter":
        blocks = []
        for j, prev in enumerate(previous):
            use = 0
            if prev is not None and prev.dim() == 2 and prev.shape[0] == m and prev.shape[1] > 0:
                use = min(prev.shape[1], width)
                prev = prev[:, :use].to(device=a.device, dtype=a.dtype)
                if not bool(torch.isfinite(prev).all()):
                    use = 0
            if use:
                # the sketch with its component inside span(previous) amplified: a prior, not a replacement
                sk = y[j]
                blocks.append(sk + WARM_START_WEIGHT * (prev @ (prev.transpose(0, 1) @ sk)))
            else:
                blocks.append(y[j])
        y = torch.stack(blocks)
        adaptive = iters is None
        steps = SUBSPACE_MAX_ITERS if adaptive else iters
    else:
        adaptive, steps = False, (RANDOMIZED_POWER_ITERS if iters is None else iters)
    # The start block is orthonormalised, not just column-scaled: the sketch is already σ-weighted, and with
    # one dominant singular value a power step on unscaled columns pushes directions 2..r below fp32
    # precision (576×1536 rank 128, σ₁ spiked 100× over an α = 0.5 spectrum: 78% of the exact energy in
    # directions 2..r captured without this QR, 99% with it, `python benches/bench_micro.py`; it costs
    # ≈ 1.1 ms). The LU basis P·L of the block spans the same space for ≈ 0.3 ms less, but it is not
    # orthogonal and the power step's fp32 rounding then costs energy (L15.down_proj rank 128: 0.9921 vs
    # 0.9960, same script), which is the margin the ≥ 99 % target needs.
    q = _orthonormalize(y)[0]
    if steps == 0:
        # No power iteration: Rayleigh–Ritz on the start block (one GEMM), the best rank-r basis inside it.
        z = mm(low_t, q) * inv
        return q @ torch.linalg.svd(z.transpose(-2, -1), full_matrices=False).U[..., :rank]
    done = 0
    out: Tensor | None = None  # filled per matrix once some matrices stop before others
    active = torch.arange(b, device=a.device)  # matrices still iterating
    while True:
        z = mm(low_t, q) * inv
        y = mm(low, z)
        done += 1
        # Y = Q·R; the left singular vectors of Y are Q·U_R with U_R from the SVD of the small k×k factor R:
        # ordered approximate singular vectors of A without another pass over A (Y weighs each direction
        # by σ² once more than a Rayleigh–Ritz step on span(Q) would, for one GEMM less).
        q, r = _orthonormalize(y)
        u, s = _small_svd(r)
        if done >= steps:
            break
        if not adaptive:
            continue
        # Adaptive, per matrix: the singular values of Y ≈ σ^(2·done+1) tell how flat the spectrum is between
        # the rank-th and the last column of the block; a flat one (ratio above SUBSPACE_FLAT_RATIO per power
        # of σ) converges slowly and gets another iteration, the others are done (so a matrix gets the same
        # basis in a batch as alone).
        ratio = (s[..., width - 1] / s[..., rank - 1].clamp_min(torch.finfo(a.dtype).tiny)) ** (1.0 / (2 * done + 1))
        flat = ratio > SUBSPACE_FLAT_RATIO if width > rank else torch.zeros_like(ratio, dtype=torch.bool)
        flat_list = flat.tolist()
        settled = [j for j, f in enumerate(flat_list) if not f]
        if len(settled) == len(flat_list):
            break
        if settled:  # only the flat ones go on
            if out is None:
                out = torch.empty(b, m, rank, dtype=a.dtype, device=a.device)
            out[active[settled]] = _basis_product(q[settled], u[settled, :, :rank])
            keep = [j for j, f in enumerate(flat_list) if f]
            active, q, inv = active[keep], q[keep], inv[keep]
            low = low[keep]
            low_t = low.transpose(-2, -1)
    basis = _basis_product(q, u[..., :rank])  # the matrices that iterated to the end
    if out is None:
        return basis
    out[active] = basis
    return out


def _basis_product(q: Tensor, u: Tensor) -> Tensor:
    """Q·U (the approximate singular vectors). On CUDA in fp64: the product of two orthonormal factors is
    orthonormal to fp32 rounding only if the GEMM is not run in TF32, which users often enable there."""
    if _gpu_path(q):
        return (q.double() @ u.double()).to(q.dtype)
    return q @ u
