"""Per-step host overhead of the optimizers on SmolLM2's layout with tiny matrices: ATen ops dispatched and
wall time of ``opt.step()`` + ``zero_grad()``.

On a GPU at SmolLM2-135M's size the GEMS step is bound by launches and Python, not by flops (H200,
`benches/results/e2e_step_nvidia_h200.md`: 37 ms against AdamW's 5.4 ms). Every ATen op dispatched is at
least one trip through the dispatcher and, on a GPU, usually one kernel launch; counting them is
deterministic and needs no GPU. The model is a random 30-layer Llama with SmolLM2-135M's module structure
(7 Linear weights per layer, 210 targeted weights, tied embedding) but hidden size 64, so the arithmetic is
negligible and the wall time is the overhead itself.

    python benches/bench_overhead.py                      # CPU: torch backend, AdamW foreach and per-tensor
    python benches/bench_overhead.py --backends torch triton   # + the Triton path (TRITON_INTERPRET on CPU:
                                                          # op counts valid, its wall time is not)
    python benches/bench_overhead.py --device cuda --backends torch triton cuda
    python benches/bench_overhead.py --backends triton --stub-kernels   # CPU: the Triton path's host time, its
                                                          # two kernels replaced by no-ops (results are wrong)
    python benches/bench_overhead.py --backends torch torch-batched   # + the torch path's GPU form, counted on CPU

With a kernel backend the table adds ``gems-recheck``: the same step with the launchers' per-operand checks
redone at every call (their memo, ``gems_kernels._utils.CHECKED``, turned off), side by side.
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before gems_kernels imports triton

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import gems  # noqa: E402
from gems.resources import require  # noqa: E402
from _common import RESULTS_DIR, machine_description, print_table, synchronize, write_csv, write_markdown  # noqa: E402

TASKS = ("search", "rec")
LOW_MEMORY = dict(stash="projected", refresh_schedule="staggered", target_embeddings=True)


# ops that launch no kernel on a GPU: views and metadata, allocations without a fill, profiler markers
NO_KERNEL = {"slice", "view", "select", "detach", "unbind", "permute", "t", "transpose", "expand", "as_strided",
             "split", "split_with_sizes", "unsqueeze", "squeeze", "alias", "_reshape_alias", "narrow", "diagonal",
             "empty", "new_empty", "empty_strided", "set_", "_record_function_enter_new", "_record_function_exit"}
SCALAR_READ = "_local_scalar_dense"  # .item()/float(): a device-to-host sync when the tensor is on a GPU


class OpCounter(TorchDispatchMode):
    """Counts ATen ops by name while active."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


COLUMNS = ("method", "backend", "weights", "kernel_ops", "scalar_reads", "other_ops", "step_ms", "top_kernel_ops")


def small_smollm2(layers: int, hidden: int, device: str) -> torch.nn.Module:
    require("transformers", "benches/bench_overhead.py")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(device)


def build(method: str, model: torch.nn.Module, backend: str):
    if method.startswith("adamw"):
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=method == "adamw-foreach")
    extra = LOW_MEMORY if method == "gems-lowmem" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks clamped on the tiny matrices
        # foreach inner AdamW, as torch picks on CUDA (on CPU its default is one tensor at a time)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
        return gems.GemsOptimizer(inner, model=model,
                                  tasks=list(TASKS), rank=16, task_rank=8, update_proj_gap=1000, backend=backend,
                                  **extra)


def measure(method: str, backend: str, args) -> dict:
    if backend == "torch-batched":  # the torch path as it runs on a GPU (gems.grouped.BATCHED), counted here
        from gems import grouped

        saved, grouped.BATCHED = grouped.BATCHED, grouped.BATCHED | {torch.device(args.device).type}
        try:
            return measure(method, "torch", args) | {"backend": backend}
        finally:
            grouped.BATCHED = saved
    if method == "gems-recheck":  # kernel launchers check every operand at every call (no U.CHECKED memo)
        from gems_kernels import _utils as U

        saved, U.CHECKED.capacity = U.CHECKED.capacity, 0
        U.CHECKED.clear()
        try:
            return measure("gems", backend, args) | {"method": method}
        finally:
            U.CHECKED.capacity = saved
    model = small_smollm2(args.layers, args.hidden, args.device)
    opt = build(method, model, backend)
    gen = torch.Generator().manual_seed(0)
    ids = {t: torch.randint(0, 512, (2, 16), generator=gen).to(args.device) for t in TASKS}

    def loss(x):
        return model(input_ids=x, labels=x).loss

    def backward():
        if method.startswith("adamw"):
            loss(torch.cat([ids[t] for t in TASKS])).backward()
        else:
            opt.backward({t: loss(ids[t]) for t in TASKS})

    def step():
        opt.step()
        opt.zero_grad()

    for _ in range(2):  # first bases, state allocation
        backward()
        step()
    backward()
    counter = OpCounter()
    with counter:
        step()
    times = []
    for _ in range(args.repeats):
        backward()
        synchronize(args.device)
        # Python's collector paused while timing: a full collection (long with transformers loaded, and
        # mostly due to the forward/backward's garbage) would land in some timed steps and not others
        gc.disable()
        try:
            start = time.perf_counter()
            step()
            synchronize(args.device)
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    targeted = len(getattr(opt, "subspaces", ())) or None
    kernels = {k: v for k, v in counter.ops.items() if k not in NO_KERNEL and k != SCALAR_READ}
    top = ", ".join(f"{k} {v}" for k, v in collections.Counter(kernels).most_common(5))
    return dict(method=method, backend=backend if not method.startswith("adamw") else "-", weights=targeted or "-",
                kernel_ops=sum(kernels.values()), scalar_reads=counter.ops[SCALAR_READ],
                other_ops=sum(v for k, v in counter.ops.items() if k in NO_KERNEL),
                step_ms=statistics.median(times) * 1e3, top_kernel_ops=top)


