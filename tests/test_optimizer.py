"""GemsOptimizer behaviour: decomposition, properties, any inner optimizer, errors, non-finite gradients."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import gems
from gems import collect, reference
from helpers import make_model, make_opt, saved_weight, task_batches, task_losses, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny SVDs: see conftest.one_thread


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
    """shared_gradients (one foreach op per task) gives reference.shared_gradient bit for bit, per dtype."""
    from gems.reductions import shared_gradients as _shared_gradients

    g = torch.Generator().manual_seed(0)
    weights = [0.3, 0.7]
    grads = [[torch.randn(5, 7, generator=g).to(dt) for _ in weights]
             for dt in (torch.float32, torch.bfloat16, torch.float64, torch.float32)]
    out = _shared_gradients(grads, weights)
    assert len(out) == len(grads)
    for got, per_task in zip(out, grads):
        want = reference.shared_gradient(per_task, weights)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_non_targeted_params_get_the_shared_gradient():
    model = make_model(2)
    opt = make_opt(model)
    batch = task_batches(1, seed=3)[0]
    opt.backward(task_losses(model, batch), num_samples={"a": 1, "b": 3})
    collect.gather_gradients(opt)
    ga = torch.autograd.grad(task_losses(model, batch)["a"], [model.norm.weight])[0]
    gb = torch.autograd.grad(task_losses(model, batch)["b"], [model.norm.weight])[0]
    torch.testing.assert_close(model.norm.weight.grad, 0.25 * ga + 0.75 * gb)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_bases_orthonormal_and_residual_task_bases_orthogonal_to_shared(proj_type):
    model = make_model(3)
    opt = make_opt(model, proj_type=proj_type, rank=5, task_rank=3, task_basis="residual")
    train(model, opt, task_batches(3, seed=4))
    assert len(opt.subspaces) == 3
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


def _eval(model, batch):
    with torch.no_grad():
        return {t: float(v) for t, v in task_losses(model, batch).items()}


def _inner_step_on(inner_cls, inner_kw, value, grad):
    """One step of a fresh inner optimizer on a lone tensor: what it makes of ``grad`` at ``value``."""
    x = nn.Parameter(value.detach().clone())
    x.grad = grad.detach().clone()
    inner_cls([x], **inner_kw).step()
    return x.detach()


@pytest.mark.parametrize("inner_cls,inner_kw", INNERS, ids=lambda v: getattr(v, "__name__", ""))
def test_any_inner_optimizer_trains_both_tasks(inner_cls, inner_kw):
    """The first step, by hand, for any inner optimizer: a fresh instance of it steps zero coordinates with the
    projected gradients (B_shᵀ·Σ_t w_t·G_t and B_tᵀ·G_t), and W moves by scale·(B_sh·δ_sh + Σ_t gate_t·B_t·δ_t)
    after decoupled decay; plain parameters take one inner step on the shared gradient. Then 40 steps on fresh
    batches lower both tasks' loss on a held-out batch."""
    model = make_model(7)
    opt = make_opt(model, inner_cls, inner_kw, rank=4, task_rank=2, update_proj_gap=10, scale=0.7)
    batches = task_batches(42, seed=8)  # the same two target maps throughout
    first, held_out, rest = batches[0], batches[1], batches[2:]
    before = {id(p): p.detach().clone() for p in model.parameters()}
    losses = task_losses(model, first)
    params = list(model.parameters())
    grads = {t: dict(zip(map(id, params), torch.autograd.grad(losses[t], params, retain_graph=True))) for t in losses}
    opt.backward(losses)
    sw = opt._task_grads.shared_weights()
    opt.step()
    opt.zero_grad()
    assert sw == [0.5, 0.5]
    gates = [opt.last_gates[t] for t in ("a", "b")]
    assert all(0 < g < 1 for g in gates) and sum(gates) == pytest.approx(1.0)
    shared = {k: sw[0] * grads["a"][k] + sw[1] * grads["b"][k] for k in grads["a"]}
    lr, wd = inner_kw["lr"], float(opt.param_groups[0].get("weight_decay", 0.0))
    assert len(opt.subspaces) == 3
    targeted = set()
    for w in opt.subspaces:
        targeted.add(id(w.param))
        update = torch.zeros_like(w.param)
        for s, g, c in [("shared", shared[id(w.param)], 1.0)] + [(t, grads[t][id(w.param)], gate)
                                                                 for t, gate in zip(("a", "b"), gates)]:
            coords = reference.project(g, w.bases[s], w.side)
            delta = _inner_step_on(inner_cls, inner_kw, torch.zeros_like(coords), coords)
            assert float(delta.abs().max()) > 0, (w.name, s)
            update += opt.scale * c * reference.project_back(delta, w.bases[s], w.side)
        want = before[id(w.param)] * (1 - lr * wd) + update
        torch.testing.assert_close(w.param.detach(), want, rtol=1e-5, atol=1e-7, msg=w.name)
    plain = [p for p in params if id(p) not in targeted]
    assert len(plain) == 5  # the inp and out biases, the norm's weight and bias, the 0-d gain
    for p in plain:
        torch.testing.assert_close(p.detach(), _inner_step_on(inner_cls, inner_kw, before[id(p)], shared[id(p)]),
                                   rtol=1e-5, atol=1e-7)
    start = _eval(model, held_out)
    train(model, opt, rest)
    end = _eval(model, held_out)
    for t in ("a", "b"):
        assert end[t] < 0.95 * start[t], (inner_cls.__name__, t, start[t], end[t])
    targeted_weights = [m.weight for m in (model.inp, model.mid, model.out)]
    assert not any(k is p for k in opt.inner.state for p in targeted_weights)


