"""Every execution path against one ground truth: gems.reference.gems_step in fp64.

Three tasks with unequal sample counts, scale ≠ 1, m < n and m > n, refreshes at steps 0, 3 and 6, every
gating mode, both task-basis modes, every state transfer, the null space on either side and in both modes.
The paths share the optimizer's data but not its code: the reference computes its own gradients at its own
fp64 weights (tests/reference_driver.py). Paths agree with it to ~3e-7 after 7 steps; the options differ
from each other by ~1e-3 and more, which is what makes a wrong sign, side, scale, gate or weight fail."""
import os
import sys
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gems
from gems import reference
from reference_driver import (TASKS, WEIGHTS, assert_matches, losses_of, make_data, make_model, nullspace_bases,
                              run_gems, run_reference)

FIXED = {"a": 0.5, "b": 0.2, "c": 0.3}
# (GemsOptimizer options, reference options); the null space is built per case
CASES = {
    "heuristic": ({}, {}),
    "uniform": ({"gating": "uniform"}, {"gating": "uniform"}),
    "fixed": ({"gating": FIXED}, {"gating": FIXED}),
    "independent": ({"task_basis": "independent"}, {"task_basis": "independent"}),
    "rotate": ({"state_transfer": "rotate"}, {"state_transfer": "rotate"}),
    "reset": ({"state_transfer": "reset"}, {"state_transfer": "reset"}),
    "ns-input": ({"ns": "input"}, {"ns": "input"}),
    "ns-output": ({"ns": "output"}, {"ns": "output"}),
    "ns-gradient-mode": ({"ns": "input", "nullspace_mode": "gradient"}, {"ns": "input", "nullspace_mode": "gradient"}),
    "ns-full-decay": ({"ns": "output", "nullspace_weight_decay": "full"},
                      {"ns": "output", "nullspace_weight_decay": "full"}),
}


def _split(opts):
    opts = dict(opts)
    side = opts.pop("ns", None)
    return side, opts


def _gems_kw(opts):
    side, kw = _split(opts)
    if side is not None:
        kw["nullspace"] = gems.NullSpace(nullspace_bases(side), side=side)
    return kw


def _ref_kw(opts):
    side, kw = _split(opts)
    if side is not None:
        kw.update(nullspace=nullspace_bases(side), nullspace_side=side)
    return kw


def _check(case, data=None, **path):
    g, r = CASES[case]
    data = data or make_data()
    got, opt = run_gems(data, **path, **_gems_kw(g))
    want, _ = run_reference(data, **_ref_kw(r))
    assert_matches(got, want)
    return got, want, opt


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_matches_reference(case):
    _check(case, backend="torch")


@pytest.mark.parametrize("case", ["heuristic", "rotate", "ns-input", "ns-output", "independent"])
def test_projected_stash_matches_reference(case):
    _check(case, backend="torch", stash="projected")


@pytest.mark.parametrize("case", ["heuristic", "rotate", "ns-input", "ns-output"])
def test_triton_backend_matches_reference(case):
    from conftest import require
    require("triton")
    import gems_kernels
    ok, why = gems_kernels.available()
    assert ok, why
    _check(case, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["heuristic", "ns-input", "ns-output"])
def test_cuda_backend_matches_reference(case):
    _check(case, backend="cuda")


ACCUMULATION = ({"a": 4, "b": 12, "c": 6}, {"a": 12, "b": 4, "c": 2})


@pytest.mark.parametrize("stash, case", [("full", "heuristic"), ("full", "ns-input"), ("full", "rotate")])
def test_gradient_accumulation_matches_reference(stash, case):
    """Two opt.backward calls per step with counts (4, 12, 6) then (12, 4, 2): each task's gradient is its
    sample-weighted mean over the calls, the shared one the mixed-batch gradient of all 40 samples."""
    _check(case, data=make_data(counts=ACCUMULATION), backend="torch", stash=stash)


