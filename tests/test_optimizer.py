"""GemsOptimizer behaviour: decomposition, properties, any inner optimizer, errors, non-finite gradients."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import gems
from gems import reference
from helpers import make_model, make_opt, task_batches, task_losses, train


def test_derived_shared_gradient_equals_mixed_batch_gradient():
    """Σ_t (N_t/N)·G_t equals the gradient of the mean loss over the mixed batch (the authors' third pass)."""
    model = make_model(1)
    opt = make_opt(model, tasks=["a", "b"])
    xa, xb = torch.randn(5, 12), torch.randn(11, 12)
    ya, yb = torch.randn(5, 6), torch.randn(11, 6)
    losses = {"a": nn.functional.mse_loss(model(xa), ya, reduction="none").mean(1).mean(),
              "b": nn.functional.mse_loss(model(xb), yb, reduction="none").mean(1).mean()}
    opt.backward(losses, num_samples={"a": 5, "b": 11})
    stash = opt._task_grads
    weights = stash.shared_weights()
    mixed = nn.functional.mse_loss(model(torch.cat([xa, xb])), torch.cat([ya, yb]), reduction="none").mean(1).mean()
    expected = torch.autograd.grad(mixed, list(model.parameters()))
    for p, e in zip(model.parameters(), expected):
        derived = reference.shared_gradient([stash.grads[t][id(p)] for t in ("a", "b")], weights)
        torch.testing.assert_close(derived, e, rtol=1e-5, atol=1e-7)


def test_batched_shared_gradients_equal_the_reference():
    """_shared_gradients (one foreach op per task) gives reference.shared_gradient bit for bit, per dtype."""
    from gems.optimizer import _shared_gradients

    g = torch.Generator().manual_seed(0)
    weights = [0.3, 0.7]
    grads = [[torch.randn(5, 7, generator=g).to(dt) for _ in weights]
             for dt in (torch.float32, torch.bfloat16, torch.float64, torch.float32)]
    for got, per_task in zip(_shared_gradients(grads, weights), grads):
        want = reference.shared_gradient(per_task, weights)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_non_targeted_params_get_the_shared_gradient():
    model = make_model(2)
    opt = make_opt(model)
    batch = task_batches(1, seed=3)[0]
    opt.backward(task_losses(model, batch), num_samples={"a": 1, "b": 3})
    opt._gather_gradients()
    ga = torch.autograd.grad(task_losses(model, batch)["a"], [model.norm.weight])[0]
    gb = torch.autograd.grad(task_losses(model, batch)["b"], [model.norm.weight])[0]
    torch.testing.assert_close(model.norm.weight.grad, 0.25 * ga + 0.75 * gb)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_bases_orthonormal_and_residual_task_bases_orthogonal_to_shared(proj_type):
    model = make_model(3)
    opt = make_opt(model, proj_type=proj_type, rank=5, task_rank=3, task_basis="residual")
    train(model, opt, task_batches(3, seed=4))
    for w in opt.subspaces:
        b_sh = w.bases["shared"]
        eye = torch.eye(b_sh.shape[1])
        assert (b_sh.T @ b_sh - eye).abs().max() <= 1e-5
        for t in ("a", "b"):
            b = w.bases[t]
            assert b.dtype == torch.float32
            assert (b.T @ b - torch.eye(b.shape[1])).abs().max() <= 1e-5
            assert float((b_sh.T @ b).norm()) <= 1e-5
        assert b_sh.shape[0] == reference.side_dim(w.param.shape, w.side)


def test_independent_task_bases_are_not_forced_orthogonal():
    model = make_model(3)
    opt = make_opt(model, rank=5, task_rank=3, task_basis="independent")
    train(model, opt, task_batches(1, seed=4))
    overlaps = [float((w.bases["shared"].T @ w.bases["a"]).norm()) for w in opt.subspaces]
    assert max(overlaps) > 1e-2


def test_full_rank_single_task_equals_the_inner_optimizer():
    """A rank covering the whole matrix, one task: GEMS is the inner optimizer (a rotation-equivariant
    one: SGD with momentum; Adam's per-coordinate scaling is not rotation invariant)."""
    base = make_model(5)
    ref = copy.deepcopy(base)
    batches = task_batches(12, seed=6)
    opt = make_opt(base, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, tasks=None, rank=10_000, task_rank=0,
                   update_proj_gap=100)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for batch in batches:
        x, y = batch["a"]
        for m, o in ((base, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for p, q in zip(base.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


INNERS = [
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.01}),
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (torch.optim.RMSprop, {"lr": 1e-3}),
    (torch.optim.Adagrad, {"lr": 0.05}),
]
if hasattr(torch.optim, "Adafactor"):
    INNERS.append((torch.optim.Adafactor, {"lr": 1e-2}))


@pytest.mark.parametrize("inner_cls,inner_kw", INNERS, ids=lambda v: getattr(v, "__name__", ""))
def test_any_inner_optimizer_trains_both_tasks(inner_cls, inner_kw):
    model = make_model(7)
    opt = make_opt(model, inner_cls, inner_kw, rank=4, task_rank=2, update_proj_gap=10)
    batches = task_batches(1, seed=8) * 40  # the same batch: the loss must go down
    losses = train(model, opt, batches)
    for t in ("a", "b"):
        assert losses[-1][t] < losses[0][t], (inner_cls.__name__, t, losses[0][t], losses[-1][t])
    targeted = [m.weight for m in (model.inp, model.mid, model.out)]
    assert not any(k is p for k in opt.inner.state for p in targeted)


def test_inner_holds_coordinates_not_weights_and_state_is_low_rank():
    model = make_model(9)
    opt = make_opt(model, rank=4, task_rank=2)
    train(model, opt, task_batches(2, seed=9))
    for w in opt.subspaces:
        assert all(w.param is not p for g in opt.param_groups for p in g["params"])
        for s, c in w.coords.items():
            assert c.dtype == torch.float32
            assert opt.inner.state[c]["exp_avg"].shape == w.coord_shape(s)
            assert c.numel() == 0  # coordinates are zero, so hold no memory, between steps


def test_weight_decay_is_decoupled_on_the_full_weight():
    model = make_model(10)
    opt = make_opt(model, inner_kw={"lr": 0.1, "weight_decay": 0.5})
    before = model.mid.weight.detach().clone()
    zero = {t: 0.0 * model(torch.randn(2, 12)).sum() for t in ("a", "b")}
    opt.backward(zero)
    opt.step()
    torch.testing.assert_close(model.mid.weight, before * (1 - 0.1 * 0.5))


def test_zero_gradients_are_a_no_op():
    model = make_model(11)
    opt = make_opt(model, inner_kw={"lr": 0.1, "weight_decay": 0.0})
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.backward({t: 0.0 * model(torch.randn(2, 12)).sum() for t in ("a", "b")})
        opt.step()
        opt.zero_grad()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("attach", ["gems", "inner"])
def test_param_groups_lrs_and_schedulers(attach):
    model = make_model(12)
    inner = torch.optim.AdamW([{"params": [model.mid.weight], "lr": 0.0},
                               {"params": [p for n, p in model.named_parameters() if n != "mid.weight"]}],
                              lr=1e-2, weight_decay=0.0)
    opt = gems.GemsOptimizer(inner, model=model, tasks=["a", "b"], rank=4, task_rank=2)
    assert opt.param_groups is inner.param_groups and len(opt.param_groups) == 2
    frozen_by_lr = model.mid.weight.detach().clone()
    sched = torch.optim.lr_scheduler.StepLR(opt if attach == "gems" else inner, step_size=1, gamma=0.5)
    for batch in task_batches(3, seed=12):
        opt.backward(task_losses(model, batch))
        opt.step()
        sched.step()
        opt.zero_grad()
    assert torch.equal(model.mid.weight, frozen_by_lr)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2 * 0.5**3)


def test_lr_scheduler_changes_the_targeted_update():
    deltas = []
    for lr in (1e-2, 2e-2):
        model = make_model(13)
        opt = make_opt(model, inner_kw={"lr": lr}, tasks=None, rank=4, task_rank=0)
        before = model.mid.weight.detach().clone()
        x, y = task_batches(1, seed=13)[0]["a"]
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        deltas.append(model.mid.weight.detach() - before)
    torch.testing.assert_close(deltas[1], 2 * deltas[0], rtol=1e-4, atol=1e-7)  # W rounding


@pytest.mark.parametrize("kw,exc", [
    (dict(rank=0), ValueError), (dict(rank=2.5), ValueError), (dict(task_rank=-1), ValueError),
    (dict(update_proj_gap=0), ValueError), (dict(scale=0.0), ValueError), (dict(scale=float("nan")), ValueError),
    (dict(proj_type="diagonal"), ValueError), (dict(task_basis="orthogonal"), ValueError),
    (dict(gating="loudest"), ValueError), (dict(gating={"a": 1.0}), ValueError),
    (dict(gating={"a": -1.0, "b": 1.0}), ValueError), (dict(tasks=["a", "a"]), ValueError),
    (dict(tasks="ab"), TypeError), (dict(tasks=["shared", "b"]), ValueError), (dict(refresh="qr"), ValueError),
    (dict(backend="tpu"), ValueError), (dict(target_modules="nothing_matches"), ValueError),
])
def test_bad_hyper_parameters_raise(kw, exc):
    with pytest.raises(exc):
        make_opt(make_model(0), **kw)


def test_bad_inner_raises():
    model = make_model(0)
    with pytest.raises(TypeError):
        gems.GemsOptimizer(object(), model=model)
    opt = make_opt(model)
    with pytest.raises(TypeError):
        gems.GemsOptimizer(opt, model=model)


def test_backward_input_errors():
    model = make_model(14)
    opt = make_opt(model)
    batch = task_batches(1, seed=14)[0]
    with pytest.raises(KeyError, match="unknown"):
        opt.backward({**task_losses(model, batch), "c": torch.zeros((), requires_grad=True)})
    with pytest.raises(KeyError, match="missing"):
        opt.backward({"a": task_losses(model, batch)["a"]})
    with pytest.raises(ValueError, match="does not require grad"):
        with torch.no_grad():
            opt.backward(task_losses(model, batch))
    with pytest.raises(ValueError):
        opt.backward(task_losses(model, batch), num_samples={"a": -1, "b": 2})
    with pytest.raises(KeyError):
        opt.backward(task_losses(model, batch), num_samples={"a": 1})
    x, y = batch["a"]
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="opt.backward"):
        opt.step()


