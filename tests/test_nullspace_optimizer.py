"""GemsOptimizer with a null space: every update of a protected weight stays in the null space."""
import warnings

import pytest
import torch
from torch import nn

import gems
from gems import nullspace as nsp
from gems.nullspace import NullSpace
from conftest import require

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny SVDs: see conftest.one_thread


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 6))


def _calibration_inputs(seed=1, n=256, k=4):
    g = torch.Generator().manual_seed(seed)
    span = torch.linalg.qr(torch.randn(16, k, generator=g))[0]
    return torch.randn(n, k, generator=g) @ span.T


def _task_batch(g):
    x = {t: torch.randn(32, 16, generator=g) for t in ("a", "b")}  # NOT confined to the calibration span
    return x, {"a": torch.sin(x["a"][:, :6]), "b": torch.cos(x["b"][:, 6:12])}


def _opt(model, ns, inner_cls=torch.optim.AdamW, inner_kw=None, **kw):
    inner = inner_cls(model.parameters(), **(inner_kw or {"lr": 1e-2, "weight_decay": 0.1}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gems.GemsOptimizer(inner, model=model, tasks=["a", "b"], rank=4, task_rank=2, update_proj_gap=10,
                                  nullspace=ns, **kw)


def _train(model, opt, steps, seed=2, check=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = _task_batch(g)
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        opt.backward({t: nn.functional.mse_loss(model(x[t]), y[t]) for t in ("a", "b")})
        opt.step()
        opt.zero_grad()
        if check:
            check(before)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
@pytest.mark.parametrize("inner_cls,inner_kw", [
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1}),
    (torch.optim.RMSprop, {"lr": 1e-3, "weight_decay": 0.1}),
])
def test_protected_layer_outputs_on_calibration_inputs_unchanged(proj_type, inner_cls, inner_kw):
    """Input side: after 50 steps on two tasks, layer 0 maps the calibration inputs exactly as before
    while it did move; every step's update has ‖ΔW·Q‖ ≤ 1e-5·‖ΔW‖ (both basis sides: folded and projected)."""
    model = _net()
    x_cal = _calibration_inputs()
    ns = NullSpace.calibrate(model, [x_cal[i:i + 64] for i in range(0, 256, 64)], side="input",
                             threshold=2e-2, target_modules="^0$")
    assert ns.report()["0"]["protected_dim"] == 4
    opt = _opt(model, ns, inner_cls, inner_kw, proj_type=proj_type)
    opt.track_update_stats = True
    w0 = model[0].weight.detach().clone()
    q = ns.basis("0")
    leaks = []

    def check(before):
        delta = model[0].weight.detach().double() - before["0.weight"]
        leaks.append(float((delta @ q.double()).norm() / delta.norm()))
        assert opt.diagnostics()["0/leakage"] <= 1e-5

    _train(model, opt, 50, check=check)
    moved = model[0].weight.detach() - w0
    assert float(moved.norm() / w0.norm()) > 1e-2
    rel = float((moved.double() @ x_cal.double().T).norm() / (w0.double() @ x_cal.double().T).norm())
    assert rel <= 1e-5
    assert max(leaks) <= 1e-5


@pytest.mark.parametrize("stash", ["full", "projected"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_output_side_updates_stay_in_the_null_space(proj_type, stash):
    model = _net(3)
    x_cal = _calibration_inputs(4)
    ns = NullSpace.calibrate(model, [x_cal], side="output", threshold=2e-2, target_modules="^0$")
    k = ns.report()["0"]["protected_dim"]
    assert 0 < k < 24
    opt = _opt(model, ns, proj_type=proj_type, stash=stash, refresh_schedule="staggered")
    q = ns.basis("0").double()
    leaks = []
    _train(model, opt, 20, check=lambda before: leaks.append(
        nsp.leakage(model[0].weight.detach().double() - before["0.weight"], q, "output")))
    assert max(leaks) <= 1e-5


def test_gradient_mode_does_not_keep_adam_updates_in_the_null_space():
    """The authors' scheme projects the raw gradient; Adam's per-coordinate scaling then leaks."""
    model = _net(5)
    x_cal = _calibration_inputs(6)
    ns = NullSpace.calibrate(model, [x_cal], side="input", threshold=2e-2, target_modules="^0$")
    q = ns.basis("0").double()
    leaks = {}
    for mode in ("update", "gradient"):
        torch.manual_seed(0)
        m = _net(5)
        opt = _opt(m, ns, proj_type="reverse_std", nullspace_mode=mode, nullspace_weight_decay="full",
                   inner_kw={"lr": 1e-2, "weight_decay": 0.0})
        got = []
        _train(m, opt, 10, check=lambda before: got.append(
            nsp.leakage(m[0].weight.detach().double() - before["0.weight"], q, "input")))
        leaks[mode] = max(got)
    assert leaks["update"] <= 1e-5
    assert leaks["gradient"] >= 1e-3


def test_weight_decay_project_vs_full():
    model = _net(7)
    x_cal = _calibration_inputs(8)
    ns = NullSpace.calibrate(model, [x_cal], side="input", threshold=2e-2, target_modules="^0$")
    q = ns.basis("0").double()
    for decay, expect_protected in (("project", True), ("full", False)):
        m = _net(7)
        opt = _opt(m, ns, nullspace_weight_decay=decay, inner_kw={"lr": 0.1, "weight_decay": 0.5})
        w = m[0].weight.detach().double().clone()
        opt.backward({t: 0.0 * m(torch.randn(2, 16)).sum() for t in ("a", "b")})
        opt.step()
        change = m[0].weight.detach().double() - w
        inside = float((change @ q).norm())
        assert (inside <= 1e-6) == expect_protected


def test_tiny_llama_protected_layers_stay_in_the_null_space():
    transformers = require("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 16, (4, 12), generator=g),
              "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(3)]
    ns = NullSpace.calibrate(model, calib, side="input", threshold=0.5, mode="energy")
    protected = {n: ns.basis(n) for n in ns.modules if ns.basis(n) is not None}
    assert len(protected) == len(ns.modules) == 2 * 7  # q, k, v, o, gate, up, down per layer
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(inner, model=model, tasks=["search", "rec"], rank=8, task_rank=4,
                                 update_proj_gap=3, nullspace=ns)
    params = dict(model.named_parameters())
    for _ in range(5):
        before = {n: params[n + ".weight"].detach().double().clone() for n in protected}
        ids = {t: torch.randint(lo, lo + 32, (4, 12), generator=g) for t, lo in (("search", 0), ("rec", 32))}
        opt.backward({t: model(input_ids=i, labels=i).loss for t, i in ids.items()})
        opt.step()
        opt.zero_grad()
        for n, q in protected.items():
            delta = params[n + ".weight"].detach().double() - before[n]
            assert float(delta.norm()) > 1e-4, n  # every protected weight moves at every step...
            assert nsp.leakage(delta, q, "input") <= 1e-5, n  # ...inside its null space


def test_diagnostics_report_conflicting_tasks():
    from gems.diagnostics import captured_energy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    opt = _opt(model, None, inner_kw={"lr": 1e-2})
    x = torch.randn(16, 8)
    target = torch.randn(16, 8)

    def losses():
        return {"a": nn.functional.mse_loss(model(x), target), "b": nn.functional.mse_loss(model(x), -target)}

    opt.backward(losses())
    d = opt.diagnostics()
    assert d["0/cos/a-b"] < 0
    assert 0 <= d["0/conflict"] <= 1
    assert set(d) >= {"gate/a", "gate/b"}
    assert all(isinstance(v, float) for v in d.values())
    assert not any("/energy/" in k for k in d)  # no bases before the first step
    opt.step()
    # after the step: bases (residual task subspaces at 90° to the shared one), no gradients
    d = opt.diagnostics()
    assert d["0/angle/shared-a"] == pytest.approx(90.0, abs=1e-3)
    assert d["0/angle/shared-b"] == pytest.approx(90.0, abs=1e-3)
    assert not any("/energy/" in k or "/cos/" in k for k in d)
    # with the next step's gradients: the energy each basis captures, as measured by hand
    ls = losses()
    grads = {t: torch.autograd.grad(ls[t], [model[0].weight], retain_graph=True)[0] for t in ls}
    opt.backward(ls)
    d = opt.diagnostics()
    w = opt.subspaces[0]
    shared = 0.5 * grads["a"] + 0.5 * grads["b"]  # equal sample counts
    for s, g in (("shared", shared), ("a", grads["a"]), ("b", grads["b"])):
        assert f"0/energy/{s}" in d, sorted(d)
        assert 0 <= d[f"0/energy/{s}"] <= 1
        assert d[f"0/energy/{s}"] == pytest.approx(captured_energy(g, w.bases[s], w.side), rel=1e-4, abs=1e-6)
    # the shared basis is the top-4 of the shared gradient refreshed one step ago: most of its energy
    assert d["0/energy/shared"] > 0.5


def test_nullspace_argument_errors():
    model = _net()
    with pytest.raises(TypeError):
        _opt(model, {"0": torch.eye(16)[:, :2]})
    with pytest.raises(ValueError):
        _opt(model, None, nullspace_mode="output")
    with pytest.raises(ValueError):
        _opt(model, None, nullspace_weight_decay="none")
    other = nn.Sequential(nn.Linear(10, 24))
    ns = NullSpace.calibrate(other, [torch.randn(8, 10)], side="input", threshold=1e-3)
    with pytest.raises(nsp.IncompatibleNullSpaceError):
        _opt(model, ns)


def test_resume_with_nullspace_is_bit_exact(tmp_path):
    x_cal = _calibration_inputs(9)
    ns = NullSpace.calibrate(_net(9), [x_cal], side="input", threshold=2e-2, target_modules="^0$")
    ns.save(tmp_path / "ns.safetensors")
    model = _net(9)
    opt = _opt(model, ns, proj_type="reverse_std")
    _train(model, opt, 6, seed=10)
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, tmp_path / "c.pt")
    _train(model, opt, 8, seed=11)
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    m2 = _net(0)
    m2.load_state_dict(ck["m"])
    o2 = _opt(m2, NullSpace.load(tmp_path / "ns.safetensors"), proj_type="reverse_std")
    o2.load_state_dict(ck["o"])
    _train(m2, o2, 8, seed=11)
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)
