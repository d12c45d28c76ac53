"""state_transfer (keep / rotate / reset) and adaptive refresh in the optimizer."""
import pytest
import torch

from helpers import SameShapesNet, make_model, make_opt, task_batches, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny SVDs: see conftest.one_thread


def _states(opt):
    return {(w.name, s): {k: v.clone() for k, v in opt.inner.state[c].items()}
            for w in opt.subspaces for s, c in w.coords.items()}


@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_rotate_maps_moments_through_the_basis_change(proj_type):
    model = make_model(50)
    opt = make_opt(model, update_proj_gap=100, proj_type=proj_type, state_transfer="rotate")
    train(model, opt, task_batches(2, seed=50))
    w = opt.subspaces[1]
    old = dict(w.bases)
    before = {s: {k: v.clone() for k, v in opt.inner.state[c].items()} for s, c in w.coords.items()}
    g = torch.Generator().manual_seed(0)
    for s in w.subspaces():
        w.bases[s] = torch.linalg.qr(torch.randn(old[s].shape, generator=g))[0]
    w.transfer_state(old, opt.inner.state, "rotate")
    assert set(w.coords) == {"shared", "a", "b"}
    for s, c in w.coords.items():
        rot = w.bases[s].T @ old[s]
        st = opt.inner.state[c]
        m, v = before[s]["exp_avg"], before[s]["exp_avg_sq"]
        want_m = rot @ m if w.side == "left" else m @ rot.T
        want_v = (rot * rot) @ v if w.side == "left" else v @ (rot * rot).T
        torch.testing.assert_close(st["exp_avg"], want_m)
        torch.testing.assert_close(st["exp_avg_sq"], want_v)
        assert st["exp_avg_sq"].min() >= 0 and torch.equal(st["step"], before[s]["step"])


def test_reset_restarts_the_inner_state():
    model = make_model(51)
    opt = make_opt(model, update_proj_gap=3, state_transfer="reset")
    train(model, opt, task_batches(3, seed=52))
    steps_before = {k: float(v["step"]) for k, v in _states(opt).items()}
    assert set(steps_before.values()) == {3.0}
    train(model, opt, task_batches(1, seed=53))  # step 3: refresh, state dropped, then one inner step
    assert {float(v["step"]) for v in _states(opt).values()} == {1.0}


def _held_out(model, batch):
    with torch.no_grad():
        return {t: float(torch.nn.functional.mse_loss(model(x), y)) for t, (x, y) in batch.items()}