def test_rank_clamped_with_a_warning():
    model = make_model(15)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="clamped"):
        opt = gems.GemsOptimizer(inner, model=model, tasks=["a", "b"], rank=64, task_rank=8)
    for w in opt.subspaces:
        m, n = w.param.shape
        assert w.ranks["shared"] == min(m, n)
        assert w.ranks["a"] == 0  # residual mode: nothing left beside a full shared subspace on the small side
    train(model, opt, task_batches(2, seed=15))


def test_non_finite_gradient_skips_that_weight_and_leaves_state_untouched():
    model = make_model(16)
    opt = make_opt(model)
    train(model, opt, task_batches(2, seed=16))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict())
    batch = task_batches(1, seed=17)[0]
    losses = task_losses(model, batch)
    losses = {"a": losses["a"] + float("nan") * model.mid.weight.sum(), "b": losses["b"]}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.backward(losses)
        opt.step()
    assert "mid.weight" in opt.last_skipped
    assert torch.equal(model.mid.weight, params["mid.weight"])
    mid = next(w for w in opt.subspaces if w.name == "mid.weight")
    saved = next(s for s in state["weights"] if s["name"] == "mid.weight")
    assert mid.step == int(saved["step"])
    for c in mid.coords.values():
        idx = [i for i, p in enumerate(p for g in opt.param_groups for p in g["params"]) if p is c][0]
        before = state["inner"]["state"][idx]
        after = opt.inner.state[c]
        assert torch.equal(before["exp_avg"], after["exp_avg"]) and torch.equal(before["step"], after["step"])
    assert not torch.equal(model.inp.weight, params["inp.weight"])  # the finite weights still moved


