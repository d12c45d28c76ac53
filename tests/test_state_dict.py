"""Checkpoints: plain-value state dicts, weights_only round trip, fp32 state with bf16 params, bit-exact resume."""
import copy
import io

import pytest
import torch

import gems
from helpers import make_model, make_opt, task_batches, train

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
    assert torch.equal(sd["weights"][0]["bases"]["shared"], again["weights"][0]["bases"]["shared"])
    loaded = _roundtrip(sd)
    assert loaded["config"] == sd["config"] and loaded["format_version"] == 1
    assert len(sd["weights"]) == len(loaded["weights"]) == 3
    for a, b in zip(sd["weights"], loaded["weights"]):
        assert a["name"] == b["name"] and torch.equal(a["step"], b["step"]) and int(a["step"]) == 6
        assert set(a["bases"]) == set(b["bases"]) == {"shared", "a", "b"}
        for k in a["bases"]:
            assert torch.equal(a["bases"][k], b["bases"][k])


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
    for key in ("format_version", "seed", "last_gates", "config"):
        sd.pop(key)
    for w in sd["weights"]:
        w.pop("ranks")
        w.pop("side")
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
