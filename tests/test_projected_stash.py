"""stash="projected" (task gradients kept as coordinates, projected as autograd produces them),
refresh_schedule="staggered" and target_embeddings=True."""
import copy
import warnings

import pytest
import torch
from torch import nn

import gems
from gems import reference
from helpers import make_model, make_opt, saved_weight, task_batches, task_losses, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny SVDs: see conftest.one_thread


def _run_pair(steps=12, seed=50, **kw):
    out = []
    for stash in ("full", "projected"):
        model = make_model(seed)
        opt = make_opt(model, stash=stash, **kw)
        train(model, opt, task_batches(steps, seed=seed + 1), num_samples={"a": 3, "b": 5})
        out.append((model, opt))
    return out


@pytest.mark.parametrize("kw", [
    {},
    {"proj_type": "reverse_std", "task_basis": "independent"},
    {"inner_cls": torch.optim.SGD, "inner_kw": {"lr": 1e-2, "momentum": 0.9}, "gating": "uniform"},
    {"refresh": "subspace_iter", "state_transfer": "rotate"},
])
def test_projected_stash_trains_exactly_like_the_full_stash(kw):
    """One micro-batch per step: same bases, same coordinates, same gates, same weights (refreshes at 0, 5, 10)."""
    (m_full, o_full), (m_proj, o_proj) = _run_pair(**kw)
    for p, q in zip(m_full.parameters(), m_proj.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert len(o_full.subspaces) == len(o_proj.subspaces) == 3
    for a, b in zip(o_full.subspaces, o_proj.subspaces):
        assert a.step == b.step == 12 and a.next_refresh == b.next_refresh
        for s in a.subspaces():
            torch.testing.assert_close(b.bases[s], a.bases[s], rtol=1e-4, atol=1e-5)
    assert o_full.last_gates == pytest.approx(o_proj.last_gates, rel=1e-5)


def test_no_full_gradient_of_a_targeted_weight_is_held():
    model = make_model(51)
    opt = make_opt(model, stash="projected")
    targeted = {id(w.param) for w in opt.subspaces}
    for i, batch in enumerate(task_batches(7, seed=52)):
        opt.backward(task_losses(model, batch))
        stash = opt._task_grads
        for t in ("a", "b"):
            assert not targeted & set(stash.grads[t]), f"step {i}: a full targeted gradient is stashed"
            assert set(stash.coords[t]) == targeted
        if i in (0, 5):  # refresh steps: the bases were refreshed in backward, from both tasks' gradients
            assert stash.refreshed == targeted
        else:
            assert not stash.refreshed
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad()


def test_user_grad_is_left_alone_and_coordinates_match_full_projection_over_micro_batches():
    model = make_model(53)
    opt = make_opt(model, stash="projected")
    train(model, opt, task_batches(1, seed=54))  # step 0: bases
    user = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = user[n].clone()
    micro = task_batches(2, seed=55)
    for b in micro:
        opt.backward(task_losses(model, b))
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, user[n])
    assert len(opt.subspaces) == 3
    for w in opt.subspaces:
        for t in ("a", "b"):
            full = sum(torch.autograd.grad(task_losses(model, b)[t], [w.param])[0] for b in micro)
            both = torch.cat([w.work_bases["shared"], w.work_bases[t]], dim=1)
            torch.testing.assert_close(opt._task_grads.coords[t][id(w.param)], reference.project(full, both, w.side),
                                       rtol=1e-5, atol=1e-6)


def test_projected_non_finite_gradient_skips_the_weight_untouched():
    model = make_model(56)
    opt = make_opt(model, stash="projected")
    train(model, opt, task_batches(2, seed=57))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict())
    losses = task_losses(model, task_batches(1, seed=58)[0])
    losses["a"] = losses["a"] + float("nan") * model.mid.weight.sum()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.backward(losses)
        opt.step()
    assert opt.last_skipped == ["mid.weight"]
    assert torch.equal(model.mid.weight, params["mid.weight"])
    mid = next(w for w in opt.subspaces if w.name == "mid.weight")
    assert mid.step == int(saved_weight(opt, state, "mid.weight")["gems"]["step"])
    assert not torch.equal(model.inp.weight, params["inp.weight"])