def test_non_finite_gradient_of_a_non_targeted_parameter_skips_it_alone():
    """The plain parameters' finiteness is read back with the targeted weights' norms (one transfer): a NaN
    in the norm's gradient skips that parameter, its inner state untouched, and everything else still steps."""
    model = make_model(18)
    opt = make_opt(model)
    train(model, opt, task_batches(2, seed=18))
    norm_w, mid_w = model.norm.weight.detach().clone(), model.mid.weight.detach().clone()
    state = copy.deepcopy(opt.inner.state[model.norm.weight])
    losses = task_losses(model, task_batches(1, seed=19)[0])
    losses["b"] = losses["b"] + float("nan") * model.norm.weight.sum()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.backward(losses)
        opt.step()
    assert len(opt.last_skipped) == 1 and opt.last_skipped[0].endswith(f"{tuple(model.norm.weight.shape)}")
    assert torch.equal(model.norm.weight, norm_w)
    assert all(torch.equal(v, state[k]) for k, v in opt.inner.state[model.norm.weight].items())
    assert not torch.equal(model.mid.weight, mid_w)


def test_batched_norms_equal_one_norm_per_tensor():
    """_norms (one multi-tensor reduction per device and dtype) gives what _norm gives tensor by tensor, for
    mixed dtypes, non-contiguous, empty and overflowing tensors, and _read_scalars reads them back exactly."""
    from gems.optimizer import _norm, _norms, _read_scalars

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(57, 153, generator=g), torch.randn(64, dtype=torch.float64, generator=g),
          torch.randn(30, 20, generator=g).to(torch.bfloat16), torch.randn(20, 30, generator=g).T, torch.zeros(0),
          torch.randn(7, generator=g) * 1e30]
    got, want = _norms(ts), [_norm(t) for t in ts]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert _read_scalars(got) == [float(b) for b in want]
    assert math.isinf(_read_scalars(got)[-1])