def test_every_policy_trains():
    """Each policy lowers both tasks' loss on a held-out batch over 30 fresh batches (refreshes every 5 steps),
    and the policies really differ: no two of them end at the same weights."""
    final = {}
    for mode in ("keep", "rotate", "reset"):
        model = make_model(52)
        opt = make_opt(model, update_proj_gap=5, state_transfer=mode)
        batches = task_batches(31, seed=54)
        start = _held_out(model, batches[-1])
        train(model, opt, batches[:-1])
        end = _held_out(model, batches[-1])
        for t in ("a", "b"):
            assert end[t] < 0.9 * start[t], (mode, t, start[t], end[t])
        assert all(w.step == 30 for w in opt.subspaces) and len(opt.subspaces) == 3
        final[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    for a, b in (("keep", "rotate"), ("keep", "reset"), ("rotate", "reset")):
        assert float((final[a] - final[b]).abs().max()) > 1e-4, (a, b)


def test_adaptive_refresh_stretches_the_gap_when_the_basis_is_stable():
    model = make_model(53)
    opt = make_opt(model, update_proj_gap=2, adaptive_refresh=0.5)
    train(model, opt, task_batches(1, seed=55) * 12)  # one fixed batch: the gradient subspace barely moves
    assert max(w.gap_factor for w in opt.subspaces) > 1
    assert all(w.next_refresh >= w.step for w in opt.subspaces)
    sd = opt.state_dict()
    opt2 = make_opt(make_model(53), update_proj_gap=2, adaptive_refresh=0.5)
    opt2.load_state_dict(sd)
    assert [(w.next_refresh, w.gap_factor) for w in opt2.subspaces] == [(w.next_refresh, w.gap_factor) for w in opt.subspaces]


@pytest.mark.parametrize("kw", [dict(state_transfer="swap"), dict(adaptive_refresh=1.5), dict(adaptive_refresh=1)])
def test_bad_policy_arguments(kw):
    with pytest.raises(ValueError):
        make_opt(make_model(0), **kw)


@pytest.mark.parametrize("method", ["subspace_iter", "randomized"])
def test_fast_refresh_engines_train(method):
    """A fast engine's first bases span nearly what the exact SVD's span (same weights, same gradient), its
    task bases stay orthogonal to the shared one, and 20 fresh batches lower both held-out losses about as
    much as with the SVD."""
    batches = task_batches(21, seed=56)
    held_out = {}
    bases = {}
    for engine in ("svd", method):
        model = make_model(54)
        opt = make_opt(model, update_proj_gap=4, refresh=engine)
        start = _held_out(model, batches[-1])
        train(model, opt, batches[:1])
        bases[engine] = [w.bases["shared"].clone() for w in opt.subspaces]
        train(model, opt, batches[1:-1])
        held_out[engine] = (start, _held_out(model, batches[-1]))
        assert len(opt.subspaces) == 3
        for w in opt.subspaces:
            assert float((w.bases["shared"].T @ w.bases["a"]).norm()) <= 1e-5
            assert float((w.bases["shared"].T @ w.bases["b"]).norm()) <= 1e-5
    for exact, fast in zip(bases["svd"], bases[method]):
        # ‖P_exact − P_fast‖: 0 for the same span, up to √2 for orthogonal spans
        assert float((exact @ exact.T - fast @ fast.T).norm(2)) < 0.05
    (start, svd_end), (_, fast_end) = held_out["svd"], held_out[method]
    for t in ("a", "b"):
        assert fast_end[t] < 0.9 * start[t], (t, start[t], fast_end[t])
        assert fast_end[t] <= 1.1 * svd_end[t], (t, svd_end[t], fast_end[t])


@pytest.mark.parametrize("warm_start", [False, True])
def test_warm_start_hands_the_old_bases_to_the_engine(monkeypatch, warm_start):
    from gems import subspaces

    seen = []
    real = subspaces.compute_bases

    def recording(*args, previous=None, **kw):
        seen.extend(previous)
        return real(*args, previous=previous, **kw)

    monkeypatch.setattr(subspaces, "compute_bases", recording)
    model = make_model(90)
    opt = make_opt(model, refresh="subspace_iter", update_proj_gap=2, warm_start=warm_start)
    per_step = []
    for batch in task_batches(3, seed=91):
        old = [b.clone() for w in opt.subspaces for b in w.bases.values() if b is not None]
        seen.clear()
        train(model, opt, [batch])
        per_step.append((list(seen), old))
    n = 3 * 3  # three weights × (shared, a, b)
    assert [len(prev) for prev, _ in per_step] == [n, 0, n]  # refreshes at steps 0 and 2 (gap 2)
    assert all(p is None for p in per_step[0][0])  # no bases yet
    prev, old = per_step[2]
    if warm_start:  # the engine starts from the very bases it replaces
        assert len(old) == n and all(p is not None and torch.equal(p, o) for p, o in zip(prev, old))
    else:
        assert all(p is None for p in prev)
    assert opt.state_dict()["config"]["warm_start"] is warm_start


@pytest.mark.parametrize("stash", ["full", "projected"])
@pytest.mark.parametrize("method,task_basis", [("subspace_iter", "residual"), ("randomized", "independent"),
                                               ("svd", "residual")])
def test_batched_refresh_across_weights_matches_one_by_one(monkeypatch, method, task_basis, stash):
    """Weights refreshed together (as on CUDA, REFRESH_BATCH_BYTES; with the projected stash inside backward,
    the rest after the last task's backward) train exactly like weights refreshed one by one: each keeps its
    own generator, and same-shape weights share one batched call per subspace."""
    from gems import subspaces

    calls = []
    real = subspaces.compute_bases

    def recording(matrices, *args, **kw):
        calls.append(len(matrices))
        return real(matrices, *args, **kw)

    monkeypatch.setattr(subspaces, "compute_bases", recording)
    params, widest = {}, {}
    # two 16×16 weights' gradients: the shared one (step), or the shared one and both tasks' (backward)
    two = 2 * 16 * 16 * 4 * (3 if stash == "projected" else 1)
    for cap in (0, two, 1 << 30):  # one by one, two weights per batch, everything at once
        monkeypatch.setitem(subspaces.REFRESH_BATCH_BYTES, "cpu", cap)
        calls.clear()
        torch.manual_seed(70)
        model = SameShapesNet()
        opt = make_opt(model, refresh=method, task_basis=task_basis, update_proj_gap=2, rank=4, task_rank=2,
                       stash=stash)
        train(model, opt, task_batches(5, seed=71))
        params[cap] = [p.detach().clone() for p in model.parameters()]
        widest[cap] = max(calls)
        assert len(opt.subspaces) == 6
        for w in opt.subspaces:
            for sub in ("shared", "a", "b"):
                assert float((w.bases[sub].T @ w.bases[sub] - torch.eye(w.bases[sub].shape[1])).abs().max()) <= 1e-5
            overlap = float((w.bases["shared"].T @ w.bases["a"]).abs().max())
            if task_basis == "residual":
                assert overlap <= 1e-5, (w.name, overlap)
            else:  # independent task bases: not made orthogonal to the shared one
                assert overlap > 0.1, (w.name, overlap)
    # matrices per compute_bases call: 1 one by one, more with each larger cap (svd too: compute_bases then
    # takes GaLore's per-matrix SVD inside the call, hence the bit-exact comparison below)
    assert list(widest.values()) == sorted(set(widest.values()))
    assert widest[0] == 1 and widest[1 << 30] >= 4
    assert len(params) == 3
    for cap in params:
        if cap == 0:
            continue
        for a, b in zip(params[0], params[cap]):
            if method == "svd":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cap", [0, 1 << 30])
def test_failed_refresh_leaves_every_weight_untouched(monkeypatch, cap):
    """A refresh that raises part-way (here: the fourth compute_bases call) changes no basis, no weight and no
    inner state, whether the weights were refreshed one by one or together; the step can then be retried."""
    from gems import subspaces

    monkeypatch.setitem(subspaces.REFRESH_BATCH_BYTES, "cpu", cap)
    torch.manual_seed(72)
    model = SameShapesNet()
    opt = make_opt(model, refresh="subspace_iter", update_proj_gap=2)
    train(model, opt, task_batches(2, seed=73))  # bases exist; the next step refreshes
    bases = {(w.name, s): b.clone() for w in opt.subspaces for s, b in w.bases.items() if b is not None}
    params = [p.detach().clone() for p in model.parameters()]
    states = {id(c): {k: v.clone() for k, v in opt.inner.state[c].items()}
              for w in opt.subspaces for c in w.coords.values()}
    assert len(bases) == len(states) == 6 * 3 and all(states.values())  # six weights × (shared, a, b)
    real, calls = subspaces.compute_bases, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise torch.linalg.LinAlgError("injected")
        return real(*args, **kw)

    monkeypatch.setattr(subspaces, "compute_bases", failing)
    batch = task_batches(1, seed=74)[0]
    losses = {t: torch.nn.functional.mse_loss(model(x), y) for t, (x, y) in batch.items()}
    opt.backward(losses)
    with pytest.raises(torch.linalg.LinAlgError, match="injected"):
        opt.step()
    assert len(calls) == 4
    now = {(w.name, s): b for w in opt.subspaces for s, b in w.bases.items() if b is not None}
    assert set(now) == set(bases)
    for key, b in now.items():
        assert torch.equal(b, bases[key]), key
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for w in opt.subspaces:
        for c in w.coords.values():
            assert all(torch.equal(v, states[id(c)][k]) for k, v in opt.inner.state[c].items())
    monkeypatch.setattr(subspaces, "compute_bases", real)
    opt.step()  # the retry refreshes and steps
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), params))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("task_basis,stash", [("residual", "full"), ("independent", "full"),
                                             ("residual", "projected")])