def test_projected_non_finite_gradient_on_a_refresh_step_keeps_the_old_bases():
    model = make_model(59)
    opt = make_opt(model, stash="projected", update_proj_gap=2)
    train(model, opt, task_batches(2, seed=60))
    mid = next(w for w in opt.subspaces if w.name == "mid.weight")
    before = {s: b.clone() for s, b in mid.bases.items()}
    assert set(before) == {"shared", "a", "b"}
    losses = task_losses(model, task_batches(1, seed=61)[0])
    losses["b"] = losses["b"] + float("inf") * model.mid.weight.sum()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.backward(losses)
        opt.step()
    assert all(torch.equal(before[s], mid.bases[s]) for s in before)
    assert mid.step == 2 and "mid.weight" in opt.last_skipped


def test_clip_grad_norm_in_projected_mode():
    """Exact for one task; for two, the cross terms are taken in the shared subspace (an estimate)."""
    for tasks in (["a"], ["a", "b"]):
        norms = []
        for stash in ("full", "projected"):
            model = make_model(62)
            opt = make_opt(model, stash=stash, tasks=tasks, rank=6, task_rank=3 if len(tasks) > 1 else 0)
            batches = task_batches(2, seed=63)
            train(model, opt, [{t: b[t] for t in tasks} for b in batches[:1]])
            opt.backward({t: l for t, l in task_losses(model, batches[1]).items() if t in tasks})
            norms.append(float(opt.clip_grad_norm_(1e-3)))
            if stash == "projected":
                assert opt.shared_grad_norm() == pytest.approx(1e-3, rel=1e-3)  # clipped in place
        if len(tasks) == 1:
            assert norms[1] == pytest.approx(norms[0], rel=1e-5)
        else:
            assert norms[1] == pytest.approx(norms[0], rel=0.05)  # 2.5% off here


def test_staggered_schedule_spreads_refreshes_over_the_gap():
    model = make_model(64)
    opt = make_opt(model, refresh_schedule="staggered", update_proj_gap=6, stash="projected")
    train(model, opt, task_batches(1, seed=65))
    assert [w.next_refresh for w in opt.subspaces] == [2, 4, 6]
    refreshed_at = {w.name: [] for w in opt.subspaces}
    for i, batch in enumerate(task_batches(12, seed=66), start=1):
        opt.backward(task_losses(model, batch))
        for w in opt.subspaces:
            if id(w.param) in opt._task_grads.refreshed:
                refreshed_at[w.name].append(i)
        opt.step()
        opt.zero_grad()
    assert list(refreshed_at.values()) == [[2, 8], [4, 10], [6, 12]]


class TiedLM(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.embed(ids))))


def test_target_embeddings_projects_the_tied_embedding():
    """The tied embedding is a targeted weight: every step moves it (beyond its decay) inside the span of its
    shared and task bases only (rank 8 of 16), its moments are coordinates, and two learnable next-token
    tasks improve on held-out sequences."""
    torch.manual_seed(67)
    model = TiedLM()
    lr, wd = 3e-2, 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd), model=model,
                                 tasks=["a", "b"], rank=4, task_rank=2, update_proj_gap=10, target_embeddings=True,
                                 stash="projected")
    names = [w.name for w in opt.subspaces]
    assert names == ["proj.weight", "embed.weight"]
    emb = opt.subspaces[1]
    gen = torch.Generator().manual_seed(68)

    def batch():  # task a counts up by 1, task b by 3 (mod 50), from random starts
        start = torch.randint(0, 50, (8, 1), generator=gen)
        return {"a": (start + torch.arange(7)) % 50, "b": (start + 3 * torch.arange(7)) % 50}

    def losses(ids):
        return {t: nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 50), x[:, 1:].reshape(-1))
                for t, x in ids.items()}

    held_out = batch()
    with torch.no_grad():
        first = {t: float(v) for t, v in losses(held_out).items()}
    for _ in range(15):
        before = model.embed.weight.detach().clone()
        opt.backward(losses(batch()))
        opt.step()
        opt.zero_grad()
        update = model.embed.weight.detach() - before * (1 - lr * wd)
        span = torch.linalg.qr(torch.cat([emb.bases[s] for s in ("shared", "a", "b")], dim=1)).Q  # 16×8
        assert emb.side == "right" and span.shape == (16, 8)
        assert float((update - update @ span @ span.T).norm()) <= 1e-4 * float(update.norm())
        assert float(update.norm()) > 0 and int(torch.linalg.matrix_rank(update)) <= 8
    with torch.no_grad():
        last = {t: float(v) for t, v in losses(held_out).items()}
    assert all(last[t] < 0.8 * first[t] for t in first), (first, last)
    assert len(emb.coords) == 3
    assert all(tuple(opt.state[c]["exp_avg"].shape) == emb.coord_shape(s) for s, c in emb.coords.items())
    assert model.embed.weight not in opt.inner.state  # not stepped as a plain parameter
    assert set(opt.state[model.embed.weight]["coords"]) == set(emb.coords)  # torch's view: by the model's weight
    assert model.embed.weight is model.head.weight


