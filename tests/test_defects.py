"""Defects found by using the optimizer as a demanding user would; each test failed before its fix."""
import copy
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gems
from gems import reference
from gems.errors import BackendUnavailableError
from helpers import make_model, make_opt, saved_weight, task_batches, task_losses


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


# ------------------------------------------------------------------------------------------------ accumulation
def test_absent_task_does_not_dilute_its_mean_loss():
    """A task absent from one of two calls (count 0): its mean loss is over the calls that had it."""
    model = make_model()
    opt = make_opt(model, gating="heuristic")
    b1, b2 = task_batches(2, seed=3)
    l1 = task_losses(model, b1)
    opt.backward(l1, num_samples={"a": 8, "b": 8})
    l2 = task_losses(model, b2)
    opt.backward(l2, num_samples={"a": 8, "b": 0})
    got = opt._task_grads.mean_losses()
    assert got[0] == pytest.approx((float(l1["a"]) + float(l2["a"])) / 2)
    assert got[1] == pytest.approx(float(l1["b"]))  # was (l1 + l2) / 2 with l2's b counted


# ------------------------------------------------------------------------------------------------ DDP
def _frozen_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = make_model(0)
    model.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    model.unused = nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=1.0)
    opt = _quiet(gems.GemsOptimizer, inner, model=model, tasks=["a", "b"], rank=4, task_rank=2)
    for batch in task_batches(2, seed=rank):
        opt.backward(task_losses(model, batch), num_samples={"a": 8, "b": 8})
        opt.step()
        opt.zero_grad()
    torch.save({"frozen": model.frozen.detach(), "unused": model.unused.detach()}, os.path.join(out, f"{rank}.pt"))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def test_ddp_leaves_frozen_and_unused_parameters_alone():
    """Weight decay moved frozen and unused parameters 1.0 → 0.9025 on two ranks (a zero gradient was written
    for every parameter), though one process leaves them unchanged."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_frozen_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        for r in range(2):
            got = torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True)
            assert torch.equal(got["frozen"], torch.ones(3)) and torch.equal(got["unused"], torch.ones(3))


# ------------------------------------------------------------------------------------------------ null space
def test_protected_module_that_is_not_targeted_is_refused():
    model = make_model()
    q = torch.linalg.qr(torch.randn(12, 3)).Q
    ns = gems.NullSpace({"inp": q}, side="input")
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="does not target.*inp"):
        _quiet(gems.GemsOptimizer, inner, model=model, tasks=["a", "b"], nullspace=ns, target_modules=["mid", "out"])
    # targeted, or frozen: accepted
    _quiet(gems.GemsOptimizer, inner, model=model, tasks=["a", "b"], nullspace=ns)
    model2 = make_model()
    model2.inp.weight.requires_grad_(False)
    _quiet(gems.GemsOptimizer, torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2),
           model=model2, tasks=["a", "b"], nullspace=ns, target_modules=["mid", "out"])


# ------------------------------------------------------------------------------------------------ gates
def test_heuristic_gates_by_hand_and_never_negative():
    # 0.4·[.25, .75] (loss) + 0.4·[.5, .5] (norm) + 0.2·[.8, .2] (samples): every share differs, so any
    # other weighting of the three terms changes the result
    assert reference.heuristic_gates([1.0, 3.0], [2.0, 2.0], [4.0, 1.0]) == pytest.approx([0.46, 0.54])
    # norms, not squared norms: shares [1/3, 2/3], not [1/5, 4/5]
    assert reference.heuristic_gates([1.0, 1.0], [1.0, 2.0], [1.0, 1.0]) == pytest.approx(
        [0.4 * 0.5 + 0.4 / 3 + 0.1, 0.4 * 0.5 + 0.8 / 3 + 0.1])
    g = reference.heuristic_gates([-1.5, 2.0], [1.0, 1.0], [1.0, 1.0])  # was [-0.9, 1.9]
    assert all(x >= 0 for x in g) and sum(g) == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        losses = (torch.randn(3, generator=gen) * 2).tolist()
        g = reference.heuristic_gates(losses, torch.rand(3, generator=gen).tolist(), [1.0, 2.0, 3.0])
        assert min(g) >= 0 and sum(g) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ clipping
def test_clip_grad_norm_clips_a_finite_gradient_whose_fp32_norm_overflows():
    model = make_model()
    opt = make_opt(model)
    before = [p.detach().clone() for p in model.parameters()]
    ls = task_losses(model, task_batches(1)[0])
    opt.backward({t: l * 1e20 for t, l in ls.items()}, num_samples={"a": 8, "b": 8})
    norm = opt.clip_grad_norm_(1.0)
    assert math.isfinite(float(norm)) and float(norm) > 1e19
    opt.step()
    for p, q in zip(model.parameters(), before):
        assert float((p - q).abs().max()) < 1.0  # Adam-sized steps, not 1e17


# ------------------------------------------------------------------------------------------------ constructor
def test_failed_constructor_leaves_the_inner_optimizer_untouched():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    groups = [list(g["params"]) for g in inner.param_groups]
    bad = [("nope", ValueError)] + ([] if torch.cuda.is_available() else [("cuda", BackendUnavailableError)])
    for backend, error in bad:
        with pytest.raises(error):
            _quiet(gems.GemsOptimizer, inner, model=model, tasks=["a", "b"], backend=backend)
        assert [list(g["params"]) for g in inner.param_groups] == groups
    opt = _quiet(gems.GemsOptimizer, inner, model=model, tasks=["a", "b"], rank=4, backend="torch")  # retry works
    assert len(opt.subspaces) == 3


def test_complex_and_meta_parameters_are_refused_at_construction():
    lin = nn.Linear(4, 4)
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        gems.GemsOptimizer(torch.optim.AdamW([lin.weight, z]), tasks=["a", "b"], rank=2)
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta"):
        gems.GemsOptimizer(torch.optim.AdamW(meta.parameters()), model=meta, tasks=["a", "b"], rank=2)


def test_backend_default_follows_gems_backend_then_auto(monkeypatch):
    model = make_model()
    monkeypatch.delenv("GEMS_BACKEND", raising=False)
    assert make_opt(model).backend == "torch"  # auto on CPU
    monkeypatch.setenv("GEMS_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        make_opt(make_model())
    import gems_kernels
    if gems_kernels.available()[0]:
        monkeypatch.setenv("GEMS_BACKEND", "triton")
        assert make_opt(make_model()).backend == "triton"
    monkeypatch.setenv("GEMS_BACKEND", "triton")
    assert make_opt(make_model(), backend="torch").backend == "torch"  # an explicit argument wins


# ------------------------------------------------------------------------------------------------ refresh
@pytest.mark.parametrize("method", ["svd", "subspace_iter", "randomized"])
def test_all_zero_gradients_at_a_refresh_give_orthonormal_disjoint_bases(method):
    from gems.subspaces import RefreshJob, WeightSubspaces, refresh_bases
    for shape in [(12, 20), (20, 12), (16, 16)]:
        w = WeightSubspaces.create(0, "w", nn.Parameter(torch.randn(*shape)), tasks=["a", "b"], rank=4,
                                   task_rank=3, proj_type="std", task_basis="residual")
        z = torch.zeros(shape)
        new = refresh_bases([RefreshJob(w, z, {"a": z, "b": z}, torch.Generator().manual_seed(0))],
                            task_basis="residual", method=method)[0]
        for t in ("a", "b"):
            both = torch.cat([new["shared"], new[t]], dim=1)
            assert float((both.T @ both - torch.eye(7)).abs().max()) < 1e-5  # was 0.69


def test_svd_bases_have_canonical_signs_unless_solver_signs_are_asked():
    from gems.subspaces import RefreshJob, WeightSubspaces, refresh_bases
    g = torch.randn(10, 24, generator=torch.Generator().manual_seed(1))
    out = {}
    for signs in ("canonical", "solver"):
        for sgn in (1, -1):
            w = WeightSubspaces.create(0, "w", nn.Parameter(torch.zeros(10, 24)), tasks=["a"], rank=3, task_rank=0,
                                       proj_type="std", task_basis="residual")
            out[signs, sgn] = refresh_bases([RefreshJob(w, sgn * g, {"a": sgn * g}, torch.Generator())],
                                            task_basis="residual", method="svd", basis_signs=signs)[0]["shared"]
    b = out["canonical", 1]
    top = b.gather(0, b.abs().argmax(0, keepdim=True))
    assert bool((top > 0).all())
    assert torch.equal(out["canonical", 1], out["canonical", -1])  # the gradient's sign cannot flip the basis
    u = torch.linalg.svd(g, full_matrices=False)[0][:, :3]
    assert torch.equal(out["solver", 1], u.contiguous())  # galore-torch's bases, bit for bit


# ------------------------------------------------------------------------------------------------ state dict
def _trained():
    model = make_model()
    opt = make_opt(model, update_proj_gap=2)
    for batch in task_batches(3):
        opt.backward(task_losses(model, batch))
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("damage", ["nan", "shape", "not-orthonormal", "missing-key", "no-state", "no-param_groups",
                                    "group-size", "no-gems-entry", "v1-no-weights", "v1-no-inner"])
def test_bad_state_dict_raises_and_loads_nothing(damage):
    _, opt = _trained()
    sd = opt.state_dict() if not damage.startswith("v1") else _v1_state_dict()
    model2, fresh = _trained()
    before = copy.deepcopy(fresh.state_dict())
    names = [w.name for w in opt.subspaces]
    w0 = saved_weight(opt, sd, names[0])["gems"] if not damage.startswith("v1") else None
    if damage == "nan":
        w0["bases"]["shared"][0, 0] = float("nan")
    elif damage == "shape":
        w0["bases"]["shared"] = w0["bases"]["shared"][:, :-1]
    elif damage == "not-orthonormal":
        w0["bases"]["shared"] = w0["bases"]["shared"] * 2
    elif damage == "missing-key":
        del saved_weight(opt, sd, names[-1])["gems"]["step"]  # the last weight: nothing may be loaded before it
    elif damage == "group-size":
        sd["param_groups"][0]["params"].pop()
    elif damage == "no-gems-entry":
        del saved_weight(opt, sd, names[-1])["gems"]
    else:
        del sd[damage.split("no-")[1]]
    with pytest.raises(ValueError):
        fresh.load_state_dict(sd)
    _assert_same(fresh.state_dict(), before)


def _assert_same(a, b, path="state dict"):
    """Equal tensors (bitwise) and plain values, recursively."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def _v1_state_dict():
    """The format-1 checkpoint committed in tests/data (written by gems before torch's layout)."""
    return torch.load(Path(__file__).parent / "data" / "gems_state_v1.pt", weights_only=True)["opt"]