def test_accumulated_shared_gradient_is_the_mixed_batch_gradient():
    """The issue's case: counts (4, 12) then (12, 4). The stash's Σ_t (N_t/N)·G_t equals the gradient of the
    mean loss over the concatenated 32 samples (it was off by 43 % when calls were summed)."""
    data = make_data(steps=1, counts=({"a": 4, "b": 12, "c": 0}, {"a": 12, "b": 4, "c": 0}))[0]
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(inner, model=model, tasks=["a", "b"], rank=3, task_rank=2)
    for call in data:
        call = {t: call[t] for t in ("a", "b")}
        opt.backward(losses_of(model, call), num_samples={t: x.shape[0] for t, (x, _) in call.items()})
    xs = torch.cat([call[t][0] for call in data for t in ("a", "b")])
    ys = torch.cat([call[t][1] for call in data for t in ("a", "b")])
    want = torch.autograd.grad(torch.nn.functional.mse_loss(model(xs), ys), list(model.parameters()))
    stash = opt._task_grads
    stash.finalise()
    for p, g in zip(model.parameters(), want):
        shared = sum(w * stash.grads[t][id(p)] for t, w in zip(("a", "b"), stash.shared_weights()))
        torch.testing.assert_close(shared, g, rtol=1e-5, atol=1e-7)
    assert stash.mean_losses() == pytest.approx(
        [float(torch.nn.functional.mse_loss(model(torch.cat([c[t][0] for c in data])),
                                            torch.cat([c[t][1] for c in data])).detach()) for t in ("a", "b")], rel=1e-5)


def test_projected_stash_accumulates_the_sample_weighted_mean():
    """stash="projected" refreshes from a step's first micro-batch (documented), so it cannot follow the
    reference through accumulated refresh steps; between refreshes its coordinates must be those of each
    task's sample-weighted mean gradient: [B_sh, B_t]ᵀ·Σ_c N_t^c g_t^c / N_t."""
    data = make_data(steps=2, counts=ACCUMULATION)
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(inner, model=model, tasks=TASKS, rank=3, task_rank=2, update_proj_gap=10,
                                 stash="projected")
    for call in data[0]:
        opt.backward(losses_of(model, call), num_samples={t: x.shape[0] for t, (x, _) in call.items()})
    opt.step()
    opt.zero_grad()
    want = {t: [torch.zeros_like(w.param) for w in opt.subspaces] for t in TASKS}
    for call in data[1]:
        opt.backward(losses_of(model, call), num_samples={t: x.shape[0] for t, (x, _) in call.items()})
        for t, loss in losses_of(model, call).items():
            for acc, g in zip(want[t], torch.autograd.grad(loss, [w.param for w in opt.subspaces])):
                acc += call[t][0].shape[0] / sum(c[t][0].shape[0] for c in data[1]) * g
    stash = opt._task_grads
    stash.finalise()
    for t in TASKS:
        for w, g in zip(opt.subspaces, want[t]):
            basis = torch.cat([w.work_bases["shared"], w.work_bases[t]], dim=1)
            torch.testing.assert_close(stash.coords[t][id(w.param)], reference.project(g, basis, w.side),
                                       rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ DDP
SHARDS = {"a": 1, "b": 5, "c": 9}  # rank 0's samples of each task per step (of 3, 7, 12): unequal on purpose


def _worker(rank, world, init_file, out_dir, stash):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = [[{t: (x[:SHARDS[t]], y[:SHARDS[t]]) if rank == 0 else (x[SHARDS[t]:], y[SHARDS[t]:])
              for t, (x, y) in call.items()} for call in calls] for calls in make_data()]
    got, _ = run_gems(data, backend="torch", stash=stash, **_gems_kw(CASES["ns-input"][0]))
    torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip gloo teardown, which can abort on the 2-core CI machine (see test_ddp.py)


@pytest.mark.parametrize("stash", ["full"])
def test_ddp_with_unequal_shards_matches_reference(stash):
    """Two gloo ranks holding unequal shares of every task: the sample-weighted mean over ranks is the
    gradient of the concatenated batch, so both ranks must land on the single-process reference."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, stash), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    want, _ = run_reference(make_data(), **_ref_kw(CASES["ns-input"][1]))
    assert_matches(ranks[0], want)


# ------------------------------------------------------------------------------------------------ properties
def test_reference_guards_hold():
    """The reference itself: residual task bases orthogonal to the shared one, protected updates in the null
    space, every basis orthonormal — so the ground truth is not wrong in a way all paths share."""
    data = make_data()
    q = nullspace_bases("input")
    before = {k: v.double() for k, v in make_model().named_parameters()}
    want, states = run_reference(data, nullspace=q, nullspace_side="input", nullspace_weight_decay="project")
    for m, key in WEIGHTS.items():
        bases = states[m]["bases"]
        for t in TASKS:
            assert float((bases["shared"].T @ bases[t]).abs().max()) < 1e-10
        for b in bases.values():
            assert float((b.T @ b - torch.eye(b.shape[1], dtype=b.dtype)).abs().max()) < 1e-10
        delta = want[key] - before[key]
        assert float((delta @ q[m].double()).norm() / delta.norm()) < 1e-6  # Q is fp32: orthonormal to ~1e-7