def test_task_without_gradient_for_a_weight_is_treated_as_zero():
    model = make_model(17)
    opt = make_opt(model)
    batch = task_batches(1, seed=17)[0]
    losses = task_losses(model, batch)
    losses["b"] = (model.out(torch.randn(3, 43)) ** 2).mean()  # task b never reaches inp or mid
    opt.backward(losses)
    opt.step()
    assert opt.last_skipped == []


def test_frozen_and_gradless_params_untouched():
    model = make_model(18)
    model.inp.weight.requires_grad_(False)
    opt = make_opt(model)
    assert all(w.name != "inp.weight" for w in opt.subspaces)
    frozen = model.inp.weight.detach().clone()
    gain = model.gain.detach().clone()
    batch = task_batches(1, seed=18)[0]
    losses = {t: nn.functional.mse_loss(model.out(torch.tanh(model.mid(torch.randn(4, 20)))), torch.zeros(4, 6))
              for t in ("a", "b")}
    opt.backward(losses)
    opt.step()
    assert torch.equal(model.inp.weight, frozen) and torch.equal(model.gain, gain)
    assert model.gain.grad is None


def test_target_modules_and_lm_head_default():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(30, 8)
            self.proj = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 30, bias=False)

    lm = LM()
    inner = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    opt = gems.GemsOptimizer(inner, model=lm, rank=2)
    assert [w.name for w in opt.subspaces] == ["proj.weight"]
    lm2 = LM()
    opt2 = gems.GemsOptimizer(torch.optim.AdamW(lm2.parameters()), model=lm2, rank=2, target_modules=["lm_head"])
    assert [w.name for w in opt2.subspaces] == ["lm_head.weight"]


def test_repr_and_deepcopy():
    model = make_model(19)
    opt = make_opt(model)
    train(model, opt, task_batches(2, seed=19))
    assert "GemsOptimizer(tasks=['a', 'b']" in repr(opt) and "AdamW" in repr(opt)
    clone = copy.deepcopy(opt)
    before = [w.param.detach().clone() for w in opt.subspaces]
    clone_model_params = [w.param for w in clone.subspaces]
    assert all(a is not b for a, b in zip(clone_model_params, (w.param for w in opt.subspaces)))
    for w in clone.subspaces:
        w.param.grad = torch.randn_like(w.param)
    clone.single_task = True  # the copy runs on its own; the original must not move
    for w, b in zip(opt.subspaces, before):
        assert torch.equal(w.param, b)


def test_step_hooks_and_closure():
    model = make_model(20)
    opt = make_opt(model, tasks=None, task_rank=0)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x, y = task_batches(1, seed=20)[0]["a"]

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]


def test_gates():
    model = make_model(21)
    opt = make_opt(model, gating={"a": 0.7, "b": 0.3})
    train(model, opt, task_batches(1, seed=21))
    assert opt.last_gates == {"a": 0.7, "b": 0.3}
    opt = make_opt(model, gating="uniform")
    train(model, opt, task_batches(1, seed=21))
    assert opt.last_gates == {"a": 0.5, "b": 0.5}
    g = reference.heuristic_gates([1.0, 3.0], [2.0, 2.0], [10, 30])
    assert g == pytest.approx([0.4 * 0.25 + 0.4 * 0.5 + 0.2 * 0.25, 0.4 * 0.75 + 0.4 * 0.5 + 0.2 * 0.75])
    assert sum(g) == pytest.approx(1.0)


def test_clip_grad_norm_scales_the_shared_gradient():
    model = make_model(22)
    opt = make_opt(model)
    batch = task_batches(1, seed=22)[0]
    opt.backward(task_losses(model, batch), num_samples={"a": 1, "b": 3})
    stash = opt._task_grads
    norm = opt.shared_grad_norm()
    expected = sum(float(reference.shared_gradient([stash.grads[t][id(p)] for t in ("a", "b")], [0.25, 0.75])
                         .pow(2).sum()) for p in model.parameters()) ** 0.5
    assert norm == pytest.approx(expected, rel=1e-5)
    before = opt.clip_grad_norm_(norm / 4)
    assert float(before) == pytest.approx(norm)
    assert opt.shared_grad_norm() == pytest.approx(norm / 4, rel=1e-4)
    assert opt.clip_grad_norm_(1e9) == pytest.approx(norm / 4, rel=1e-4)  # below the limit: untouched
