"""Smoke test of the comparison benches (benches/bench_memory.py, benches/bench_e2e_step.py) on a tiny random
Llama: every method builds, steps, and the tables come out. The SmolLM2 runs are benchmarks, not tests."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import in_ci, require

BENCHES = Path(__file__).resolve().parents[1] / "benches"

for _mod in ("transformers", "galore_torch", "peft"):
    require(_mod)


@pytest.fixture(scope="module")
def benches():
    sys.path.insert(0, str(BENCHES))
    threads = torch.get_num_threads()
    # one thread: tiny matrices gain nothing from more, and on a loaded machine OpenMP barriers inside
    # LAPACK's SVD can cost ~1 s per call
    torch.set_num_threads(1)
    try:
        import bench_e2e_step
        import bench_memory

        yield bench_memory, bench_e2e_step
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCHES))


def _methods(all_methods):
    """Every method; apollo only where apollo-torch is installed (always in CI, where its absence fails)."""
    if importlib.util.find_spec("apollo_torch") is None:
        if in_ci():
            pytest.fail("apollo_torch is missing in CI (requirements/ci.txt installs it)", pytrace=False)
        return [m for m in all_methods if m != "apollo"]
    assert "apollo" in all_methods
    return list(all_methods)


def test_memory_bench_tiny(benches):
    bench_memory, _ = benches
    args = bench_memory.parse_args(["--tiny", "--steps", "1", "--threads", "1"])
    results = [bench_memory.measure_method(m, args) for m in _methods(bench_memory.ALL_METHODS)]
    by = {r["method"]: r for r in results}
    for r in results:
        assert r["state"] > 0 and r["grads_held"] > 0 and len(r["peaks"]) == 1
    # GEMS keeps low-rank moments + bases for the targeted weights, far less than AdamW's two full moments
    assert by["gems"]["bases"] > 0 and by["gems"]["coords"] == 0
    assert by["gems"]["state_targeted"] < 0.6 * by["adamw"]["state_targeted"]
    assert by["gems"]["state_other"] == by["adamw"]["state_other"]  # embedding + norms: plain AdamW in both
    # the per-task form's stash: one full gradient per task (2 tasks) of every parameter vs one .grad for AdamW
    assert by["gems-pertask"]["grads_held"] == 2 * by["adamw"]["grads_held"]
    # one backward: full task gradients of the targeted weights, one mixed gradient of the others
    assert by["adamw"]["grads_held"] < by["gems-full"]["grads_held"] < 2 * by["adamw"]["grads_held"]
    # the default (one backward, stash="auto"): coordinates of the targeted weights, less than AdamW's .grad
    assert by["gems"]["grads_held"] < by["adamw"]["grads_held"]
    # low-memory GEMS: coordinates only between steps, the embedding projected too
    low = by["gems-lowmem"]
    assert low["grads_held"] < by["adamw"]["grads_held"] and low["state_other"] < 0.05 * by["adamw"]["state_other"]
    assert low["state"] < by["gems"]["state"]
    rows = bench_memory.table_rows(results)
    assert {r["method"] for r in rows} == set(by) and rows[0]["state_vs_adamw"] == 1.0


def test_e2e_bench_tiny(benches, tmp_path):
    _, bench_e2e_step = benches
    methods = ",".join(_methods(bench_e2e_step.ALL_METHODS))
    rows = bench_e2e_step.main(["--tiny", "--steps", "3", "--measure-gap", "2", "--threads", "1",
                                "--methods", methods, "--out", str(tmp_path / "e2e")])
    by = {r["method"]: r for r in rows}
    assert set(by) == set(methods.split(","))
    for r in rows:
        assert r["fwd_bwd_ms"] > 0 and r["opt_step_ms"] > 0 and 0 < r["overhead_share"] < 1
        assert r["n_normal"] >= 1
    assert by["gems"]["n_refresh"] == 1 and by["adamw"]["n_refresh"] == 0 and by["adamw"]["refresh_ms"] == 0
    text = (tmp_path / "e2e.md").read_text()
    assert "gems-svd" in text and "overhead" in text
    assert (tmp_path / "e2e.csv").read_text().startswith("method,")


def test_bitsandbytes_shim_lets_the_baselines_import_and_step():
    """benches/bnb_shim (gpu_check.sh puts it first on PYTHONPATH where bitsandbytes is missing): galore-torch,
    apollo-torch and peft import with it, GaLoreAdamW steps, LoRA wraps a Linear, and any real use raises."""
    import os
    import subprocess

    require("apollo_torch")
    code = (
        "import bitsandbytes, galore_torch, apollo_torch, peft, torch\n"
        "assert 'shim' in bitsandbytes.__doc__\n"
        "p = torch.nn.Parameter(torch.randn(8, 8)); p.grad = torch.randn(8, 8)\n"
        "galore_torch.GaLoreAdamW([{'params': [p], 'rank': 2, 'update_proj_gap': 2, 'scale': 1.0,"
        " 'proj_type': 'std'}], no_deprecation_warning=True).step()\n"
        "m = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), peft.LoraConfig(r=2, target_modules=['0']))\n"
        "assert m(torch.randn(2, 8)).shape == (2, 8)\n"
        "from bitsandbytes.optim.optimizer import Optimizer2State\n"
        "try:\n    Optimizer2State()\nexcept RuntimeError as e:\n    assert 'not installed' in str(e)\nelse:\n    raise SystemExit('no error')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCHES / "bnb_shim"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_refresh_bench_one_small_synthetic_shape(tmp_path):
    """bench_refresh.py end to end on one small synthetic shape (--shapes): svd and every engine are timed,
    energies come out as fractions of the exact top-r energy, and the CSV/markdown tables are written."""
    import csv
    import subprocess

    out = tmp_path / "refresh"
    proc = subprocess.run([sys.executable, str(BENCHES / "bench_refresh.py"), "--no-real", "--shapes", "130x200",
                           "--repeats", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert {r["shape"] for r in rows} == {"130x200"} and {r["rank"] for r in rows} == {"64", "128"}
    assert {r["source"] for r in rows} == {"synthetic a=1.0", "synthetic a=0.5"}
    assert {"svd", "subspace_iter cold", "subspace_iter warm", "randomized"} <= {r["method"] for r in rows}
    for r in rows:
        assert 0.9 <= float(r["energy"]) <= 1 + 1e-4 and float(r["time_ms"]) > 0
    assert "--shapes 130x200" in out.with_suffix(".md").read_text()


def test_overhead_bench_counts_ops_per_step(tmp_path):
    """bench_overhead.py on a 2-layer model: every row has a positive op count and time, GEMS' torch path
    dispatches more ops per step than a foreach AdamW (the table's reference row), and the fused path (kernels
    stubbed) dispatches a handful, whatever the number of weights."""
    import csv
    import subprocess

    out = tmp_path / "overhead"
    proc = subprocess.run([sys.executable, str(BENCHES / "bench_overhead.py"), "--layers", "2", "--repeats", "1",
                           "--backends", "torch", "triton", "--stub-kernels", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = list(csv.DictReader(open(out.with_suffix(".csv"))))
    fused = next(r for r in table if r["method"] == "gems" and r["backend"] == "triton")
    assert int(fused["kernel_ops"]) < 40  # foreach norms, counters and shared gradients: not one op per weight
    # the same step with the launchers' operand checks redone at every call, side by side
    recheck = next(r for r in table if r["method"] == "gems-recheck")
    assert recheck["backend"] == "triton" and recheck["weights"] == "14" and float(recheck["step_ms"]) > 0
    rows = {r["method"]: r for r in table if r["backend"] in ("-", "torch")}
    assert set(rows) == {"adamw-foreach", "adamw", "gems", "gems-lowmem"}
    assert all(int(r["kernel_ops"]) > 0 and float(r["step_ms"]) > 0 for r in rows.values())
    assert int(rows["gems"]["kernel_ops"]) > int(rows["adamw-foreach"]["kernel_ops"])
    assert rows["gems"]["weights"] == "14"  # 2 layers × 7 Linear weights
