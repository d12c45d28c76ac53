"""gems_kernels (Triton) against gems.reference, per docs/kernel_contract.md.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set below, before triton is imported). Rules
(DESIGN.md §5): every GEMM-bearing output's max error against an fp64 reference is at most 2× that of a
same-precision PyTorch implementation (plus a floor of 4 fp32 ulps of the output's scale); the Adam
epilogue alone (exact projections through coordinate-selection bases) matches fp32 to atol 1e-6, rtol 1e-5.
Fresh random inputs (seeded), outputs poisoned with NaN before each run, every element checked.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

from gems import reference as R  # noqa: E402

from conftest import in_ci, require  # noqa: E402

require("triton")

import gems_kernels as gk  # noqa: E402

if not torch.cuda.is_available() and not gk.available()[0]:
    # gems_kernels was imported earlier in this session without the interpreter: reload it under it.
    from gems_kernels import _utils as _u, back_project_update as _b, project_adam as _p

    for _mod in (_u, _p, _b, gk):
        importlib.reload(_mod)

OK, WHY = gk.available()
if not OK and in_ci():  # triton is installed in CI, where the kernels must load (interpreted on CPU)
    pytest.fail(f"gems_kernels unavailable in CI: {WHY}", pytrace=False)
pytestmark = pytest.mark.skipif(not OK, reason=f"gems_kernels unavailable: {WHY}")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
SHAPES = [(37, 70), (70, 37), (64, 48)]


# ----------------------------------------------------------------------------------------------- helpers
def _gen(*key) -> torch.Generator:
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    return g


def _randn(shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEV)


def _orth(d, r, gen):
    if r == 0:
        return torch.zeros(d, 0, device=DEV)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    return q.float().contiguous().to(DEV)


def _select(d, r, gen):
    """Orthonormal basis of r distinct coordinate vectors: projections through it are exact."""
    idx = torch.randperm(d, generator=gen)[:r]
    b = torch.zeros(d, r)
    b[idx, torch.arange(r)] = 1.0
    return b.to(DEV)


def _coord(shape, side, r):
    return R.coord_shape(shape, side, r)


@pytest.fixture
def poison_empty(monkeypatch):
    """Every float tensor allocated with torch.empty during the test starts as NaN (kernel outputs
    that are allocated inside the launchers are poisoned too)."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield


def _max_err(x, ref):
    if ref.numel() == 0:
        return 0.0
    return (x.double() - ref).abs().max().item()


def _check_2x(name, out, ref64, same_prec):
    """Kernel error ≤ 2× the same-precision torch error + a floor of 4 fp32 ulps of the scale."""
    assert out.shape == ref64.shape, name
    if ref64.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten poison?)"
    e_k = _max_err(out, ref64)
    e_t = _max_err(same_prec, ref64)
    floor = 4 * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert e_k <= 2 * e_t + floor, f"{name}: kernel err {e_k:.3e} > 2 × torch err {e_t:.3e} + {floor:.1e}"


