"""torch.distributed.checkpoint (DCP): GEMS' state dict in torch's layout is saved and loaded by
get_optimizer_state_dict / set_optimizer_state_dict and dcp.save / dcp.load, keyed by parameter names, and a
resumed run continues bit-exactly: in one process, and on two gloo ranks with a DDP-wrapped model."""
import copy
import os
import sys
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from helpers import make_model, make_opt, task_batches

pytestmark = pytest.mark.usefixtures("one_thread")
KW = {"update_proj_gap": 4, "inner_kw": {"lr": 1e-2, "weight_decay": 0.05}}


def _run(model, opt, sched, batches, sl=slice(None), n=16):
    for batch in batches:
        opt.backward({t: nn.functional.mse_loss(model(x[sl]), y[sl]) for t, (x, y) in batch.items()},
                     num_samples={t: n for t in batch})
        opt.step()
        sched.step()
        opt.zero_grad()


def _fresh(seed=999):
    model = make_model(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_opt(model, **KW)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def _save(model, opt, sched, path):
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    torch.save(sched.state_dict(), os.path.join(path, "sched.pt"))


def _load(model, opt, sched, path):
    # DCP fills a template: a fresh optimizer's, which DCP initialises with a zero step (gems.checkpoint)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    sched.load_state_dict(torch.load(os.path.join(path, "sched.pt"), weights_only=True))


def test_dcp_state_is_keyed_by_parameter_names():
    model, opt, sched = _fresh(50)
    _run(model, opt, sched, task_batches(5, seed=50))
    osd = get_optimizer_state_dict(model, opt)
    names = {n for n, _ in model.named_parameters()}
    assert set(osd["state"]) == names and [p for g in osd["param_groups"] for p in g["params"]] == [
        n for n, _ in model.named_parameters()]
    mid = osd["state"]["mid.weight"]
    assert int(mid["gems"]["step"]) == 5 and all(mid["gems"]["has_basis"].values())
    assert set(mid["coords"]) == {"shared", "a", "b"} and "exp_avg" in mid["coords"]["a"]
    assert "exp_avg" in osd["state"]["gain"]  # a non-targeted parameter: the inner optimizer's own state


def test_dcp_template_of_a_fresh_optimizer_moves_nothing():
    """DCP's initialisation (zero .grad, lr 0, step) gives every entry its shape and changes no weight,
    basis or GEMS step; training afterwards equals training without it."""
    model, opt, sched = _fresh(51)
    before = [p.detach().clone() for p in model.parameters()]
    osd = get_optimizer_state_dict(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(w.step == 0 and all(b is None for b in w.bases.values()) for w in opt.subspaces)
    mid = osd["state"]["mid.weight"]
    assert not any(mid["gems"]["has_basis"].values()) and set(mid["coords"]) == {"shared", "a", "b"}
    assert all(p.grad is None for p in model.parameters())
    ref_model, ref_opt, ref_sched = _fresh(51)
    batches = task_batches(3, seed=51)
    _run(model, opt, sched, batches)
    _run(ref_model, ref_opt, ref_sched, batches)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)  # the step counters DCP's zero step created were put back to 0


def test_dcp_save_load_continue_is_bit_exact(tmp_path):
    batches = task_batches(14, seed=52)
    model, opt, sched = _fresh(52)
    _run(model, opt, sched, batches[:6])  # a refresh at steps 0 and 4; the next at 8, after the load
    _save(model, opt, sched, str(tmp_path))
    _run(model, opt, sched, batches[6:])
    again, again_opt, again_sched = _fresh(998)
    _load(again, again_opt, again_sched, str(tmp_path))
    _run(again, again_opt, again_sched, batches[6:])
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n
    for w, v in zip(opt.subspaces, again_opt.subspaces):
        assert w.step == v.step == 14 and all(torch.equal(w.bases[s], v.bases[s]) for s in w.bases)


def test_flattened_dcp_state_dict_round_trips():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    batches = task_batches(8, seed=53)
    model, opt, sched = _fresh(53)
    _run(model, opt, sched, batches[:5])
    osd = get_optimizer_state_dict(model, opt, options=flat)
    assert "state.mid.weight.gems.bases.shared" in osd
    again, again_opt, again_sched = _fresh(997)
    again.load_state_dict(model.state_dict())
    get_optimizer_state_dict(again, again_opt)  # DCP's initialisation, as before a dcp.load
    # a copy: DCP hands out the live state tensors and torch's load_state_dict keeps them (no copy)
    set_optimizer_state_dict(again, again_opt, copy.deepcopy(osd), options=flat)
    again_sched.load_state_dict(sched.state_dict())
    _run(model, opt, sched, batches[5:])
    _run(again, again_opt, again_sched, batches[5:])
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n


def _ddp_worker(rank, world, init_file, ckpt, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    half = 16 // world
    sl = slice(rank * half, (rank + 1) * half)
    batches = task_batches(12, seed=54)
    results = []
    for phase in ("through", "resumed"):
        model, opt, sched = _fresh(54 if phase == "through" else 996)
        ddp = nn.parallel.DistributedDataParallel(model)  # names carry "module.": DCP strips it
        if phase == "through":
            _run(model, opt, sched, batches[:5], sl, half)
            _save(ddp, opt, sched, ckpt)
        else:
            _load(ddp, opt, sched, ckpt)
        _run(model, opt, sched, batches[5:], sl, half)
        results.append([p.detach().clone() for p in model.parameters()])
        results.append([w.bases[s] for w in opt.subspaces for s in sorted(w.bases)])
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # without gloo teardown: see tests/test_ddp.py


def test_dcp_resume_under_two_rank_ddp_is_bit_exact():
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        os.makedirs(ckpt)
        for attempt in range(2):
            try:
                mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, f"init{attempt}"), ckpt, tmp), nprocs=2, join=True)
                break
            except mp.ProcessExitedException as exc:  # a crash inside the gloo runtime: retried once
                if attempt or exc.signal_name is None:
                    raise
                warnings.warn(f"DDP run retried after a runtime crash: {exc}")
        r = [torch.load(os.path.join(tmp, f"rank{i}.pt"), weights_only=True) for i in range(2)]
    for rank in r:
        through, through_bases, resumed, resumed_bases = rank
        assert all(torch.equal(a, b) for a, b in zip(through, resumed))
        assert len(through_bases) == 9 and all(torch.equal(a, b) for a, b in zip(through_bases, resumed_bases))
    assert all(torch.equal(a, b) for a, b in zip(r[0][0], r[1][0]))  # and the ranks agree
