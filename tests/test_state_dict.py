"""Checkpoints: plain-value state dicts, weights_only round trip, fp32 state with bf16 params, bit-exact resume."""
import copy
import io
from pathlib import Path

import pytest
import torch

import gems
from helpers import make_model, make_opt, saved_weight, task_batches, task_losses, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny SVDs: see conftest.one_thread


def _roundtrip(obj, path=None):
    buf = io.BytesIO() if path is None else path
    torch.save(obj, buf)
    if path is None:
        buf.seek(0)
    return torch.load(buf, weights_only=True)


def _is_plain(x):
    if isinstance(x, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_is_plain(v) for v in x)
    return x is None or isinstance(x, (torch.Tensor, str, int, float, bool))


def test_state_dict_is_plain_deterministic_and_weights_only():
    model = make_model(30)
    opt = make_opt(model)
    train(model, opt, task_batches(6, seed=30))
    sd = opt.state_dict()
    assert _is_plain(sd)
    again = opt.state_dict()
    names = [w.name for w in opt.subspaces]
    assert torch.equal(saved_weight(opt, sd, names[0])["gems"]["bases"]["shared"],
                       saved_weight(opt, again, names[0])["gems"]["bases"]["shared"])
    loaded = _roundtrip(sd)
    assert loaded["config"] == sd["config"] and loaded["format_version"] == 2
    # torch's layout: every model parameter in param_groups, its state keyed by its position there
    params = [p for g in opt.param_groups for p in g["params"]]
    assert [p for g in loaded["param_groups"] for p in g["params"]] == list(range(len(params)))
    assert len(params) == len(list(model.parameters())) and set(loaded["state"]) == set(range(len(params)))
    for name in names:
        a, b = saved_weight(opt, sd, name)["gems"], saved_weight(opt, loaded, name)["gems"]
        assert torch.equal(a["step"], b["step"]) and int(a["step"]) == 6
        assert set(a["bases"]) == set(b["bases"]) == {"shared", "a", "b"} and all(b["has_basis"].values())
        for k in a["bases"]:
            assert torch.equal(a["bases"][k], b["bases"][k])
        assert set(saved_weight(opt, loaded, name)["coords"]) == {"shared", "a", "b"}


@pytest.mark.parametrize("gap", [4, 7])
def test_resume_is_bit_exact_across_a_refresh(tmp_path, gap):
    batches = task_batches(30, seed=31)
    model = make_model(31)
    opt = make_opt(model, update_proj_gap=gap, inner_kw={"lr": 1e-2, "weight_decay": 0.01})
    train(model, opt, batches[:10])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train(model, opt, batches[10:])

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh = make_model(999)  # different init: everything must come from the checkpoint
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = make_opt(fresh, update_proj_gap=gap, inner_kw={"lr": 1e-2, "weight_decay": 0.01})
    fresh_opt.load_state_dict(ckpt["opt"])
    train(fresh, fresh_opt, batches[10:])
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    assert len(opt.subspaces) == len(fresh_opt.subspaces) == 3
    for w, v in zip(opt.subspaces, fresh_opt.subspaces):
        assert w.step == v.step == 30
        assert set(w.bases) == set(v.bases) == {"shared", "a", "b"}
        for s in w.bases:
            assert torch.equal(w.bases[s], v.bases[s])


def test_fp32_state_stays_fp32_with_bf16_params():
    model = make_model(32).to(torch.bfloat16)
    opt = make_opt(model)
    batches = [{t: (x.bfloat16(), y.bfloat16()) for t, (x, y) in b.items()} for b in task_batches(3, seed=32)]
    train(model, opt, batches)
    sd = _roundtrip(opt.state_dict())
    model2 = make_model(32).to(torch.bfloat16)
    opt2 = make_opt(model2)
    opt2.load_state_dict(sd)
    assert len(opt2.subspaces) == 3
    for w in opt2.subspaces:
        assert len(w.bases) == len(w.coords) == 3
        assert all(b.dtype == torch.float32 for b in w.bases.values())
        for c in w.coords.values():
            assert c.dtype == torch.float32
            assert opt2.inner.state[c]["exp_avg"].dtype == torch.float32
            assert opt2.inner.state[c]["exp_avg_sq"].dtype == torch.float32
    train(model2, opt2, batches)