def test_new_options_are_validated_and_saved():
    model = make_model(69)
    with pytest.raises(ValueError, match="stash"):
        make_opt(model, stash="lazy")
    with pytest.raises(ValueError, match="refresh_schedule"):
        make_opt(model, refresh_schedule="random")
    with pytest.raises(ValueError, match="needs model"):
        gems.GemsOptimizer(torch.optim.AdamW(model.parameters()), target_embeddings=True)
    sparse = TiedLM()
    sparse.embed.sparse = True
    with pytest.raises(ValueError, match="sparse"):
        gems.GemsOptimizer(torch.optim.SGD(sparse.parameters(), lr=0.1), model=sparse, target_embeddings=True)
    opt = make_opt(model, stash="projected", refresh_schedule="staggered")
    cfg = opt.state_dict()["config"]
    assert cfg["stash"] == "projected" and cfg["refresh_schedule"] == "staggered"


def test_projected_resume_is_bit_exact():
    batches = task_batches(9, seed=71)
    model = make_model(70)
    opt = make_opt(model, stash="projected", refresh_schedule="staggered", update_proj_gap=3)
    train(model, opt, batches[:4])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, batches[4:])
    model2 = make_model(0)
    model2.load_state_dict(saved_model)
    opt2 = make_opt(model2, stash="projected", refresh_schedule="staggered", update_proj_gap=3)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, batches[4:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_retain_flags_keep_a_graph_only_while_a_later_task_needs_it():
    from gems.tasks import retain_flags

    model = make_model(72)
    batch = task_batches(1, seed=73)[0]
    separate = task_losses(model, batch)  # one forward per task
    assert retain_flags([separate["a"], separate["b"]], False) == [False, False]
    assert retain_flags([separate["a"], separate["b"]], True) == [True, True]
    x = torch.cat([batch["a"][0], batch["b"][0]])
    out = model(x)
    shared = [nn.functional.mse_loss(out[:16], batch["a"][1]), nn.functional.mse_loss(out[16:], batch["b"][1])]
    assert retain_flags(shared, False) == [True, False]


@pytest.mark.parametrize("stash", ["full", "projected"])
def test_losses_cut_from_one_shared_forward_still_work(stash):
    model = make_model(74)
    opt = make_opt(model, stash=stash)
    for batch in task_batches(3, seed=75):
        out = model(torch.cat([batch["a"][0], batch["b"][0]]))
        opt.backward({"a": nn.functional.mse_loss(out[:16], batch["a"][1]),
                      "b": nn.functional.mse_loss(out[16:], batch["b"][1])})
        opt.step()
        opt.zero_grad()
    assert len(opt.subspaces) == 3 and all(w.step == 3 for w in opt.subspaces)


def test_projected_task_that_never_reaches_a_weight():
    """Task b's loss does not touch inp/mid: on the refresh step those weights keep task a's full gradient
    until the step refreshes them there; afterwards they are stepped from task a's coordinates alone."""
    model = make_model(76)
    opt = make_opt(model, stash="projected", update_proj_gap=3)
    for batch in task_batches(5, seed=77):
        losses = task_losses(model, batch)
        losses["b"] = (model.out(torch.randn(3, 43)) ** 2).mean()
        opt.backward(losses)
        opt.step()
        opt.zero_grad()
        assert opt.last_skipped == []
    assert len(opt.subspaces) == 3 and all(w.step == 5 for w in opt.subspaces)


@pytest.mark.parametrize("stash", ["full", "projected"])
def test_fp64_model_trains(stash):
    model = make_model(78).double()
    opt = make_opt(model, stash=stash)
    batches = [{t: (x.double(), y.double()) for t, (x, y) in b.items()} for b in task_batches(21, seed=79)]
    held_out = batches.pop()
    before = {t: float(l.detach()) for t, l in task_losses(model, held_out).items()}
    train(model, opt, batches)
    after = {t: float(l.detach()) for t, l in task_losses(model, held_out).items()}
    assert all(after[t] < 0.9 * before[t] for t in before), (before, after)
    assert opt.last_skipped == [] and all(p.dtype == torch.float64 for p in model.parameters())
    assert all(b.dtype == torch.float32 for w in opt.subspaces for b in w.bases.values())  # fp32 state


def test_a_weight_found_non_finite_earlier_in_the_step_is_not_refreshed_later():
    """Refresh step, two micro-batches: the first has an Inf for mid.weight, the second is finite. The weight
    is skipped for the step; its bases, schedule and inner state stay as they were."""
    model = make_model(80)
    opt = make_opt(model, stash="projected", update_proj_gap=2, state_transfer="reset")
    train(model, opt, task_batches(2, seed=81))
    mid = next(w for w in opt.subspaces if w.name == "mid.weight")
    bases = {s: b.clone() for s, b in mid.bases.items()}
    next_refresh = mid.next_refresh
    state = {s: copy.deepcopy(opt.state[c]) for s, c in mid.coords.items()}
    assert set(bases) == set(state) == {"shared", "a", "b"} and all(state.values())
    micro = task_batches(2, seed=82)
    bad = task_losses(model, micro[0])
    bad["a"] = bad["a"] + float("inf") * model.mid.weight.sum()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.backward(bad)
        opt.backward(task_losses(model, micro[1]))
        opt.step()
    assert "mid.weight" in opt.last_skipped
    assert all(torch.equal(bases[s], mid.bases[s]) for s in bases) and mid.next_refresh == next_refresh
    assert all(torch.equal(state[s]["exp_avg"], opt.state[c]["exp_avg"]) for s, c in mid.coords.items())


def test_refresh_waits_for_the_step_when_a_task_is_missing_from_the_micro_batch():
    """Micro-batches that each carry one task: the bases must come from both tasks' gradients (at the step),
    not from the first micro-batch, where task a's gradient is zero."""
    bases = {}
    for stash in ("full", "projected"):
        model = make_model(83)
        opt = make_opt(model, stash=stash)
        (batch,) = task_batches(1, seed=84)
        for only in ("b", "a"):
            losses = task_losses(model, batch)
            losses = {t: (l if t == only else 0.0 * l) for t, l in losses.items()}
            opt.backward(losses, num_samples={t: (16 if t == only else 0) for t in losses})
        assert not opt._task_grads.refreshed
        opt.step()
        bases[stash] = [{s: b.clone() for s, b in w.bases.items()} for w in opt.subspaces]
    assert len(bases["full"]) == len(bases["projected"]) == 3
    for full, proj in zip(bases["full"], bases["projected"]):
        assert set(full) == set(proj) == {"shared", "a", "b"}
        for s in full:
            torch.testing.assert_close(proj[s], full[s], rtol=1e-4, atol=1e-5)


def test_shared_grad_norm_over_micro_batches_estimates_the_norm_of_the_sum():
    norms = {}
    for stash in ("full", "projected"):
        model = make_model(85)
        opt = make_opt(model, stash=stash, tasks=["a"], task_rank=0)
        train(model, opt, [{"a": b["a"]} for b in task_batches(1, seed=86)])
        (batch,) = task_batches(1, seed=87)
        for _ in range(2):  # the same micro-batch twice: the norm doubles
            opt.backward({"a": task_losses(model, {"a": batch["a"]})["a"]})
        norms[stash] = opt.shared_grad_norm()
    assert norms["projected"] == pytest.approx(norms["full"], rel=0.15)
    assert norms["projected"] > 0.8 * norms["full"]  # Σ‖g_i‖² alone would give 1/√2 of it


def test_projected_diagnostics_report_the_cosine_inside_the_shared_subspace():
    model = make_model(92)
    opt = make_opt(model, stash="projected")
    batches = task_batches(2, seed=93)
    train(model, opt, batches[:1])
    losses = task_losses(model, batches[1])
    full = {t: torch.autograd.grad(losses[t], [model.mid.weight], retain_graph=True)[0] for t in ("a", "b")}
    opt.backward(losses)
    d = opt.diagnostics()
    mid = next(w for w in opt.subspaces if w.name == "mid.weight")
    ca, cb = (reference.project(full[t], mid.work_bases["shared"], mid.side) for t in ("a", "b"))
    expected = float((ca * cb).sum() / (ca.norm() * cb.norm()))
    assert d["mid/cos_shared/a-b"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert "mid/cos/a-b" not in d and "gate/a" in d
