"""GemsTrainer under DDP as ``accelerate launch`` / ``torchrun`` run it (2 CPU processes, gloo): trains like one
process on the same global batches (clipping included) and resumes from a checkpoint bit-exactly."""
import os
import socket
import sys
import tempfile
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from conftest import require

require("transformers")
require("accelerate")

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, SAVE, CLIP = 7, 4, 0.3
GEMS = dict(rank=4, task_rank=2, update_proj_gap=3, stash="full")  # full stash: norms, hence gates, are exact


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(out, world, model=None, save=None):
    import test_gems_trainer as T
    kw = dict(ddp_backend="gloo") if world > 1 else {}
    return T.make_trainer(out, steps=STEPS, bs=8 // world, save_steps=save, max_grad_norm=CLIP, model=model,
                          gems_kwargs=GEMS, base_gems_kwargs={}, args_kw=kw)


def _worker(rank, world, port, out):
    # what torchrun / accelerate launch set for each process; accelerate's state initialises gloo from them
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    sys.path.insert(0, HERE)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import test_gems_trainer as T
    full = _trainer(os.path.join(out, "full"), world, save=SAVE)
    full.train()
    assert isinstance(full.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    norms = [h["grad_norm"] for h in full.state.log_history if "grad_norm" in h]
    resumed = _trainer(os.path.join(out, "full"), world, model=T.tiny_model(123), save=SAVE)
    resumed.train(resume_from_checkpoint=os.path.join(out, "full", f"checkpoint-{SAVE}"))
    torch.save({"full": T.weights(full.model), "resumed": T.weights(resumed.model), "norms": norms},
               os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo teardown is torch's business, not this test's (see test_ddp.py)


def test_two_process_trainer_matches_one_process_and_resumes(tmp_path):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    import test_gems_trainer as T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = _trainer(tmp_path / "one", 1)
        one.train()
    ref, init = T.weights(one.model), T.weights(T.tiny_model(0))
    one_norms = [h["grad_norm"] for h in one.state.log_history if "grad_norm" in h]
    for k in ref:
        assert torch.equal(r0["full"][k], r1["full"][k]), k            # the ranks agree exactly
        assert torch.equal(r0["full"][k], r0["resumed"][k]), k         # resume is bit-exact
        assert not torch.equal(ref[k], init[k]), k
        torch.testing.assert_close(r0["full"][k], ref[k], rtol=1e-4, atol=2e-6)  # = one process
    # the logged norm is the global gradient's (a rank's own norm differs), and it was clipped: CLIP < norm
    assert one_norms and len(r0["norms"]) == len(one_norms)
    assert r0["norms"] == pytest.approx(one_norms, rel=1e-4)
    assert max(one_norms) > CLIP