def _make_problem(shape, side, dtype, ranks, K, T, gen, basis=_orth):
    m, n = shape
    d = R.side_dim(shape, side)
    grads = [[_randn((m, n), gen, dtype) for _ in range(T)] for _ in range(K)]
    bases = [[basis(d, r, gen) for r in ranks] for _ in range(K)]
    m0 = [[_randn(_coord(shape, side, r), gen, scale=0.1) for r in ranks] for _ in range(K)]
    v0 = [[_randn(_coord(shape, side, r), gen, scale=0.1) ** 2 for r in ranks] for _ in range(K)]
    w = torch.rand(T, generator=gen, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    return grads, w, bases, m0, v0


def _torch_project_adam(grads, w, bases, m0, v0, side, step, **adam):
    """Straightforward torch implementation in the gradients' working precision, fp32 state."""
    dt = grads[0].dtype
    g_sh = R.shared_gradient(grads, w).to(dt)
    outs = []
    for s, b in enumerate(bases):
        g = g_sh if s == 0 else grads[s - 1]
        r = R.project(g, b.to(dt), side).float()
        m, v = m0[s].clone(), v0[s].clone()
        outs.append((R.adam_delta(r, m, v, step, **adam), m, v))
    return outs


def _fp64_project_adam(grads, w, bases, m0, v0, side, step, **adam):
    g64 = [g.double() for g in grads]
    g_sh = R.shared_gradient(g64, w)
    outs = []
    for s, b in enumerate(bases):
        g = g_sh if s == 0 else g64[s - 1]
        r = R.project(g, b.double(), side)
        m, v = m0[s].double(), v0[s].double()
        outs.append((R.adam_delta(r, m, v, step, **adam), m, v))
    return outs


def _run_project_adam(grads, w, bases, m0, v0, side, step, **adam):
    ms = [[x.clone() for x in row] for row in m0]
    vs = [[x.clone() for x in row] for row in v0]
    deltas = gk.project_adam(grads, w, bases, ms, vs, side=side, step=step, **adam)
    return deltas, ms, vs


def _check_project_adam(grads, w, bases, m0, v0, side, step, **adam):
    K = len(grads)
    deltas, ms, vs = _run_project_adam(grads, w, bases, m0, v0, side, step, **adam)
    assert len(deltas) == K and all(len(row) == len(bases[0]) for row in deltas)
    for k in range(K):
        ref = _fp64_project_adam(grads[k], w, bases[k], m0[k], v0[k], side, step, **adam)
        tch = _torch_project_adam(grads[k], w, bases[k], m0[k], v0[k], side, step, **adam)
        for s in range(len(bases[k])):
            assert deltas[k][s].dtype == torch.float32
            # the moments are GEMM-bearing (linear / quadratic in the projected gradient): 2× rule
            _check_2x(f"exp_avg[{k}][{s}]", ms[k][s], ref[s][1], tch[s][1])
            _check_2x(f"exp_avg_sq[{k}][{s}]", vs[k][s], ref[s][2], tch[s][2])
            # δ is an elementwise function of the new moments; its max error against fp64 is not a fair
            # GEMM measure (m/√v amplifies single elements), so check it elementwise from the kernel's own
            # moments in fp32 (atol 1e-6, rtol 1e-5); the selection-basis test checks δ end to end.
            torch.testing.assert_close(deltas[k][s], _adam_delta_from_moments(ms[k][s], vs[k][s], step, **adam),
                                       atol=1e-6, rtol=1e-5)


def _adam_delta_from_moments(m, v, step, *, lr, beta1, beta2, eps):
    """The tail of gems.reference.adam_delta, from already-updated moments (fp32)."""
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
    return torch.zeros_like(m).addcdiv_(m, denom, value=-lr / bc1)


def _torch_back_update(w, bases, coeffs, deltas, side, lr, wd, qb, dside):
    """Working precision: gated bases and δ cast to W's dtype, one GEMM, apply_update in W's dtype."""
    dt = w.dtype
    out = w.clone()
    upd = None
    for c, b, d in zip(coeffs, bases, deltas):
        if b.shape[1] == 0:
            continue
        term = R.project_back(d.to(dt), (c * b).to(dt), side)
        upd = term if upd is None else upd + term
    if upd is None:
        upd = torch.zeros_like(out)
    R.apply_update(out, upd, lr=lr, weight_decay=wd, decay_basis=qb, decay_side=dside)
    return out


def _fp64_back_update(w, bases, coeffs, deltas, side, lr, wd, qb, dside):
    out = w.double()
    upd = torch.zeros_like(out)
    for c, b, d in zip(coeffs, bases, deltas):
        upd = upd + c * R.project_back(d.double(), b.double(), side)
    R.apply_update(out, upd, lr=lr, weight_decay=wd, decay_basis=None if qb is None else qb.double(),
                   decay_side=dside)
    return out


def _check_back_update(weights, bases, coeffs, deltas, side, lr, wd, decay_bases=None, decay_side="right"):
    K = len(weights)
    outs = [w.clone() for w in weights]
    for o in outs:  # poison nothing here: W is read (in/out); check every element changes as the reference
        assert torch.isfinite(o).all()
    gk.back_project_update(outs, bases, coeffs, deltas, side=side, lr=lr, weight_decay=wd,
                           decay_bases=decay_bases, decay_side=decay_side)
    for k in range(K):
        qb = None if decay_bases is None else decay_bases[k]
        ref = _fp64_back_update(weights[k], bases[k], coeffs, deltas[k], side, lr, wd, qb, decay_side)
        tch = _torch_back_update(weights[k], bases[k], coeffs, deltas[k], side, lr, wd, qb, decay_side)
        assert outs[k].dtype == weights[k].dtype
        _check_2x(f"W[{k}]", outs[k], ref, tch)
    return outs


def _make_back_problem(shape, side, dtype, ranks, K, gen, delta_scale=1e-2):
    m, n = shape
    d = R.side_dim(shape, side)
    weights = [_randn((m, n), gen, dtype) for _ in range(K)]
    bases = [[_orth(d, r, gen) for r in ranks] for _ in range(K)]
    deltas = [[_randn(_coord(shape, side, r), gen, scale=delta_scale) for r in ranks] for _ in range(K)]
    coeffs = [1.0] + [float(x) for x in (torch.rand(len(ranks) - 1, generator=gen) + 0.25)]
    return weights, bases, coeffs, deltas


# ----------------------------------------------------------------------------------------------- basics
def test_available():
    ok, why = gk.available()
    assert ok and why == ""
    assert callable(gk.project_adam) and callable(gk.back_project_update)


def test_import_without_triton_is_guarded():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked for this test")
        sys.meta_path.insert(0, Block())
        import gems_kernels as gk
        ok, why = gk.available()
        assert not ok and "triton" in why, why
        from gems.errors import BackendUnavailableError
        try:
            gk.project_adam([], [], [], [], [], side="left", step=1, lr=1, beta1=.9, beta2=.9, eps=0)
        except BackendUnavailableError as e:
            print("OK", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


# ----------------------------------------------------------------------------------------------- project_adam
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_project_adam_matches_reference(side, dtype, shape, poison_empty):
    gen = _gen("pa", side, dtype, shape)
    problem = _make_problem(shape, side, dtype, ranks=[12, 7, 5], K=3, T=2, gen=gen)
    _check_project_adam(*problem, side=side, step=3, **ADAM)


@pytest.mark.parametrize("side", ["left", "right"])
def test_project_adam_full_rank_and_empty_task(side, poison_empty):
    """rank = min(m, n) (what the caller clamps to) for shared and one task; the other task has rank 0."""
    shape = (37, 70) if side == "left" else (70, 37)
    r = min(shape)
    gen = _gen("pa-full", side)
    problem = _make_problem(shape, side, torch.float32, ranks=[r, r, 0], K=3, T=2, gen=gen)
    deltas, _, _ = _run_project_adam(*problem, side=side, step=1, **ADAM)
    assert deltas[0][2].shape == _coord(shape, side, 0)
    _check_project_adam(*problem, side=side, step=1, **ADAM)


def test_project_adam_three_tasks_one_weight(poison_empty):
    gen = _gen("pa-3")
    problem = _make_problem((48, 40), "right", torch.float16, ranks=[9, 4, 6, 3], K=1, T=3, gen=gen)
    _check_project_adam(*problem, side="right", step=7, **ADAM)


def test_project_adam_all_ranks_zero():
    gen = _gen("pa-0")
    grads, w, bases, m0, v0 = _make_problem((20, 30), "left", torch.float32, ranks=[0, 0, 0], K=2, T=2, gen=gen)
    deltas = gk.project_adam(grads, w, bases, m0, v0, side="left", step=1, **ADAM)
    assert [[tuple(d.shape) for d in row] for row in deltas] == [[(0, 30)] * 3] * 2


@pytest.mark.parametrize("beta1,step", [(0.9, 1), (0.3, 5)], ids=["b0.9-s1", "b0.3-s5-lerp-hi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_project_adam_epilogue_elementwise(side, dtype, beta1, step, poison_empty):
    """Coordinate-selection bases make every projection exact, so the fused Adam epilogue is compared
    elementwise against gems.reference.adam_delta in fp32 (atol 1e-6, rtol 1e-5)."""
    shape = (40, 24)
    gen = _gen("epi", side, dtype, beta1)
    adam = dict(ADAM, beta1=beta1)
    grads, w, bases, m0, v0 = _make_problem(shape, side, dtype, ranks=[8, 6, 3], K=2, T=2, gen=gen, basis=_select)
    deltas, ms, vs = _run_project_adam(grads, w, bases, m0, v0, side, step, **adam)
    for k in range(2):
        g32 = [g.float() for g in grads[k]]
        g_sh = R.shared_gradient(g32, w)
        for s, b in enumerate(bases[k]):
            r = R.project(g_sh if s == 0 else g32[s - 1], b, side)
            m, v = m0[k][s].clone(), v0[k][s].clone()
            d = R.adam_delta(r, m, v, step, **adam)
            torch.testing.assert_close(ms[k][s], m, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(vs[k][s], v, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(deltas[k][s], d, atol=1e-6, rtol=1e-5)


def test_project_adam_batched_equals_one_by_one():
    gen = _gen("pa-batch")
    grads, w, bases, m0, v0 = _make_problem((33, 50), "left", torch.float32, ranks=[10, 4, 4], K=3, T=2, gen=gen)
    d_all, m_all, v_all = _run_project_adam(grads, w, bases, m0, v0, "left", 2, **ADAM)
    for k in range(3):
        d1, m1, v1 = _run_project_adam(grads[k:k + 1], w, bases[k:k + 1], m0[k:k + 1], v0[k:k + 1], "left", 2, **ADAM)
        for s in range(3):
            assert torch.equal(d_all[k][s], d1[0][s])
            assert torch.equal(m_all[k][s], m1[0][s]) and torch.equal(v_all[k][s], v1[0][s])


def test_project_adam_noncontiguous_state_and_no_stray_writes():
    """Moments that are transposed views are updated in place; moments carved out of a guarded buffer
    leave the guard (NaN canaries) untouched."""
    side, shape, ranks = "right", (30, 20), [6, 4, 2]
    gen = _gen("pa-guard")
    grads, w, bases, m0, v0 = _make_problem(shape, side, torch.float32, ranks=ranks, K=2, T=2, gen=gen)
    pad = 64
    guard = torch.full((2 * pad + sum(shape[0] * r for r in ranks),), float("nan"), device=DEV)
    ms, off = [], pad
    for r in ranks:  # weight 0: contiguous views into the guarded buffer
        view = guard[off:off + shape[0] * r].view(shape[0], r)
        view.copy_(m0[0][len(ms)])
        ms.append(view)
        off += shape[0] * r
    ms1 = [x.T.contiguous().T for x in m0[1]]  # weight 1: non-contiguous (column-major) moments
    assert not ms1[0].is_contiguous()
    vs = [[x.clone() for x in row] for row in v0]
    gk.project_adam(grads, w, bases, [ms, ms1], vs, side=side, step=2, **ADAM)
    assert torch.isnan(guard[:pad]).all() and torch.isnan(guard[-pad:]).all()
    ref = [_fp64_project_adam(grads[k], w, bases[k], m0[k], v0[k], side, 2, **ADAM) for k in range(2)]
    for s in range(3):
        torch.testing.assert_close(ms[s].double(), ref[0][s][1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ms1[s].double(), ref[1][s][1], atol=1e-6, rtol=1e-5)


def test_project_adam_boundary_errors():
    gen = _gen("pa-err")
    grads, w, bases, m0, v0 = _make_problem((20, 12), "left", torch.float32, ranks=[4, 2, 2], K=2, T=2, gen=gen)
    kw = dict(side="left", step=1, **ADAM)
    with pytest.raises(ValueError, match="side"):
        gk.project_adam(grads, w, bases, m0, v0, **dict(kw, side="up"))
    with pytest.raises(ValueError, match="step"):
        gk.project_adam(grads, w, bases, m0, v0, **dict(kw, step=0))
    with pytest.raises(ValueError, match="betas"):
        gk.project_adam(grads, w, bases, m0, v0, **dict(kw, beta1=1.0))
    with pytest.raises(ValueError, match="lr must be finite"):
        gk.project_adam(grads, w, bases, m0, v0, **dict(kw, lr=float("nan")))
    with pytest.raises(ValueError, match="shared_weights"):
        gk.project_adam(grads, w[:1], bases, m0, v0, **kw)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        gk.project_adam([[g.double() for g in row] for row in grads], w, bases, m0, v0, **kw)
    with pytest.raises(ValueError, match=r"task_grads\[1\]\[0\]"):
        gk.project_adam([grads[0], [grads[1][0][:, :5], grads[1][1]]], w, bases, m0, v0, **kw)
    with pytest.raises(ValueError, match="share their ranks"):
        gk.project_adam(grads, w, [bases[0], [bases[1][0][:, :3]] + bases[1][1:]], m0, v0, **kw)
    with pytest.raises(ValueError, match=r"bases\[0\]\[0\]"):
        gk.project_adam(grads, w, [[bases[0][0].T.contiguous()] + bases[0][1:], bases[1]], m0, v0, **kw)
    with pytest.raises(ValueError, match="exp_avg_sqs"):
        gk.project_adam(grads, w, bases, m0, [[x.double() for x in row] for row in v0], **kw)
    with pytest.raises(ValueError, match="list of 2"):
        gk.project_adam(grads, w, bases[:1], m0, v0, **kw)


def test_project_adam_checks_are_memoised_but_never_stale():
    """The second call with the same bases and moments skips their checks (U.CHECKED) and gives the same
    result as a fresh call; a replaced tensor and a tensor whose storage was swapped (``.data =``, another
    shape or dtype) are checked again (freed tensors: test_checked_operands_memo_rules)."""
    from gems_kernels import _utils as U

    gen = _gen("pa-memo")
    grads, w, bases, m0, v0 = _make_problem((20, 12), "left", torch.float32, ranks=[4, 2, 2], K=2, T=2, gen=gen)
    kw = dict(side="left", step=3, **ADAM)
    U.CHECKED.clear()
    ms, vs = [[x.clone() for x in row] for row in m0], [[x.clone() for x in row] for row in v0]
    gk.project_adam(grads, w, bases, ms, vs, **kw)
    assert len(U.CHECKED._d) == 1
    d2 = gk.project_adam(grads, w, bases, ms, vs, **kw)  # memo hit: same tensors
    U.CHECKED.clear()
    ms_b, vs_b = [[x.clone() for x in row] for row in m0], [[x.clone() for x in row] for row in v0]
    gk.project_adam(grads, w, bases, ms_b, vs_b, **kw)
    d2_ref = gk.project_adam(grads, w, bases, ms_b, vs_b, **kw)
    for k in range(2):
        for s in range(3):
            assert torch.equal(d2[k][s], d2_ref[k][s]) and torch.equal(ms[k][s], ms_b[k][s])
    # a replaced moment with the wrong shape
    bad = [row[:] for row in vs_b]
    bad[1][2] = torch.zeros(3, 12, device=DEV)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\]\[2\]"):
        gk.project_adam(grads, w, bases, ms_b, bad, **kw)
    # the same tensor object, its storage swapped for one of another shape
    vs_b[0][1].data = torch.zeros(3, 12, device=DEV)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\]\[1\]"):
        gk.project_adam(grads, w, bases, ms_b, vs_b, **kw)
    # a basis replaced by one of another dtype (same shape)
    bases2 = [row[:] for row in bases]
    bases2[1][0] = bases[1][0].double()
    with pytest.raises(ValueError, match=r"bases\[1\]\[0\]"):
        gk.project_adam(grads, w, bases2, ms, vs, **kw)
    # the same object reinterpreted as another dtype at the same address and shape, after a memoised call
    gk.project_adam(grads, w, bases, ms, vs, **kw)
    assert U.CHECKED.get(next(reversed(U.CHECKED._d)), [x for rows in (bases, ms, vs) for row in rows for x in row])
    v_int = vs[0][0].data
    vs[0][0].data = v_int.view(torch.int32)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\]\[0\]"):
        gk.project_adam(grads, w, bases, ms, vs, **kw)
    vs[0][0].data = v_int


@pytest.mark.parametrize("swap", ["new-storage", "transposed"])
def test_project_adam_memo_follows_a_swapped_storage(swap):
    """A memoised moment whose storage is swapped for another of the same shape (``.data =``: same object,
    another address) or for its own transpose (same address and shape, other strides) is checked again: the
    kernel updates what the tensor holds now, exactly as a call without the memo does."""
    from gems_kernels import _utils as U

    gen = _gen("pa-memo-swap")
    # right side of a 4×20 weight: the shared subspace's 4×r coordinates are square at rank 4
    shape, side = (4, 20), "right"
    grads, w, bases, m0, v0 = _make_problem(shape, side, torch.float32, ranks=[4, 2, 2], K=1, T=2, gen=gen)
    kw = dict(side=side, step=2, **ADAM)

    def run(memo: bool):
        U.CHECKED.clear()
        ms, vs = [[x.clone() for x in row] for row in m0], [[x.clone() for x in row] for row in v0]
        gk.project_adam(grads, w, bases, ms, vs, **kw)
        if not memo:
            U.CHECKED.clear()
        square = ms[0][0]
        assert square.shape[0] == square.shape[1]
        square.data = square.data.clone() * 2 if swap == "new-storage" else square.data.t()
        d = gk.project_adam(grads, w, bases, ms, vs, **kw)
        return d, ms, vs

    d_memo, ms_memo, vs_memo = run(True)
    d_ref, ms_ref, vs_ref = run(False)
    for s in range(3):
        assert torch.equal(d_memo[0][s], d_ref[0][s])
        assert torch.equal(ms_memo[0][s], ms_ref[0][s]) and torch.equal(vs_memo[0][s], vs_ref[0][s])


def test_checked_operands_memo_rules():
    from gems_kernels import _utils as U

    memo = U.CheckedOperands(capacity=2)
    a, b = torch.zeros(4, 3), torch.zeros(2, 3)
    memo.put("k", [a, b], "v")
    assert memo.get("k", [a, b]) == "v"
    assert memo.get("k", [a]) is None and memo.get("k", [b, a]) is None
    assert memo.get("k", [a, b.clone()]) is None  # another object, even if equal
    b.resize_(1, 3)  # same object and address, another shape
    assert memo.get("k", [a, b]) is None
    c = torch.zeros(2, 3)
    memo.put("c", [c], 1)
    del c  # freed: its weak reference dies, a new tensor at the same place is another object
    assert memo.get("c", [torch.zeros(2, 3)]) is None
    memo.put("x", [a], 2)
    memo.put("y", [a], 3)  # capacity 2: "k" and "c" evicted
    assert memo.get("k", [a, b]) is None and memo.get("y", [a]) == 3


def test_noncontiguous_operands_are_not_memoised():
    from gems_kernels import _utils as U

    gen = _gen("pa-memo-nc")
    grads, w, bases, m0, v0 = _make_problem((20, 12), "right", torch.float32, ranks=[4, 2, 2], K=1, T=2, gen=gen)
    U.CHECKED.clear()
    ms = [[x.T.contiguous().T for x in m0[0]]]  # column-major: copied and written back at every call
    vs = [[x.clone() for x in v0[0]]]
    for step in (1, 2):
        gk.project_adam(grads, w, bases, ms, vs, side="right", step=step, **ADAM)
    assert len(U.CHECKED._d) == 0
    ms_c, vs_c = [[x.clone() for x in m0[0]]], [[x.clone() for x in v0[0]]]
    for step in (1, 2):
        gk.project_adam(grads, w, bases, ms_c, vs_c, side="right", step=step, **ADAM)
    for s in range(3):
        assert torch.equal(ms[0][s], ms_c[0][s]) and torch.equal(vs[0][s], vs_c[0][s])


def test_back_project_update_memo_sees_replaced_weights():
    from gems_kernels import _utils as U

    gen = _gen("bp-memo")
    weights, bases, coeffs, deltas = _make_back_problem((24, 16), "left", torch.float32, [4, 2, 2], K=2, gen=gen)
    U.CHECKED.clear()
    kw = dict(side="left", lr=0.1, weight_decay=0.01)
    w_a = [x.clone() for x in weights]
    gk.back_project_update(w_a, bases, coeffs, deltas, **kw)
    gk.back_project_update(w_a, bases, coeffs, deltas, **kw)  # memo hit
    w_b = [x.clone() for x in weights]
    U.CHECKED.clear()
    gk.back_project_update(w_b, bases, coeffs, deltas, **kw)
    U.CHECKED.clear()
    gk.back_project_update(w_b, bases, coeffs, deltas, **kw)
    for k in range(2):
        assert torch.equal(w_a[k], w_b[k])
    w_a[1].data = torch.zeros(24, 15, device=DEV)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        gk.back_project_update(w_a, bases, coeffs, deltas, **kw)


# ----------------------------------------------------------------------------------------------- back_project_update
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_back_project_update_matches_reference(side, dtype, shape):
    gen = _gen("bp", side, dtype, shape)
    weights, bases, coeffs, deltas = _make_back_problem(shape, side, dtype, [12, 7, 5], K=3, gen=gen)
    _check_back_update(weights, bases, coeffs, deltas, side, lr=0.05, wd=0.1)


@pytest.mark.parametrize("decay_side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_back_project_update_decay_bases(side, dtype, decay_side):
    """Null-space-aware decay with protected directions Q_k (None for one weight: plain decay)."""
    shape = (37, 70) if side == "left" else (70, 37)
    gen = _gen("bp-q", side, dtype, decay_side)
    weights, bases, coeffs, deltas = _make_back_problem(shape, side, dtype, [9, 6, 0], K=3, gen=gen)
    dq = R.side_dim(shape, decay_side)
    qs = [_orth(dq, 5, gen), None, _orth(dq, 17, gen)]
    # a large lr·wd makes the decay term visible above the weight's rounding
    _check_back_update(weights, bases, coeffs, deltas, side, lr=0.5, wd=0.8, decay_bases=qs, decay_side=decay_side)


@pytest.mark.parametrize("lr,wd", [(0.05, 0.0), (0.0, 0.1)], ids=["no-decay", "lr0"])
def test_back_project_update_no_decay(lr, wd):
    gen = _gen("bp-nodecay", lr, wd)
    shape = (64, 48)
    weights, bases, coeffs, deltas = _make_back_problem(shape, "right", torch.float32, [8, 8, 4], K=2, gen=gen)
    qs = [_orth(48, 3, gen), _orth(48, 3, gen)]  # ignored when there is no decay, as in the reference
    _check_back_update(weights, bases, coeffs, deltas, "right", lr=lr, wd=wd, decay_bases=qs)


def test_back_project_update_protected_directions_not_decayed():
    """Property: with Δ = 0, the decay leaves W's part in span(Q) unchanged and shrinks the rest."""
    gen = _gen("bp-prop")
    m, n = 40, 30
    w = _randn((m, n), gen)
    q = _orth(n, 6, gen)
    b = [_orth(n, 4, gen)]
    d = [torch.zeros(m, 4, device=DEV)]
    out = w.clone()
    gk.back_project_update([out], [b], [1.0], [d], side="right", lr=0.5, weight_decay=0.2,
                           decay_bases=[q], decay_side="right")
    proj = lambda x: x @ q @ q.T  # noqa: E731
    torch.testing.assert_close(proj(out), proj(w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out - proj(out), 0.9 * (w - proj(w)), atol=1e-5, rtol=1e-5)


def test_back_project_update_full_rank_empty_task_and_guards():
    """rank = min(m, n), a rank-0 task, W carved out of a NaN-guarded buffer, one W non-contiguous."""
    side, shape = "left", (37, 70)
    gen = _gen("bp-full")
    r = min(shape)
    weights, bases, coeffs, deltas = _make_back_problem(shape, side, torch.float32, [r, r, 0], K=2, gen=gen)
    pad, numel = 50, shape[0] * shape[1]
    guard = torch.full((2 * pad + numel,), float("nan"), device=DEV)
    w0 = guard[pad:pad + numel].view(shape)
    w0.copy_(weights[0])
    w1 = weights[1].T.contiguous().T  # non-contiguous weight: updated in place through a copy
    gk.back_project_update([w0, w1], bases, coeffs, deltas, side=side, lr=0.05, weight_decay=0.1)
    assert torch.isnan(guard[:pad]).all() and torch.isnan(guard[-pad:]).all()
    for k, out in enumerate([w0, w1]):
        ref = _fp64_back_update(weights[k], bases[k], coeffs, deltas[k], side, 0.05, 0.1, None, "right")
        tch = _torch_back_update(weights[k], bases[k], coeffs, deltas[k], side, 0.05, 0.1, None, "right")
        _check_2x(f"W[{k}]", out, ref, tch)


def test_back_project_update_boundary_errors():
    gen = _gen("bp-err")
    weights, bases, coeffs, deltas = _make_back_problem((20, 12), "right", torch.float32, [4, 2, 2], K=2, gen=gen)
    kw = dict(side="right", lr=0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match="decay_side"):
        gk.back_project_update(weights, bases, coeffs, deltas, **kw, decay_side="middle")
    with pytest.raises(ValueError, match="coeffs"):
        gk.back_project_update(weights, bases, coeffs[:2], deltas, **kw)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        gk.back_project_update([weights[0], weights[1].half()], bases, coeffs, deltas, **kw)
    with pytest.raises(ValueError, match=r"deltas\[0\]\[1\]"):
        gk.back_project_update(weights, bases, coeffs, [[deltas[0][0], deltas[0][1].T] + deltas[0][2:], deltas[1]],
                               **kw)
    with pytest.raises(ValueError, match="decay_bases"):
        gk.back_project_update(weights, bases, coeffs, deltas, **kw, decay_bases=[None])
    with pytest.raises(ValueError, match=r"decay_bases\[0\]"):
        gk.back_project_update(weights, bases, coeffs, deltas, **kw, decay_bases=[torch.randn(5, 2), None])


# ----------------------------------------------------------------------------------------------- full step
@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_step_matches_gems_adam_step(side):
    """project_adam + back_project_update == gems.reference.gems_adam_step (fp32, 2 steps)."""
    shape, ranks = (48, 36), [10, 5, 5]
    gen = _gen("step", side)
    grads, w, bases, m0, v0 = _make_problem(shape, side, torch.float32, ranks, K=1, T=2, gen=gen)
    weight = _randn(shape, gen)
    gates = [0.6, 0.4]
    w_ref, w_ker = weight.clone(), weight.clone()
    mom_ref = [(m0[0][s].clone(), v0[0][s].clone()) for s in range(3)]
    m_k, v_k = [x.clone() for x in m0[0]], [x.clone() for x in v0[0]]
    for step in (1, 2):
        R.gems_adam_step(w_ref, grads[0], w, bases[0][0], bases[0][1:], gates, mom_ref, step, side=side,
                         weight_decay=0.01, scale=0.5, **ADAM)
        deltas = gk.project_adam(grads, w, bases, [m_k], [v_k], side=side, step=step, **ADAM)
        gk.back_project_update([w_ker], bases, [0.5, 0.5 * gates[0], 0.5 * gates[1]], deltas, side=side,
                               lr=ADAM["lr"], weight_decay=0.01)
    torch.testing.assert_close(w_ker, w_ref, atol=1e-6, rtol=1e-5)
    for s in range(3):
        torch.testing.assert_close(m_k[s], mom_ref[s][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v_k[s], mom_ref[s][1], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- compiled path
_COMPILE_SCRIPT = textwrap.dedent("""
    import sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from gems_kernels._utils import INTERPRET
    from gems_kernels.project_adam import _project_adam_kernel as PA
    from gems_kernels.back_project_update import _back_project_update_kernel as BP
    assert not INTERPRET
    full = sys.argv[1] == "full"
    def comp(fn, types, consts):
        sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3))
    pa = dict(g_tab="*i64", b_tab="*i64", m_tab="*i64", v_tab="*i64", o_tab="*i64", meta="*i32", w_tab="*fp32",
              M="i32", N="i32", T="i32", S="i32", NT="i32", lerp_w="fp32", beta2="fp32", one_minus_beta2="fp32",
              bc2_sqrt="fp32", neg_step_size="fp32", eps="fp32")
    bp = dict(w_tab="*i64", b_tab="*i64", d_tab="*i64", q_tab="*i64", u_tab="*i64", r_tab="*i32", c_tab="*fp32",
              M="i32", N="i32", S="i32", decay_mul="fp32", decay_coef="fp32")
    cases = [("bf16", False), ("fp32", True)] if not full else [(d, l) for d in ("fp32", "fp16", "bf16")
                                                                for l in (True, False)]
    for dt, left in cases:
        prec = "tf32x3" if dt == "fp32" else "tf32"
        k = comp(PA, dict(pa, G0="*" + dt), dict(LEFT=left, LERP_HI=False, DOT_PREC=prec, BLOCK_R=64,
                                                 BLOCK_C=128, BLOCK_D=32 if dt == "fp32" else 64))
        assert "mma" in k.asm["ptx"], "projection GEMM did not use tensor cores"
        k = comp(BP, dict(bp, W0="*" + dt), dict(LEFT=left, HAS_DECAY_BASIS=True, DECAY_LEFT=not left,
                                                 DOT_PREC=prec, BLOCK_M=64 if dt == "fp32" else 128,
                                                 BLOCK_N=128, BLOCK_K=32, GROUP_M=8))
        assert "mma" in k.asm["ptx"], "back-projection GEMM did not use tensor cores"
        print("compiled", dt, "left" if left else "right", "smem", k.metadata.shared)
    print("OK")
""")


def _compile_for_sm90(which):
    triton = require("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and shutil.which("ptxas") is None:
        if in_ci():  # the triton wheel CI installs ships ptxas
            pytest.fail(f"no ptxas in CI (looked for {ptxas} and on PATH)", pytrace=False)
        pytest.skip("no ptxas to compile for sm_90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, which], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-4000:]


def test_kernels_compile_for_sm90():
    """The compiled (non-interpreted) kernels lower to sm_90 cubin with tensor-core MMAs (no GPU needed)."""
    _compile_for_sm90("quick")


@pytest.mark.slow
def test_kernels_compile_for_sm90_all_variants():
    _compile_for_sm90("full")


# ----------------------------------------------------------------------------------------------- GPU only
@gpu
@needs_cuda
def test_gpu_kernels_are_compiled():
    from gems_kernels import _utils

    assert not _utils.INTERPRET, "GPU tests must exercise the compiled kernels (unset TRITON_INTERPRET)"


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_gpu_odd_shapes(side, dtype, poison_empty):
    for shape in SHAPES + [(300, 514)]:
        gen = _gen("gpu", side, dtype, shape)
        problem = _make_problem(shape, side, dtype, ranks=[min(shape), 19, 0], K=3, T=2, gen=gen)
        _check_project_adam(*problem, side=side, step=4, **ADAM)
        weights, bases, coeffs, deltas = _make_back_problem(shape, side, dtype, [min(shape), 19, 0], K=3, gen=gen)
        dq = R.side_dim(shape, "right")
        qs = [_orth(dq, 7, gen), None, _orth(dq, 3, gen)]
        _check_back_update(weights, bases, coeffs, deltas, side, lr=0.5, wd=0.8, decay_bases=qs)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_gpu_large_4096_rank_256_128(side, dtype, poison_empty):
    shape, ranks = (4096, 4096), [256, 128, 128]
    gen = _gen("gpu-large", side, dtype)
    problem = _make_problem(shape, side, dtype, ranks=ranks, K=2, T=2, gen=gen)
    _check_project_adam(*problem, side=side, step=10, **ADAM)
    weights, bases, coeffs, deltas = _make_back_problem(shape, side, dtype, ranks, K=2, gen=gen)
    _check_back_update(weights, bases, coeffs, deltas, side, lr=1e-3, wd=0.01)


# ----------------------------------------------------------------------------------------------- optimizer
@pytest.fixture
def launch_counts(monkeypatch):
    """Calls of each Triton launcher, counted while the test runs (so a test can tell the kernels really ran)."""
    calls = {"project_adam": 0, "back_project_update": 0}
    for name in calls:
        real = getattr(gk, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(gk, name, counted)
    return calls


@pytest.mark.filterwarnings("ignore:GEMS ranks clamped")
@pytest.mark.parametrize("with_nullspace", [False, True], ids=["no-nullspace", "nullspace"])
def test_optimizer_backend_triton_matches_torch(launch_counts, with_nullspace):
    """10 GemsOptimizer steps with backend="triton" vs backend="torch" (fp32, two tasks, a refresh in the
    middle); the Triton launchers must really run every step."""
    import gems

    calls = launch_counts

    def run(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16),
                                    torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(DEV)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        ns = None
        if with_nullspace:  # input side: folded into right bases (40×16), projected δ for left ones (24→40)
            g = torch.Generator().manual_seed(7)
            ns = gems.NullSpace({"0": torch.linalg.qr(torch.randn(24, 5, generator=g))[0].to(DEV),
                                 "2": torch.linalg.qr(torch.randn(40, 6, generator=g))[0].to(DEV)}, side="input")
        opt = gems.GemsOptimizer(inner, model=model, tasks=["a", "b"], rank=6, task_rank=3, update_proj_gap=5,
                                 backend=backend, target_modules=None, nullspace=ns)
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            xa, xb = (torch.randn(8, 24, generator=gen).to(DEV) for _ in range(2))
            losses = {"a": model(xa).pow(2).mean(), "b": (model(xb) - 1).pow(2).mean()}
            opt.backward(losses, num_samples={"a": 8, "b": 8})
            opt.step()
            opt.zero_grad()
        return opt, [p.detach().clone() for p in model.parameters()]

    opt_t, ref = run("torch")
    assert calls == {"project_adam": 0, "back_project_update": 0}
    opt_k, out = run("triton")
    assert opt_k.backend == "triton"
    assert calls["project_adam"] >= 10 and calls["back_project_update"] >= 10
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the fused step keeps the inner optimizer's step counters (batched increment) as torch.optim would
    for wt, wk in zip(opt_t.subspaces, opt_k.subspaces):
        for s in wt.subspaces():
            assert torch.equal(opt_k.inner.state[wk.coords[s]]["step"], opt_t.inner.state[wt.coords[s]]["step"])


@pytest.mark.filterwarnings("ignore:GEMS ranks clamped")
@pytest.mark.parametrize("task_rank", [3, 0], ids=["tasks", "task-rank-0"])
def test_optimizer_steps_reuse_checked_operands(monkeypatch, task_rank):
    """Between refreshes every fused launch of a GemsOptimizer finds its bases, moments and weights already
    checked (gems_kernels._utils.CHECKED), rank-0 placeholder moments included; a refresh (new bases) is
    checked again."""
    import gems
    from gems_kernels import _utils as U

    hits, misses = [], []
    real_get = U.CheckedOperands.get

    def counting(self, key, tensors):
        value = real_get(self, key, tensors)
        (hits if value is not None else misses).append(key[0])
        return value

    monkeypatch.setattr(U.CheckedOperands, "get", counting)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16)).to(DEV)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = gems.GemsOptimizer(inner, model=model, tasks=["a", "b"], rank=6, task_rank=task_rank, update_proj_gap=3,
                             backend="triton", target_modules=None)
    gen = torch.Generator().manual_seed(1)
    per_step = []
    for _ in range(6):
        hits.clear()
        misses.clear()
        xa, xb = (torch.randn(8, 24, generator=gen).to(DEV) for _ in range(2))
        opt.backward({"a": model(xa).pow(2).mean(), "b": (model(xb) - 1).pow(2).mean()})
        opt.step()
        opt.zero_grad()
        per_step.append((len(hits), len(misses)))
    launches = per_step[1][0]  # two shapes, two launchers
    assert launches == 4
    # steps 1, 2 and 4, 5 reuse the checks; 0 (first bases and moments) and 3 (refresh) redo them
    assert per_step == [(0, 4), (4, 0), (4, 0), (0, 4), (4, 0), (4, 0)]


@pytest.mark.filterwarnings("ignore:GEMS ranks clamped", "ignore:GEMS skipped")
def test_fused_step_counters_through_a_skip_and_a_resume():
    """The fused path keeps the inner step counters as views of one buffer (one add per step): through a
    step that skips a weight (non-finite gradient) and a save / load into a new optimizer, the counters and
    the weights stay those of backend="torch"."""
    import io

    import gems

    def run(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16)).to(DEV)

        def make(model):
            inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
            return gems.GemsOptimizer(inner, model=model, tasks=["a", "b"], rank=6, task_rank=3, update_proj_gap=4,
                                      backend=backend, target_modules=None)

        opt = make(model)
        gen = torch.Generator().manual_seed(1)
        for i in range(8):
            if i == 6:  # resume from a checkpoint in a new optimizer
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = make(model)
                opt.load_state_dict(torch.load(buf, weights_only=True))
            xa, xb = (torch.randn(8, 24, generator=gen).to(DEV) for _ in range(2))
            losses = {"a": model(xa).pow(2).mean(), "b": (model(xb) - 1).pow(2).mean()}
            if i == 3:  # the first weight is skipped this step
                losses["a"] = losses["a"] + float("nan") * model[0].weight.sum()
            opt.backward(losses)
            opt.step()
            opt.zero_grad()
        counters = [float(opt.inner.state[w.coords[s]]["step"]) for w in opt.subspaces for s in w.subspaces()]
        return counters, [p.detach().clone() for p in model.parameters()], opt

    ref_counters, ref, _ = run("torch")
    counters, out, opt = run("triton")
    assert counters == ref_counters and counters[0] == 7.0 and counters[-1] == 8.0
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    _, views = opt._step_buffer  # the last steps advanced the counters through the buffer
    steps = [opt.inner.state[w.coords[s]]["step"] for w in opt.subspaces for s in w.subspaces()]
    assert {id(v) for v in views} == {id(t) for t in steps} and len(views) == len(steps)


@pytest.mark.filterwarnings("ignore:GEMS ranks clamped")
@pytest.mark.parametrize("case", ["reset", "counters-disagree", "counters-edited", "moments-replaced"])
def test_fused_bias_correction_follows_the_inner_state(case):
    """The fused kernels take Adam's step count and moments from the inner state, like torch.optim: with
    state_transfer="reset" the state (and its count) restarts at every refresh while the weight's own step
    does not; a weight whose subspaces' counters disagree (a counter replaced, or edited in place: the plan
    holds the counters as views of one buffer) is stepped by the generic path; a moment replaced
    by hand between refreshes is the one stepped (the cached plan is rebuilt). All train like
    backend="torch"."""
    import gems

    def run(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16)).to(DEV)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt = gems.GemsOptimizer(inner, model=model, tasks=["a", "b"], rank=6, task_rank=3, update_proj_gap=3,
                                 backend=backend, target_modules=None,
                                 state_transfer="reset" if case == "reset" else "keep")
        gen = torch.Generator().manual_seed(1)
        for i in range(6):
            if case == "counters-disagree" and i == 2:  # one subspace's count set back by hand
                w = opt.subspaces[0]
                opt.inner.state[w.coords["a"]]["step"] = torch.tensor(0.0)
            if case == "counters-edited" and i == 2:
                opt.inner.state[opt.subspaces[0].coords["a"]]["step"].fill_(0.0)
            if case == "moments-replaced" and i == 2:  # new tensors, not in-place edits
                st = opt.inner.state[opt.subspaces[0].coords["a"]]
                st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"] * -3.0, st["exp_avg_sq"] * 4.0
            xa, xb = (torch.randn(8, 24, generator=gen).to(DEV) for _ in range(2))
            opt.backward({"a": model(xa).pow(2).mean(), "b": (model(xb) - 1).pow(2).mean()})
            opt.step()
            opt.zero_grad()
        steps = [float(opt.inner.state[w.coords[s]]["step"]) for w in opt.subspaces for s in w.subspaces()]
        return steps, [p.detach().clone() for p in model.parameters()]

    ref_steps, ref = run("torch")
    steps, out = run("triton")
    assert steps == ref_steps
    if case != "moments-replaced":
        assert max(steps) < 6 if case == "reset" else min(steps) < max(steps)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _train_two_tasks(backend, sizes, steps=6, **opt_kw):
    """An MLP of ``sizes`` (tanh between layers) trained ``steps`` GEMS steps on two regression tasks, on DEV;
    returns the optimizer and the final parameters."""
    import gems

    torch.manual_seed(0)
    layers = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(d_in, d_out), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1]).to(DEV)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    opt = gems.GemsOptimizer(inner, model=model, tasks=["a", "b"], rank=6, task_rank=3, update_proj_gap=4,
                             backend=backend, **opt_kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        xa, xb = (torch.randn(8, sizes[0], generator=gen).to(DEV) for _ in range(2))
        opt.backward({"a": model(xa).pow(2).mean(), "b": (model(xb) - 1).pow(2).mean()})
        opt.step()
        opt.zero_grad()
    return opt, [p.detach().clone() for p in model.parameters()]


@pytest.mark.filterwarnings("ignore:GEMS ranks clamped")
@pytest.mark.parametrize("stash", ["full", "projected"])
def test_auto_backend_runs_large_weights_on_torch(monkeypatch, stash):
    """backend="auto" resolved to Triton steps the weights above AUTO_TRITON_MAX_WORK with the torch path and
    the others with the kernels, in one optimizer step, and trains like backend="torch"."""
    from gems import dispatch, optimizer

    launched = []
    for name in ("project_adam", "back_project_update"):
        real = getattr(gk, name)

        def recording(*a, _real=real, _name=name, **k):
            first = a[0][0]  # project_adam: the first weight's task gradients; back_project_update: the weight
            launched.append((_name, tuple((first[0] if isinstance(first, list) else first).shape)))
            return _real(*a, **k)

        monkeypatch.setattr(gk, name, recording)

    def run(backend):
        return _train_two_tasks(backend, (24, 40, 16, 4), target_modules=None, stash=stash)

    _, ref = run("torch")
    # auto as on a GPU without a prebuilt CUDA extension; the 40×24 weight (work 40·24·12) is over the limit
    monkeypatch.setattr(optimizer, "resolve_backend", lambda requested, device_type: "triton")
    monkeypatch.setitem(dispatch.AUTO_TRITON_MAX_WORK, torch.float32, 40 * 24 * 12 - 1)
    opt, out = run("auto")
    assert opt.backend == "triton"
    shapes = {shape for _, shape in launched}
    assert (40, 24) not in shapes and {(16, 40), (4, 16)} <= shapes
    assert {name for name, _ in launched} == ({"back_project_update"} if stash == "projected"
                                              else {"project_adam", "back_project_update"})
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:GEMS ranks clamped")
def test_projected_stash_with_triton_backend_uses_the_back_projection_kernel(launch_counts):
    """stash="projected" has no full gradients for the fused projection kernel: the inner optimizer steps the
    coordinates and the Triton back-projection writes the weights, matching the torch backend."""
    calls = launch_counts

    def run(backend):
        return _train_two_tasks(backend, (24, 40, 4), stash="projected", refresh_schedule="staggered")[1]

    ref = run("torch")
    out = run("triton")
    assert calls["project_adam"] == 0 and calls["back_project_update"] >= 6
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