def test_cuda_batched_refresh_trains_like_one_by_one(monkeypatch, task_basis, stash):
    """On CUDA the optimizer refreshes every weight due at a step together (REFRESH_BATCH_BYTES; in backward
    with the projected stash): the same training as refreshing them one by one, through the batched
    CholeskyQR and gesvda paths."""
    from gems import subspaces

    params = {}
    for cap in (0, 64 << 20):
        monkeypatch.setitem(subspaces.REFRESH_BATCH_BYTES, "cuda", cap)
        torch.manual_seed(75)
        model = SameShapesNet().cuda()
        opt = make_opt(model, refresh="subspace_iter", task_basis=task_basis, update_proj_gap=2, backend="torch",
                       stash=stash)
        for batch in task_batches(5, seed=76):
            losses = {t: torch.nn.functional.mse_loss(model(x.cuda()), y.cuda()) for t, (x, y) in batch.items()}
            opt.backward(losses)
            opt.step()
            opt.zero_grad()
        params[cap] = [p.detach().cpu() for p in model.parameters()]
        for w in opt.subspaces:
            for b in w.bases.values():
                if b is not None and b.shape[1]:
                    eye = torch.eye(b.shape[1], device=b.device)
                    assert float((b.T @ b - eye).abs().max()) <= 1e-5
    for a, b in zip(params[0], params[64 << 20]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
