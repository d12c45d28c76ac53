"""Null-space calibration, projection and persistence (CPU, seeded, fast)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from torch import nn

from conftest import require
from gems import reference
from gems.errors import MissingResourceError
from gems.nullspace import (
    IncompatibleNullSpaceError,
    NullSpace,
    NullSpaceFormatError,
    acts_on,
    fold_into_basis,
    leakage,
    project_gradient,
    project_update,
    resolve_targets,
    select_rank,
)


def _orthonormal(d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0].float()


def _low_rank_inputs(n_batches=6, batch=32, d=16, rank=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    span = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))[0].float()  # d×rank
    batches = [torch.randn(batch, rank, generator=gen) @ span.T for _ in range(n_batches)]
    return batches, span


def _mlp(bias0=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12, bias=bias0), nn.ReLU(), nn.Linear(12, 8))


# ------------------------------------------------------------------------------------------------
# projector properties and threshold modes
# ------------------------------------------------------------------------------------------------


def test_projector_symmetric_idempotent_and_kills_calibration_span():
    batches, span = _low_rank_inputs()
    ns = NullSpace.calibrate(_mlp(), batches, side="input")
    p = ns.projector("0").double()
    assert torch.allclose(p, p.T, atol=1e-7)
    assert torch.allclose(p @ p, p, atol=1e-6)
    k_cal = torch.cat(batches)  # N×16 calibration activations, rank 4
    rel = (k_cal @ p.float()).norm() / k_cal.norm()  # P acts on each activation x (rows of K)
    assert rel <= 1e-5
    # the protected basis spans exactly the activations' subspace
    q = ns.basis("0")
    assert q.dtype == torch.float32 and q.shape == (16, 4)
    assert torch.allclose(q.T @ q, torch.eye(4), atol=1e-6)
    assert torch.linalg.svdvals(q.double().T @ span.double()).min() > 1 - 1e-6


def test_protected_rank_monotone_in_threshold():
    gen = torch.Generator().manual_seed(1)
    scales = torch.logspace(1, -4, 16)  # spread spectrum
    batches = [torch.randn(64, 16, generator=gen) * scales for _ in range(4)]
    model = _mlp()
    absolute = [NullSpace.calibrate(model, batches, threshold=t, mode="absolute").report()["0"]["protected_dim"]
                for t in (0.0, 1e-6, 1e-4, 1e-2, 1.0, 10.0, 1e3)]
    energy = [NullSpace.calibrate(model, batches, threshold=t, mode="energy").report()["0"]["protected_dim"]
              for t in (0.0, 0.5, 0.9, 0.99, 0.999999, 1.0)]
    assert absolute == sorted(absolute, reverse=True) and absolute[0] == 16 and absolute[-1] == 0
    assert len(set(absolute)) > 3
    assert energy == sorted(energy) and energy[0] == 0 and energy[-1] == 16
    assert len(set(energy)) > 3
    topk = NullSpace.calibrate(model, batches, threshold=5, mode="topk").report()
    assert topk["0"]["protected_dim"] == 5 and topk["2"]["protected_dim"] == 5


def test_select_rank_modes_and_validation():
    spec = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert select_rank(spec, 1.5, "absolute") == 3
    assert select_rank(spec, 0.7, "energy") == 2  # (4+3)/10 reaches 0.7 exactly: inclusive
    assert select_rank(spec, 0.75, "energy") == 3
    assert select_rank(spec, 1.0, "energy") == 4  # rank of the spectrum, not d
    assert select_rank(spec, 2, "topk") == 2
    assert select_rank(spec, 99, "topk") == 6
    for mode, bad in (("energy", 1.5), ("absolute", -1.0), ("topk", 2.5), ("nope", 1.0)):
        with pytest.raises(ValueError):
            select_rank(spec, bad, mode)


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------


def test_calibrate_input_side_rank4():
    batches, _ = _low_rank_inputs()
    model = _mlp()
    model.train()
    ns = NullSpace.calibrate(model, batches, side="input", threshold=2e-2)
    assert model.training, "training mode must be restored"
    assert all(len(m._forward_hooks) == 0 for m in model.modules()), "hooks must be removed"
    rep = ns.report()
    assert set(rep) == {"0", "2"} and ns.modules == ["0", "2"]
    assert rep["0"] == {"protected_dim": 4, "total_dim": 16, "status": "partial", "samples": 6 * 32}
    assert rep["2"]["total_dim"] == 12
    assert ns.side == "input" and ns.protect_side == "input"
    spec = ns.spectrum("0")
    assert spec.shape == (16,) and spec[4:].abs().max() < 1e-10 and spec[3] > 2e-2
    ns32 = NullSpace.calibrate(model, batches, side="input", dtype=torch.float32)
    assert ns32.report()["0"]["protected_dim"] == 4 and ns32.accumulate_dtype == "float32"
    assert torch.linalg.svdvals(ns32.basis("0").T @ ns.basis("0")).min() > 1 - 1e-5


def test_docstring_example():
    import doctest

    import gems.nullspace

    result = doctest.testmod(gems.nullspace, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_calibrate_output_side_rank4_and_bias():
    batches, _ = _low_rank_inputs()
    ns = NullSpace.calibrate(_mlp(bias0=False), batches, side="output")
    assert ns.report()["0"]["protected_dim"] == 4 and ns.report()["0"]["total_dim"] == 12
    assert ns.protect_side == "output"
    # outputs as the module returns them: a bias adds one direction to the uncentred covariance
    ns_b = NullSpace.calibrate(_mlp(bias0=True), batches, side="output")
    assert ns_b.report()["0"]["protected_dim"] == 5


def test_calibrate_max_batches_and_tuple_batches():
    batches, _ = _low_rank_inputs(n_batches=5)
    ns = NullSpace.calibrate(_mlp(), iter(batches), max_batches=2)
    assert ns.report()["0"]["samples"] == 2 * 32
    ns2 = NullSpace.calibrate(_mlp(), [(b,) for b in batches[:2]])
    assert torch.equal(ns.basis("0"), ns2.basis("0"))
    with pytest.raises(ValueError, match="no batches"):
        NullSpace.calibrate(_mlp(), [])


def test_calibrate_restores_state_when_forward_fails():
    model = _mlp()
    model.train()
    with pytest.raises(RuntimeError):
        NullSpace.calibrate(model, [torch.randn(4, 16), torch.randn(4, 7)])
    assert model.training
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_calibrate_weight_side_data_free():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 6), nn.Linear(6, 10))
    ns = NullSpace.calibrate(model, None, side="weight", threshold=3, mode="topk")
    assert ns.protect_side == "input"
    w = model[0].weight.detach().double()
    vh = torch.linalg.svd(w, full_matrices=False)[2][:3].T
    q = ns.basis("0").double()
    assert torch.linalg.svdvals(q.T @ vh).min() > 1 - 1e-5  # top-3 right singular vectors
    sv = torch.linalg.svdvals(w)
    assert torch.allclose(ns.spectrum("0")[:6], sv, atol=1e-10)
    # absolute compares singular values; W0 (6×16) has rank 6, so at most 6 directions
    full = NullSpace.calibrate(model, None, side="weight", threshold=0.0, mode="absolute").report()
    assert full["0"]["protected_dim"] == 6 and full["1"]["protected_dim"] == 6
    energy = NullSpace.calibrate(model, None, side="weight", threshold=1.0, mode="energy").report()
    assert energy["0"]["protected_dim"] == 6
    with pytest.raises(ValueError, match="needs calibration batches"):
        NullSpace.calibrate(model, None, side="input")


def test_empty_and_full_reported_with_warning(caplog):
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(64, 16, generator=gen) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="gems.nullspace"):
        ns = NullSpace.calibrate(_mlp(), batches, threshold=1e6)
    assert {r["status"] for r in ns.report().values()} == {"empty"}
    assert ns.basis("0") is None
    assert torch.equal(ns.projector("0"), torch.eye(16))
    assert "protects nothing" in caplog.text and "0, 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gems.nullspace"):
        ns = NullSpace.calibrate(_mlp(), batches, threshold=0.0, target_modules=["0"])
    assert ns.report() == {"0": {"protected_dim": 16, "total_dim": 16, "status": "full", "samples": 128}}
    assert "cannot move" in caplog.text and "0" in caplog.text


def test_target_filters():
    model = _mlp()
    assert list(resolve_targets(model, ["^2$"])) == ["2"]
    assert list(resolve_targets(model, "0")) == ["0"]
    assert list(resolve_targets(model, lambda n, m: m.out_features == 8)) == ["2"]
    for spec in (["q_proj"], ["1"], lambda n, m: False):  # "1" is the ReLU: not an nn.Linear
        with pytest.raises(ValueError, match="matches no nn.Linear"):
            resolve_targets(model, spec)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        NullSpace.calibrate(model, [torch.randn(2, 16)], target_modules=["nothing"])
    # same selection as the optimizer's, and DDP-style wrappers are unwrapped
    from gems.targets import select_linear_modules

    wrapper = nn.Module()
    wrapper.module = model
    assert list(resolve_targets(wrapper)) == [n for n, _ in select_linear_modules(model)] == ["0", "2"]


def test_default_targets_skip_lm_head_and_tied_head():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)
            self.decoder = nn.Linear(8, 10, bias=False)
            self.decoder.weight = self.embed.weight  # tied under another name
            self.lm_head = nn.Linear(8, 10)

    assert list(resolve_targets(Tiny())) == ["proj"]


def _tiny_llama():
    transformers = require("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_calibrate_tiny_llama_with_attention_mask():
    model = _tiny_llama()
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    batches = [{"input_ids": torch.randint(0, 100, (3, 10), generator=gen), "attention_mask": mask}
               for _ in range(2)]
    ns = NullSpace.calibrate(model, batches, side="input", threshold=1e-3)
    names = ns.modules
    assert "lm_head" not in names and len(names) == 2 * 7  # q,k,v,o,gate,up,down per layer
    rep = ns.report()
    assert rep["model.layers.0.self_attn.q_proj"]["samples"] == 2 * int(mask.sum())
    assert rep["model.layers.1.mlp.down_proj"]["total_dim"] == 64
    ns.check_compatible(model)
    out = NullSpace.calibrate(model, batches, side="output", target_modules=["mlp.up_proj"])
    assert out.modules == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert out.report()["model.layers.0.mlp.up_proj"]["total_dim"] == 64
    # without the mask every position counts (padding included)
    nomask = NullSpace.calibrate(model, [{"input_ids": b["input_ids"]} for b in batches],
                                 target_modules=["layers.0.self_attn.q_proj"])
    assert nomask.report()["model.layers.0.self_attn.q_proj"]["samples"] == 2 * 30


# ------------------------------------------------------------------------------------------------
# projection functions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protect", ["input", "output", "weight"])
def test_fold_and_project_update_leakage(protect):
    gen = torch.Generator().manual_seed(4)
    m, n, r, k = 48, 40, 8, 12
    side = acts_on(protect)
    d = n if side == "right" else m
    q = _orthonormal(d, k, gen)
    basis = _orthonormal(d, r, gen)
    folded = fold_into_basis(basis, q, side, protect)
    assert folded is not None and folded.dtype == torch.float32 and folded.shape == basis.shape
    assert torch.allclose(folded.double(), (torch.eye(d, dtype=torch.float64) - q.double() @ q.double().T)
                          @ basis.double(), atol=1e-6)
    coords = torch.randn(*reference.coord_shape((m, n), side, r), generator=gen)
    delta = reference.project_back(coords, folded, side)
    assert leakage(delta, q, protect) <= 1e-6
    # the fold gives the same update as projecting the unfolded one
    assert torch.allclose(delta, project_update(reference.project_back(coords, basis, side), q, protect), atol=1e-5)
    # the other basis side cannot be folded: project the update instead
    other = "left" if side == "right" else "right"
    assert fold_into_basis(_orthonormal(n if other == "right" else m, r, gen), q, other, protect) is None
    raw = torch.randn(m, n, generator=gen)
    assert leakage(raw, q, protect) > 0.1
    proj = project_update(raw, q, protect)
    assert proj.dtype == torch.float32 and leakage(proj, q, protect) <= 1e-6


def test_no_protection_is_identity():
    basis = torch.randn(10, 3)
    delta = torch.randn(4, 10)
    empty = torch.zeros(10, 0)
    assert fold_into_basis(basis, None, "right", "input") is basis
    assert fold_into_basis(basis, empty, "right", "input") is basis
    assert project_update(delta, empty, "input") is delta
    assert leakage(delta, None, "input") == 0.0
    assert leakage(torch.zeros(4, 10), torch.eye(10)[:, :2], "input") == 0.0
    with pytest.raises(ValueError):
        project_update(delta, empty, "left")


def test_projected_gradient_does_not_keep_adam_update_in_null_space():
    """The authors' scheme (project the raw gradient) leaks once Adam rescales coordinates elementwise."""
    gen = torch.Generator().manual_seed(5)
    m, n, k = 32, 24, 6
    q = _orthonormal(n, k, gen)  # input side: rows of ΔW must be ⊥ Q
    grad = torch.randn(m, n, generator=gen)
    g_proj = project_gradient(grad, q, "input")
    assert leakage(g_proj, q, "input") <= 1e-6  # the gradient itself is in the null space...
    adam_like = g_proj / (g_proj.abs() + 1e-8)  # Adam's first step: elementwise m / (sqrt(v) + eps)
    assert leakage(adam_like, q, "input") > 1e-2  # ...the Adam-normalised update is not (≫ 1e-5)
    # GaLore-style: left basis from the projected gradient, Adam on the r×n coordinates (reference math)
    basis = reference.top_singular_basis(g_proj, 4, "left")
    coords = reference.project(g_proj, basis, "left")
    exp_avg, exp_avg_sq = torch.zeros_like(coords), torch.zeros_like(coords)
    delta = reference.adam_delta(coords, exp_avg, exp_avg_sq, 1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    update = reference.project_back(delta, basis, "left")
    assert leakage(update, q, "input") > 1e-2
    # gems' default: project the update
    assert leakage(project_update(update, q, "input"), q, "input") <= 1e-6


# ------------------------------------------------------------------------------------------------
# persistence and compatibility
# ------------------------------------------------------------------------------------------------


def test_save_load_roundtrip_bitwise(tmp_path):
    batches, _ = _low_rank_inputs()
    ns = NullSpace.calibrate(_mlp(), batches, threshold=1e-3, mode="absolute")
    path = tmp_path / "sub" / "ns.safetensors"
    ns.save(path)
    ns.save(path)  # overwrite atomically
    assert sorted(os.listdir(path.parent)) == ["ns.safetensors"]  # no temp files left
    back = NullSpace.load(path)
    assert back.modules == ns.modules and back.side == ns.side
    assert back.mode == "absolute" and back.threshold == 1e-3
    assert back.report() == ns.report()
    assert ns.modules == ["0", "2"]
    for name in ns.modules:
        a, b = ns.basis(name), back.basis(name)
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
        assert torch.equal(ns.spectrum(name), back.spectrum(name))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "gems.nullspace" and meta["format_version"] == "1"
    mods = json.loads(meta["modules"])
    assert mods["0"]["protected_dim"] == ns.report()["0"]["protected_dim"]
    assert mods["0"]["weight_shape"] == [12, 16] and mods["0"]["eigenvalues"] == 16
    back.check_compatible(_mlp())


def test_save_load_empty_bases_roundtrip(tmp_path):
    ns = NullSpace.calibrate(_mlp(), [torch.randn(8, 16)], threshold=1e9)
    ns.save(tmp_path / "e.safetensors")
    back = NullSpace.load(tmp_path / "e.safetensors")
    assert back.basis("0") is None and back.report()["0"]["status"] == "empty"


def test_load_errors(tmp_path):
    with pytest.raises(MissingResourceError, match="not found"):
        NullSpace.load(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        NullSpace.load(tmp_path / "missing.safetensors")
    ns = NullSpace({"0": _orthonormal(16, 2, torch.Generator().manual_seed(0))})
    good = tmp_path / "good.safetensors"
    ns.save(good)
    raw = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    for bad in ("trunc.safetensors", "junk.safetensors"):
        with pytest.raises(NullSpaceFormatError, match="corrupted") as err:
            NullSpace.load(tmp_path / bad)
        assert "\n" not in str(err.value)
    from safetensors.torch import save_file

    from gems.nullspace_io import metadata

    meta = metadata(ns)
    save_file({"0": ns.basis("0")}, str(tmp_path / "v99.safetensors"), metadata={**meta, "format_version": "99"})
    with pytest.raises(NullSpaceFormatError, match="format version '99'"):
        NullSpace.load(tmp_path / "v99.safetensors")
    save_file({"0": ns.basis("0")}, str(tmp_path / "other.safetensors"))
    with pytest.raises(NullSpaceFormatError, match="not a gems null-space file"):
        NullSpace.load(tmp_path / "other.safetensors")


def test_check_compatible_errors():
    batches, _ = _low_rank_inputs()
    ns = NullSpace.calibrate(_mlp(), batches)
    ns.check_compatible(_mlp(seed=1))
    other_shape = nn.Sequential(nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 8))
    with pytest.raises(IncompatibleNullSpaceError, match=r"'0'.*\(10, 16\).*\(12, 16\)"):
        ns.check_compatible(other_shape)
    missing = nn.Sequential(nn.Linear(16, 12))
    with pytest.raises(IncompatibleNullSpaceError, match="'2' is missing"):
        ns.check_compatible(missing)
    not_linear = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.ReLU())
    with pytest.raises(IncompatibleNullSpaceError, match="'2' is a ReLU"):
        ns.check_compatible(not_linear)


def test_constructor_accessors_and_to():
    gen = torch.Generator().manual_seed(6)
    ns = NullSpace({"a": _orthonormal(8, 3, gen).double()}, side="output")
    assert ns.basis("a").dtype == torch.float32
    assert "a" in ns and "b" not in ns and len(ns) == 1
    with pytest.raises(KeyError, match="'b'"):
        ns.basis("b")
    assert ns.to("cpu") is ns
    assert "partial=1" in repr(ns)
    with pytest.raises(ValueError):
        NullSpace({"a": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match="orthonormal"):
        NullSpace({"a": 2 * torch.eye(4)[:, :2]})
    with pytest.raises(ValueError):
        NullSpace({"a": torch.zeros(3, 1)}, side="left")