# ------------------------------------------------------------------------------------------------ .grad and re-steps
def test_a_grad_from_loss_backward_is_refused_next_to_opt_backward():
    model = make_model()
    opt = make_opt(model)
    batch = task_batches(1)[0]
    task_losses(model, batch)["a"].backward()  # a plain backward ...
    opt.backward(task_losses(model, batch))  # ... and GEMS' own
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="loss.backward"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_second_step_without_backward_steps_nothing():
    """Once consumed, opt.backward's gradients are gone for every parameter (before: the non-targeted ones
    were stepped again on their stale .grad, the targeted ones not)."""
    model = make_model()
    opt = make_opt(model)
    opt.backward(task_losses(model, task_batches(1)[0]))
    opt.step()
    after_one = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_one))


def test_fsdp2_sharded_parameters_are_refused_clearly(tmp_path):
    """fully_shard turns parameters into DTensors holding one rank's rows: bases and projections computed on
    them would be the shard's, so GEMS refuses them at construction instead of training on them."""
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = make_model(60)
        fully_shard(model.mid)  # one sharded Linear is enough (fully_shard refuses the 0-d gain)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        groups = [list(g["params"]) for g in inner.param_groups]
        with pytest.raises(NotImplementedError, match="DTensor.*FSDP2"):
            gems.GemsOptimizer(inner, model=model, tasks=["a", "b"], rank=4, task_rank=2)
        assert [list(g["params"]) for g in inner.param_groups] == groups  # the inner optimizer untouched
    finally:
        dist.destroy_process_group()