def stub_triton_kernels() -> None:
    """Replace the two Triton kernels by no-op launches: what remains of the fused step is its host work."""
    import gems_kernels  # noqa: F401  (the package import shadows its submodules' names with functions)

    class NoOp:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    sys.modules["gems_kernels.project_adam"]._project_adam_kernel = NoOp()
    sys.modules["gems_kernels.back_project_update"]._back_project_update_kernel = NoOp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", nargs="+", default=["torch"],
                    help="GEMS backends (torch triton cuda; torch-batched: the torch path with the stacked "
                         "projections and writes it takes on a GPU, gems.grouped.BATCHED)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stub-kernels", action="store_true",
                    help="Triton kernels as no-ops: the Triton rows' time is the host work alone (CPU, interpreter)")
    ap.add_argument("--out", default=None, help="output stem [benches/results/overhead_<device>]")
    args = ap.parse_args()
    if args.stub_kernels:
        stub_triton_kernels()
    torch.set_num_threads(args.threads)
    machine = machine_description(args.device)
    print(f"# machine: {machine}")
    rows = [measure("adamw-foreach", "-", args), measure("adamw", "-", args)]
    print_table(rows[-2:], COLUMNS)
    for backend in args.backends:
        # gems-recheck: the same step with the kernels' operand checks redone at every call, side by side
        for method in ("gems", "gems-lowmem") + (("gems-recheck",) if backend == "triton" else ()):
            rows.append(measure(method, backend, args))
            print_table(rows[-1:], COLUMNS)
    base = rows[0]
    for r in rows:
        r["kernel_ops_vs_adamw_foreach"] = round(r["kernel_ops"] / base["kernel_ops"], 2)
        r["ms_vs_adamw_foreach"] = round(r["step_ms"] / base["step_ms"], 2)
    interp = os.environ.get("TRITON_INTERPRET") == "1" and "triton" in args.backends and not args.stub_kernels
    columns = [*COLUMNS[:4], "kernel_ops_vs_adamw_foreach", *COLUMNS[4:]]
    print_table(rows, columns)
    cmd = "python benches/bench_overhead.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    cmd += f" --backends {' '.join(args.backends)}" if args.backends != ["torch"] else ""
    cmd += "".join(f" --{k} {getattr(args, k)}" for k, d in (("layers", 30), ("hidden", 64), ("repeats", 7))
                   if getattr(args, k) != d)
    cmd += " --stub-kernels" if args.stub_kernels else ""
    cmd += f" --out {args.out}" if args.out else ""
    stem = Path(args.out) if args.out else RESULTS_DIR / f"overhead_{torch.device(args.device).type}"
    write_csv(stem.with_suffix(".csv"), rows, columns)
    timing_note = ""
    if interp:
        timing_note = " (Triton rows: interpreter, their time is not a performance number)"
    elif args.stub_kernels:
        timing_note = " (Triton rows: kernels replaced by no-op launches, `--stub-kernels`: the host work alone)"
    preamble = (f"Machine: {machine}.  \nCommand: `{cmd}`. Model: random Llama, {args.layers} layers, hidden "
                f"{args.hidden}, SmolLM2-135M's module layout (tied embedding); GEMS rank 16 / task 8, two tasks, "
                f"around a foreach AdamW (torch's choice on CUDA). "
                f"ATen ops dispatched by one `step()` + `zero_grad()` between refreshes: `kernel_ops` = those that "
                f"launch a kernel on a GPU (a foreach op counts once), `scalar_reads` = `.item()`-style reads (a "
                f"device-to-host sync each when the tensor is on the GPU; AdamW's come from its step counters, "
                f"which live on the CPU), `other_ops` = views, allocations, profiler markers; Triton launches are "
                f"not ATen ops and are not counted. `step_ms` = median of {args.repeats} steps, timed with Python's "
                f"garbage collector paused{timing_note}. "
                f"`gems-recheck` (kernel backends): `gems` with the launchers' per-operand checks redone at every "
                f"call (their memo `gems_kernels._utils.CHECKED` off).")
    write_markdown(stem.with_suffix(".md"), f"Optimizer step overhead on {args.device}", rows, columns,
                   preamble=preamble)
    print(f"# wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