def test_older_state_dicts_without_optional_keys_load():
    model = make_model(33)
    opt = make_opt(model)
    train(model, opt, task_batches(2, seed=33))
    sd = copy.deepcopy(opt.state_dict())
    for key in ("format_version", "tasks", "last_gates", "config"):  # what DCP does not keep
        sd.pop(key)
    for name in [w.name for w in opt.subspaces]:
        for key in ("ranks", "left_side", "seed", "has_basis", "next_refresh", "gap_factor"):
            saved_weight(opt, sd, name)["gems"].pop(key)
    opt2 = make_opt(make_model(33))
    opt2.load_state_dict(sd)
    assert [w.step for w in opt2.subspaces] == [w.step for w in opt.subspaces] == [2, 2, 2]
    for w, v in zip(opt.subspaces, opt2.subspaces):  # the bases came with it, and the ranks and side were inferred
        assert w.side == v.side and w.ranks == v.ranks
        assert all(torch.equal(w.bases[s], v.bases[s]) for s in w.bases)


def test_mismatched_state_dicts_raise():
    model = make_model(34)
    opt = make_opt(model)
    train(model, opt, task_batches(1, seed=34))
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="tasks"):
        make_opt(make_model(34), tasks=["x", "y"]).load_state_dict(sd)
    with pytest.raises(ValueError, match="ranks"):
        make_opt(make_model(34), rank=3).load_state_dict(sd)
    with pytest.raises(ValueError, match="targeted weights"):
        make_opt(make_model(34), target_modules=["mid"]).load_state_dict(sd)
    newer = dict(sd, format_version=99)
    with pytest.raises(ValueError, match="Upgrade gems"):
        opt.load_state_dict(newer)


def test_a_format_1_checkpoint_still_loads_and_resumes_bit_exactly():
    """tests/data/gems_state_v1.pt: 6 steps written by gems before torch's layout (format 1: weights +
    inner); gems_state_v1_after8.pt: the weights 8 steps later, trained without interruption."""
    data = Path(__file__).parent / "data"
    ckpt = torch.load(data / "gems_state_v1.pt", weights_only=True)
    assert ckpt["opt"]["format_version"] == 1 and "weights" in ckpt["opt"]
    model = make_model(1)
    model.load_state_dict(ckpt["model"])
    opt = make_opt(model, update_proj_gap=4, inner_kw={"lr": 1e-2, "weight_decay": 0.01})
    opt.load_state_dict(ckpt["opt"])
    train(model, opt, task_batches(14, seed=77)[6:])
    # written with 2 threads, read here with one (conftest.one_thread): equal up to summation order
    for name, ref in torch.load(data / "gems_state_v1_after8.pt", weights_only=True).items():
        torch.testing.assert_close(model.state_dict()[name], ref, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_with_a_scheduler_and_decay_is_bit_exact():
    """torch's load_state_dict replaces the inner optimizer's group dicts: the scheduler (writing
    opt.param_groups) and the targeted weights' decay (reading their group's lr) must follow them."""
    def run(model, opt, sched, batches):
        for batch in batches:
            opt.backward(task_losses(model, batch))
            opt.step()
            sched.step()
            opt.zero_grad()

    batches = task_batches(12, seed=35)
    kw = {"update_proj_gap": 4, "inner_kw": {"lr": 1e-2, "weight_decay": 0.5}}
    model = make_model(35)
    opt = make_opt(model, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    run(model, opt, sched, batches[:5])
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    run(model, opt, sched, batches[5:])
    fresh = make_model(998)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = make_opt(fresh, **kw)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    fresh_opt.load_state_dict(ckpt["opt"])
    fresh_sched.load_state_dict(ckpt["sched"])
    run(fresh, fresh_opt, fresh_sched, batches[5:])
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 6)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