def test_inner_holds_coordinates_not_weights_and_state_is_low_rank():
    model = make_model(9)
    opt = make_opt(model, rank=4, task_rank=2)
    train(model, opt, task_batches(2, seed=9))
    assert len(opt.subspaces) == 3
    for w in opt.subspaces:
        assert all(w.param is not p for g in opt.inner.param_groups for p in g["params"])
        assert any(w.param is p for g in opt.param_groups for p in g["params"])  # torch's view: the model's
        assert set(w.coords) == {"shared", "a", "b"}
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
    # torch's view: the inner groups' options, the model's parameters
    assert len(opt.param_groups) == 2 and [g.inner_group for g in opt.param_groups] == inner.param_groups
    assert opt.param_groups[0]["params"] == [model.mid.weight] and opt.param_groups[0]["lr"] == 0.0
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
    assert len(opt.subspaces) == 3
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
    saved = saved_weight(opt, state, "mid.weight")
    assert mid.step == int(saved["gems"]["step"])
    assert len(mid.coords) == 3
    for s, c in mid.coords.items():
        before = saved["coords"][s]
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
    """norms (one multi-tensor reduction per device and dtype) gives what norm gives tensor by tensor, for
    mixed dtypes, non-contiguous, empty and overflowing tensors, and read_scalars reads them back exactly."""
    from gems.reductions import norm as _norm, norms as _norms, read_scalars as _read_scalars

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(57, 153, generator=g), torch.randn(64, dtype=torch.float64, generator=g),
          torch.randn(30, 20, generator=g).to(torch.bfloat16), torch.randn(20, 30, generator=g).T, torch.zeros(0),
          torch.randn(7, generator=g) * 1e30]
    got, want = _norms(ts), [_norm(t) for t in ts]
    assert len(got) == len(ts)
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
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.backward(losses)
    opt.step()
    assert opt.last_skipped == []
    for n, p in model.named_parameters():  # every weight stepped (inp and mid by task a alone), finitely
        assert torch.isfinite(p).all() and not torch.equal(p, before[n]), n


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
    """A deep copy of (model, optimizer), taken together, is an independent optimizer in the same state: stepped
    on the same batch it gives the original's weights and bases bit for bit, and stepping it moves nothing of
    the original's (nor the other way round)."""
    model = make_model(19)
    opt = make_opt(model, update_proj_gap=3)
    train(model, opt, task_batches(2, seed=19))
    assert "GemsOptimizer(tasks=['a', 'b']" in repr(opt) and "AdamW" in repr(opt)
    model2, clone = copy.deepcopy((model, opt))
    assert len(clone.subspaces) == len(opt.subspaces) == 3
    params2 = list(model2.parameters())
    # the clone steps the copied model's tensors, never the original's
    assert all(any(w.param is p for p in params2) for w in clone.subspaces)
    assert all(w.param is not v.param for w, v in zip(clone.subspaces, opt.subspaces))
    original = [p.detach().clone() for p in model.parameters()]
    original_bases = [{s: b.clone() for s, b in w.bases.items()} for w in opt.subspaces]
    batches = task_batches(2, seed=20)  # the second step refreshes the bases (gap 3)
    train(model2, clone, batches)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), original))  # the original did not move
    assert all(torch.equal(w.bases[s], b[s]) for w, b in zip(opt.subspaces, original_bases) for s in b)
    assert [w.step for w in opt.subspaces] == [2, 2, 2] and [w.step for w in clone.subspaces] == [4, 4, 4]
    assert not all(torch.equal(p, q) for p, q in zip(params2, original))  # the clone did
    stepped = [p.detach().clone() for p in params2]
    train(model, opt, batches)
    assert all(torch.equal(p, q) for p, q in zip(params2, stepped))  # and stepping the original leaves it alone
    for p, q in zip(model.parameters(), params2):
        assert torch.equal(p, q)
    for w, v in zip(opt.subspaces, clone.subspaces):
        assert w.step == v.step == 4 and set(w.bases) == set(v.bases)
        assert all(torch.equal(w.bases[s], v.bases[s]) for s in w.bases)


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

    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(model(x), y))  # the closure's loss, at the weights before the step
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the closure's gradient stepped


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
