"""gems.refresh: exact and fast basis refresh engines (orthonormality, quality, warm start, edge cases)."""
from __future__ import annotations

import pytest
import torch

from gems.refresh import REFRESH_METHODS, compute_basis, compute_bases

FAST = ("subspace_iter", "randomized")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small LAPACK calls (QR, eigh) are fastest on one thread, and on a CPU shared with other jobs
    OpenMP barriers in multi-threaded QR can take seconds per call; the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decaying(m: int, n: int, seed: int = 0, alpha: float = 1.0, noise: float = 1e-3) -> torch.Tensor:
    """U·diag((i+1)^-alpha)·Vᵀ plus a small noise floor: a gradient-like spectrum."""
    g = _gen(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = (torch.arange(k, dtype=torch.float64) + 1) ** -alpha
    out = (u * s) @ v.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64) / max(m, n) ** 0.5
    return out.float()


def captured(g: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    proj = basis.double().T @ g.double() if side == "left" else g.double() @ basis.double()
    return float(proj.pow(2).sum())


def exact_energy(g: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(g.double())
    return float(s[:rank].pow(2).sum())


def orth_error(basis: torch.Tensor) -> float:
    eye = torch.eye(basis.shape[1], dtype=torch.float64)
    return float((basis.double().T @ basis.double() - eye).abs().max())


def projector(basis: torch.Tensor) -> torch.Tensor:
    b = basis.double()
    return b @ b.T


SHAPES = [(48, 80), (80, 48), (37, 53), (61, 29), (64, 64)]


@pytest.mark.parametrize("method", REFRESH_METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", SHAPES)
def test_orthonormal_and_shape(method, side, shape):
    g = decaying(*shape, seed=1)
    dim = shape[0] if side == "left" else shape[1]
    for rank in (1, 7, min(shape) // 2, min(shape), dim):
        basis = compute_basis(g, rank, side, method=method, generator=_gen())
        assert basis.shape == (dim, rank)
        assert basis.dtype == torch.float32
        assert basis.is_contiguous()
        assert orth_error(basis) <= 1e-5, (method, side, shape, rank)


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (101, 77)])
def test_captured_energy_vs_exact(method, side, shape):
    g = decaying(*shape, seed=2)
    for rank in (4, 16, 40):
        basis = compute_basis(g, rank, side, method=method, generator=_gen())
        ratio = captured(g, basis, side) / exact_energy(g, rank)
        assert 0.99 <= ratio <= 1.0 + 1e-5, (method, side, shape, rank, ratio)


@pytest.mark.parametrize("side", ["left", "right"])
def test_ordered_singular_vectors(side):
    """Rayleigh–Ritz returns columns ordered like the exact singular vectors (well-separated spectrum)."""
    g = decaying(70, 90, seed=3, alpha=2.0, noise=0.0)
    exact = compute_basis(g, 5, side, method="svd")
    for method in FAST:
        basis = compute_basis(g, 5, side, method=method, generator=_gen(), iters=4)
        cos = (exact.double().T @ basis.double()).diagonal().abs()
        assert torch.all(cos > 0.999), (method, cos)


def test_svd_matches_reference_bit_for_bit():
    from gems.reference import top_singular_basis

    g = decaying(40, 70, seed=4)
    for side in ("left", "right"):
        assert torch.equal(compute_basis(g, 9, side), top_singular_basis(g, 9, side))
        # a batch of same-shape matrices too (the optimizer refreshes its weights together)
        mats = [g, decaying(40, 70, seed=5), decaying(40, 70, seed=6)]
        batched = compute_bases(mats, 9, side)
        assert len(batched) == len(mats)
        for b, m in zip(batched, mats):
            assert torch.equal(b, top_singular_basis(m, 9, side))


@pytest.mark.parametrize("side", ["left", "right"])
def test_warm_start_beats_cold_at_equal_iterations(side):
    """Basis from step k warm-starts the refresh at step k+gap (a slightly perturbed gradient)."""
    m, n, rank = 120, 200, 12
    g_old = decaying(m, n, seed=5, alpha=0.7)
    drift = decaying(m, n, seed=6, alpha=0.7)
    g_new = g_old + 0.05 * drift
    prev = compute_basis(g_old, rank, side, method="svd")
    target = exact_energy(g_new, rank)
    for iters in (0, 1):
        warm = compute_basis(g_new, rank, side, method="subspace_iter", previous=prev, iters=iters, generator=_gen())
        cold = compute_basis(g_new, rank, side, method="subspace_iter", iters=iters, generator=_gen())
        e_warm = captured(g_new, warm, side) / target
        e_cold = captured(g_new, cold, side) / target
        assert e_warm >= e_cold, (iters, e_warm, e_cold)
    # one warm iteration is already as good as the exact top-r basis to 99.9%; cold needs more
    assert captured(g_new, compute_basis(g_new, rank, side, method="subspace_iter", previous=prev, iters=1), side) >= 0.999 * target
    # the adaptive default stops early when the warm start is already converged: never worse than cold
    warm = compute_basis(g_new, rank, side, method="subspace_iter", previous=prev, generator=_gen())
    assert captured(g_new, warm, side) / target >= 0.999


def test_warm_start_ignores_incompatible_previous():
    g = decaying(50, 70, seed=7)
    for prev in (torch.randn(49, 6), torch.randn(50), torch.full((50, 6), float("nan")), torch.zeros(50, 0)):
        basis = compute_basis(g, 6, "left", method="subspace_iter", previous=prev, generator=_gen())
        assert basis.shape == (50, 6) and orth_error(basis) <= 1e-5
    # a previous basis with fewer / more columns than the new rank is used as far as it goes
    for cols in (3, 20):
        prev = compute_basis(g, cols, "left")
        basis = compute_basis(g, 6, "left", method="subspace_iter", previous=prev, generator=_gen())
        assert captured(g, basis, "left") >= 0.99 * exact_energy(g, 6)


@pytest.mark.parametrize("method", REFRESH_METHODS)
def test_deterministic_with_seeded_generator(method):
    g = decaying(64, 96, seed=8)
    prev = torch.linalg.qr(torch.randn(64, 10, generator=_gen(1))).Q
    a = compute_basis(g, 10, "left", method=method, previous=prev, generator=_gen(3))
    b = compute_basis(g, 10, "left", method=method, previous=prev, generator=_gen(3))
    assert torch.equal(a, b)
    # no generator: a fixed local seed, and torch's global random stream is left alone
    state = torch.random.get_rng_state()
    c = compute_basis(g, 10, "left", method=method)
    d = compute_basis(g, 10, "left", method=method)
    assert torch.equal(c, d)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("method", REFRESH_METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_zero_and_rank_deficient(method, side):
    m, n = 40, 60
    dim = m if side == "left" else n
    zero = torch.zeros(m, n)
    low = (torch.randn(m, 3, generator=_gen(1)) @ torch.randn(3, n, generator=_gen(2)))
    for g in (zero, low):
        for rank in (5, m, dim):
            basis = compute_basis(g, rank, side, method=method, generator=_gen())
            assert basis.shape == (dim, rank)
            assert torch.isfinite(basis).all()
            assert orth_error(basis) <= 1e-5, (method, side, rank)
    # the rank-3 matrix: the top-3 directions are found exactly, the rest is any orthonormal completion
    basis = compute_basis(low, 5, side, method=method, generator=_gen())
    assert captured(low, basis, side) >= (1 - 1e-5) * exact_energy(low, 3)


@pytest.mark.parametrize("method", REFRESH_METHODS)
def test_rank_beyond_short_side_completes_basis(method):
    """rank in (min(m, n), side dim]: the singular vectors plus an orthogonal seeded completion."""
    g = decaying(90, 30, seed=9)
    basis = compute_basis(g, 50, "left", method=method, generator=_gen())
    assert basis.shape == (90, 50) and orth_error(basis) <= 1e-5
    exact = compute_basis(g, 30, "left")
    # the whole column space of g is inside the basis
    resid = exact.double() - projector(basis) @ exact.double()
    assert float(resid.abs().max()) <= 1e-4


def test_bad_arguments():
    g = torch.randn(10, 20)
    with pytest.raises(ValueError, match="exceeds"):
        compute_basis(g, 11, "left")
    with pytest.raises(ValueError, match="exceeds"):
        compute_basis(g, 21, "right", method="subspace_iter")
    with pytest.raises(ValueError, match="refresh must be"):
        compute_basis(g, 2, "left", method="qr")
    with pytest.raises(ValueError, match="side"):
        compute_basis(g, 2, "up")
    with pytest.raises(ValueError, match="2-D"):
        compute_basis(torch.randn(3, 4, 5), 2, "left")
    with pytest.raises(ValueError, match="rank"):
        compute_basis(g, -1, "left")
    with pytest.raises(ValueError, match="iters"):
        compute_basis(g, 2, "left", method="subspace_iter", iters=-1)
    with pytest.raises(ValueError, match="oversample"):
        compute_basis(g, 2, "left", method="randomized", oversample=-1)
    assert compute_basis(g, 0, "right", method="subspace_iter").shape == (20, 0)


@pytest.mark.parametrize("method", REFRESH_METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises(method, bad):
    g = torch.randn(12, 18)
    g[3, 7] = bad
    with pytest.raises(ValueError, match="non-finite"):
        compute_basis(g, 4, "left", method=method)
    with pytest.raises(ValueError, match="non-finite"):
        compute_bases([torch.randn(12, 18), g], 4, "left", method=method)


@pytest.mark.parametrize("method", REFRESH_METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_unbatched(method, side):
    mats = [decaying(50, 70, seed=s) for s in range(3)] + [decaying(33, 21, seed=9)] + [decaying(50, 70, seed=4)]
    dims = [(m.shape[0] if side == "left" else m.shape[1]) for m in mats]
    prev = [torch.linalg.qr(torch.randn(d, 8, generator=_gen(i))).Q for i, d in enumerate(dims)]
    prev[1] = None
    batched = compute_bases(mats, 8, side, method=method, previous=prev, generator=_gen(5))
    assert len(batched) == len(mats)
    # same-shape matrices are batched; their random draws come in list order, so a loop over the same
    # shapes with one shared generator reproduces them
    same = [0, 1, 2, 4]
    gen = _gen(5)
    looped = {i: compute_basis(mats[i], 8, side, method=method, previous=prev[i], generator=gen) for i in same}
    for i in same:
        diff = (projector(batched[i]) - projector(looped[i])).abs().max()
        assert float(diff) <= 1e-4, (i, float(diff))
    for b, m in zip(batched, mats):
        assert orth_error(b) <= 1e-5
        side_dim = m.shape[0] if side == "left" else m.shape[1]
        assert b.shape == (side_dim, 8)
    with pytest.raises(ValueError, match="previous"):
        compute_bases(mats, 8, side, method=method, previous=prev[:2])
    assert compute_bases([], 8, side, method=method) == []


@pytest.mark.parametrize("method", REFRESH_METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_input(method, dtype):
    g32 = decaying(64, 100, seed=10)
    g = g32.to(dtype)
    basis = compute_basis(g, 8, "right", method=method, generator=_gen())
    assert basis.dtype == torch.float32 and orth_error(basis) <= 1e-5
    # fp32 accumulation: the basis is as good for the rounded matrix as the exact one
    ratio = captured(g.float(), basis, "right") / exact_energy(g.float(), 8)
    assert ratio >= 0.99


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_tiny_and_huge_scales(method, scale):
    """No underflow/overflow in A·Aᵀ·Q: the basis does not depend on the matrix's scale."""
    g = decaying(48, 64, seed=11)
    ref = compute_basis(g, 6, "left", method=method, generator=_gen())
    scaled = compute_basis(g * scale, 6, "left", method=method, generator=_gen())
    assert torch.isfinite(scaled).all() and orth_error(scaled) <= 1e-5
    assert float((projector(ref) - projector(scaled)).abs().max()) <= 1e-4


def test_fixed_iterations_improve_quality():
    g = decaying(120, 160, seed=12, alpha=0.5)
    energies = [captured(g, compute_basis(g, 10, "left", method="randomized", iters=q, oversample=2, generator=_gen()), "left")
                for q in (0, 1, 3)]
    assert energies[0] <= energies[1] <= energies[2] <= exact_energy(g, 10) * (1 + 1e-6)


@pytest.mark.parametrize("method", FAST)
def test_bf16_matmul_option(method):
    """GEMMs on bf16 operands (fp32 accumulation): orthonormal fp32 basis, same captured energy."""
    g = decaying(80, 120, seed=13)
    basis = compute_basis(g, 10, "left", method=method, matmul_dtype=torch.bfloat16, generator=_gen())
    assert basis.dtype == torch.float32 and orth_error(basis) <= 1e-5
    assert captured(g, basis, "left") >= 0.99 * exact_energy(g, 10)
    batched = compute_bases([g, g * 2], 10, "left", method=method, matmul_dtype=torch.bfloat16, generator=_gen())
    assert len(batched) == 2 and all(b.shape == (80, 10) and orth_error(b) <= 1e-5 for b in batched)
    assert all(captured(m, b, "left") >= 0.99 * exact_energy(m, 10) for m, b in zip([g, g * 2], batched))


def test_adaptive_default_stops_early_when_warm_start_is_converged(monkeypatch):
    g = decaying(90, 140, seed=14)
    prev = compute_basis(g, 8, "left")
    calls = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: calls.append(1) or real_qr(*a, **k))
    compute_basis(g, 8, "left", method="subspace_iter", previous=prev, generator=_gen())
    warm_calls = len(calls)
    calls.clear()
    compute_basis(g, 8, "left", method="subspace_iter", iters=4, generator=_gen())
    assert warm_calls < len(calls)


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("spike", [30.0, 100.0])
def test_one_dominant_direction_does_not_drown_the_others(method, spike):
    """σ₁ far above the rest: the total energy hides a basis whose directions 2..r are noise, so the energy
    of directions 2..r (the exact top-r basis minus its first vector) is checked on its own."""
    g = decaying(144, 384, seed=21, alpha=0.5).double()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    s[0] = s[0] * spike
    g = ((u * s) @ vh).float()
    r = 32
    basis = compute_basis(g, r, "left", method=method, generator=_gen())
    rest = g.double() - torch.outer(u[:, 0], u[:, 0]) @ g.double()  # g without its top direction
    exact_rest = float(s[1:r].pow(2).sum())
    assert captured(rest, basis, "left") >= 0.95 * exact_rest


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape,rank", [((576, 1536), 128), ((576, 576), 512), ((300, 300), 299)])
def test_cuda_refresh_small_svd_driver_and_fallback(shape, rank):
    """On CUDA the k×k factor goes through CUDA_SMALL_SVD_DRIVER (gesvda), which failed to converge at rank
    512 of a 576×576 matrix on an H100: the fallback must answer with an orthonormal, high-energy basis."""
    g = decaying(*shape, seed=31, alpha=0.5).cuda()
    basis = compute_basis(g, rank, "left", method="subspace_iter", generator=_gen())
    assert basis.is_cuda and orth_error(basis.cpu()) <= 1e-5
    assert captured(g.cpu(), basis.cpu(), "left") >= 0.99 * exact_energy(g.cpu(), rank)


def _conditioned(b: int, d: int, k: int, cond: float, seed: int) -> torch.Tensor:
    """b×d×k stack with singular values spread log-evenly over [1/cond, 1]."""
    g = _gen(seed)
    u = torch.linalg.qr(torch.randn(b, d, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(b, k, k, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return ((u * s) @ v.transpose(-2, -1)).float()


def test_cholesky_qr_factorizes_and_falls_back(monkeypatch):
    """The CUDA orthonormalisation (CholeskyQR2, fp64 first pass), run here on CPU: Q orthonormal and
    Q·R = Y up to cond 1e6; rank-deficient and zero blocks are flagged and redone with Householder QR."""
    from gems import solvers

    good = torch.cat([_conditioned(2, 90, 12, 10.0, 1), _conditioned(2, 90, 12, 1e6, 2)])
    q, r, ok = solvers._cholesky_qr(good)
    assert bool(ok.all())
    for i in range(good.shape[0]):
        assert orth_error(q[i]) <= 1e-5
        assert float((q[i] @ r[i] - good[i]).abs().max()) <= 1e-5 * float(good[i].abs().max())
    deficient = good.clone()
    deficient[0, :, 5] = deficient[0, :, 0] * 3  # rank 11 of 12 up to fp32 rounding: either path may answer
    deficient[1, :, 7] = 0  # exactly rank-deficient: the Cholesky factorisation fails
    deficient[3] = 0
    _, _, ok = solvers._cholesky_qr(deficient)
    assert ok.tolist()[1:] == [False, True, False]
    monkeypatch.setattr(solvers, "_use_cholesky", lambda y: True)
    q, r = solvers._orthonormalize(deficient)
    for i in range(deficient.shape[0]):
        assert torch.isfinite(q[i]).all() and orth_error(q[i]) <= 1e-5
        assert float((q[i] @ r[i] - deficient[i]).abs().max()) <= 1e-5 * max(float(deficient[i].abs().max()), 1.0)


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("side", ["left", "right"])
def test_cholesky_path_matches_householder(monkeypatch, method, side):
    """The whole engine with CholeskyQR (the CUDA path) finds bases as good as with Householder QR, on
    decaying, flat, rank-deficient and zero matrices in one batch."""
    from gems import solvers

    mats = [decaying(60, 90, seed=21), decaying(60, 90, seed=22, alpha=0.5), torch.zeros(60, 90),
            torch.randn(60, 3, generator=_gen(3)) @ torch.randn(3, 90, generator=_gen(4))]
    house = compute_bases(mats, 10, side, method=method, generator=_gen())
    monkeypatch.setattr(solvers, "_use_cholesky", lambda y: True)
    chol = compute_bases(mats, 10, side, method=method, generator=_gen())
    assert len(house) == len(chol) == len(mats)
    for g, h, c in zip(mats, house, chol):
        assert torch.isfinite(c).all() and orth_error(c) <= 1e-5
        assert captured(g, c, side) >= (1 - 1e-4) * captured(g, h, side) - 1e-12


def test_polish_orthonormalizes_and_keeps_leading_spans():
    from gems import solvers

    q = torch.linalg.qr(torch.randn(3, 40, 40, generator=_gen(6), dtype=torch.float64)).Q
    noisy = (q + 3e-5 * torch.randn(q.shape, generator=_gen(7), dtype=torch.float64)).float()
    noisy[2] = float("nan")  # a failed factorisation is passed through untouched
    out = solvers._polish(noisy)
    for i in range(2):
        assert orth_error(out[i]) <= 2e-6 < orth_error(noisy[i])
        for lead in (1, 7, 25):
            assert float((projector(out[i][:, :lead]) @ noisy[i][:, :lead].double()
                          - noisy[i][:, :lead].double()).abs().max()) <= 1e-5
    assert torch.isnan(out[2]).all()


@pytest.mark.parametrize("method", REFRESH_METHODS)
def test_per_matrix_generators(method):
    """A list of generators (one per matrix, as the optimizer batches weights with their own seeds) gives
    each matrix the draws of its own compute_basis call."""
    mats = [decaying(40, 56, seed=s) for s in range(3)]
    batched = compute_bases(mats, 6, "left", method=method, generator=[_gen(10 + i) for i in range(3)])
    for i, m in enumerate(mats):
        alone = compute_basis(m, 6, "left", method=method, generator=_gen(10 + i))
        assert float((projector(batched[i]) - projector(alone)).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match="generator"):
        compute_bases(mats, 6, "left", method=method, generator=[_gen(), _gen()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batched_refresh_matches_single():
    """A CUDA stack goes through batched CholeskyQR and the batched gesvda; a zero and a rank-deficient
    matrix in the same stack take the per-matrix fallbacks without disturbing the others."""
    mats = [decaying(576, 1536, seed=s).cuda() for s in range(6)]
    mats[2] = torch.zeros_like(mats[2])
    mats[4] = (torch.randn(576, 3, generator=_gen(4)) @ torch.randn(3, 1536, generator=_gen(5))).cuda()
    gens = [_gen(40 + i) for i in range(len(mats))]
    batched = compute_bases(mats, 128, "left", method="subspace_iter", generator=gens)
    for i, m in enumerate(mats):
        alone = compute_basis(m, 128, "left", method="subspace_iter", generator=_gen(40 + i))
        b, g = batched[i].cpu(), m.cpu()
        assert torch.isfinite(b).all() and orth_error(b) <= 1e-5, (i, orth_error(b), orth_error(alone.cpu()))
        assert captured(g, b, "left") >= (1 - 1e-4) * captured(g, alone.cpu(), "left") - 1e-12
        if i not in (2, 4):
            assert captured(g, b, "left") >= 0.99 * exact_energy(g, 128)


def test_orthonormalize_against_many_matches_reference_up_to_signs(monkeypatch):
    """The batched orthonormalisation of task bases against shared bases (both QR paths) spans what the
    reference spans, stays orthogonal to the shared basis, has canonical column signs, and takes the
    reference's seeded completion for a vector that lies inside the shared basis."""
    from gems import refresh, solvers
    from gems.reference import orthonormalize_against

    shared = [torch.linalg.qr(torch.randn(30, 6, generator=_gen(i))).Q for i in range(3)]
    vecs = [torch.linalg.qr(torch.randn(30, 4, generator=_gen(10 + i))).Q for i in range(3)]
    vecs[2][:, 1] = shared[2][:, 0]  # inside span(shared): must be replaced by a seeded random direction
    for chol in (False, True):
        monkeypatch.setattr(solvers, "_use_cholesky", lambda y, chol=chol: chol)
        got = refresh.orthonormalize_against_many(vecs, shared, [_gen(20 + i) for i in range(3)])
        for i in range(3):
            want = orthonormalize_against(vecs[i], shared[i], _gen(20 + i))
            assert orth_error(got[i]) <= 1e-5
            assert float((shared[i].T @ got[i]).abs().max()) <= 1e-5
            assert float((projector(got[i]) - projector(want)).abs().max()) <= 1e-5
            top = got[i].gather(0, got[i].abs().argmax(dim=0, keepdim=True))
            assert bool((top > 0).all())


def test_canonical_signs_are_invariant_to_column_flips():
    from gems.refresh import canonical_signs

    q = torch.linalg.qr(torch.randn(20, 5, generator=_gen(30))).Q
    flipped = q * torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0])
    assert torch.equal(canonical_signs(q), canonical_signs(flipped))
    assert canonical_signs(torch.zeros(20, 0)).shape == (20, 0)


def test_batched_adaptive_iterations_are_decided_per_matrix():
    """A steep spectrum batched with a flat one gets the basis it gets alone (one power iteration), while
    the flat one gets its second iteration; every basis owns its storage."""
    steep, flat = decaying(200, 300, seed=41, alpha=1.5), decaying(200, 300, seed=42, alpha=0.3)
    gens = lambda: [_gen(50), _gen(51)]  # noqa: E731
    batched = compute_bases([steep, flat], 24, "left", method="subspace_iter", generator=gens())
    for i, g in enumerate((steep, flat)):
        alone = compute_basis(g, 24, "left", method="subspace_iter", generator=gens()[i])
        assert float((projector(batched[i]) - projector(alone)).abs().max()) <= 1e-5, i
        assert batched[i].untyped_storage().nbytes() == batched[i].numel() * 4
    forced = compute_basis(steep, 24, "left", method="subspace_iter", generator=_gen(50), iters=2)
    assert float((projector(batched[0]) - projector(forced)).abs().max()) > 1e-4  # it really stopped at one


@pytest.fixture
def gpu_path(monkeypatch):
    """Run the CUDA code paths of the engine on CPU: batched CholeskyQR with its Householder fallback, the
    small-SVD driver call with its retries, fallbacks and polish, fp64 checks and products (the solvers are
    LAPACK's, the logic is the CUDA one)."""
    from gems import solvers

    monkeypatch.setattr(solvers, "_gpu_path", lambda t: True)
    return solvers


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("side", ["left", "right"])
def test_gpu_code_path_on_cpu_matches_cpu_path(gpu_path, monkeypatch, method, side):
    mats = [decaying(60, 90, seed=61), decaying(60, 90, seed=62, alpha=0.3), torch.zeros(60, 90),
            torch.randn(60, 3, generator=_gen(63)) @ torch.randn(3, 90, generator=_gen(64)),
            decaying(60, 90, seed=65) * 1e-30]
    gens = lambda: [_gen(70 + i) for i in range(len(mats))]  # noqa: E731
    got = compute_bases(mats, 10, side, method=method, generator=gens())
    monkeypatch.setattr(gpu_path, "_gpu_path", lambda t: False)  # the CPU path, same draws
    want = compute_bases(mats, 10, side, method=method, generator=gens())
    assert len(got) == len(want) == len(mats)
    for g, b, w in zip(mats, got, want):
        assert torch.isfinite(b).all() and orth_error(b) <= 1e-5
        assert captured(g, b, side) >= (1 - 1e-4) * captured(g, w, side) - 1e-70


def test_gpu_code_path_small_svd_retries_and_fallbacks(gpu_path, monkeypatch):
    """The batched driver call fails (as gesvda does when one matrix does not converge): every matrix is
    retried alone; one that fails again, and one whose vectors come back not orthonormal, take the default
    driver; a slightly rough one is polished. All results are orthonormal with the right singular values."""
    real = gpu_path._driver_svd
    calls = []

    def flaky(x):
        calls.append(x.dim())
        if x.dim() == 3:
            raise torch.linalg.LinAlgError("batch did not converge")
        u, s, vh = real(x)
        if len(calls) == 3:
            raise torch.linalg.LinAlgError("this one neither")
        if len(calls) == 4:
            u = u + 1e-3  # not orthonormal: the default driver redoes it
        if len(calls) == 5:
            u = u + 1e-6 * torch.randn(u.shape, generator=_gen(80))  # rough: polished
        return u, s, vh

    monkeypatch.setattr(gpu_path, "_driver_svd", flaky)
    r = torch.randn(5, 16, 16, generator=_gen(81))
    u, s = gpu_path._small_svd(r)
    assert calls == [3, 2, 2, 2, 2, 2]
    for i in range(5):
        assert orth_error(u[i]) <= 1e-6
        torch.testing.assert_close(s[i], torch.linalg.svdvals(r[i]), atol=1e-5, rtol=1e-5)
        # U spans the same leading singular subspaces as LAPACK's U (up to signs)
        ref = torch.linalg.svd(r[i]).U
        assert float((projector(u[i][:, :4]) - projector(ref[:, :4])).abs().max()) <= 1e-4


@pytest.mark.parametrize("stash", ["full", "projected"])
def test_gpu_code_path_in_the_optimizer(gpu_path, monkeypatch, stash):
    """The optimizer with the weights refreshed together (in step, or in backward with the projected stash)
    through the CUDA code path trains like the plain CPU path (same generators; the fp64 products and
    CholeskyQR differ from Householder only by rounding)."""
    from helpers import SameShapesNet, make_opt, task_batches, train

    from gems import subspaces

    params = {}
    for mode in ("gpu", "cpu"):
        monkeypatch.setattr(gpu_path, "_gpu_path", lambda t, on=mode == "gpu": on)
        monkeypatch.setitem(subspaces.REFRESH_BATCH_BYTES, "cpu", (1 << 30) if mode == "gpu" else 0)
        torch.manual_seed(90)
        model = SameShapesNet()
        opt = make_opt(model, refresh="subspace_iter", update_proj_gap=2, stash=stash)
        train(model, opt, task_batches(5, seed=91))
        params[mode] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(params["gpu"], params["cpu"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
