"""Time one GEMS optimizer step between refreshes (projection + subspace Adam + back-projection + write
of W) for K same-shape weights, per provider, against the floor of DESIGN.md §4.

Providers:
  torch   straightforward PyTorch following gems.reference: Σ_t w_t·G_t materialised, matmuls in the
          gradients' working precision (bases pre-cast once, as between refreshes), elementwise Adam
          with fp32 state, Δ as a sum of back-projections, apply_update.
  triton  gems_kernels.project_adam + gems_kernels.back_project_update (one launch each for K weights).
  cuda    gems.cuda_backend (same two functions), when it exists and reports available().

Floor per step (K weights, T tasks): bytes = K·(T+2)·m·n·sizeof(dtype) (read T gradients, read and
write W); flops = K·2·m·n·(Σ projection widths + Σr) with projection widths T·r_sh + Σ r_t (each task
gradient against [B_sh, B_t]) and Σr = r_sh + Σ r_t (the back-projection). floor_ms = max(bytes / copy
bandwidth, flops / GEMM rate), both measured here on this machine: a large device copy (read + write
bytes counted) and a large matmul in the gradients' dtype (fp32: torch's default, TF32 off).
x_floor = ms / floor_ms.

    python benches/bench_step.py            # GPU: the full table, CSV in benches/results/
    python benches/bench_step.py --quick    # CPU: torch provider on small shapes + one tiny Triton
                                            # interpreter run (correctness smoke, NOT a performance number)
    python benches/bench_step.py --check-auto benches/results/bench_step_<card>.csv
                                            # no measuring: does backend="auto" pick the faster provider of
                                            # each measured configuration? (also printed after a GPU run)
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before gems_kernels imports triton

from gems import reference as R  # noqa: E402
from _common import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
T_TASKS = 2
FULL_SHAPES = [(576, 1536), (2048, 2048), (4096, 4096), (4096, 11008)]
FULL_RANKS = [(64, 32), (256, 128), (512, 256)]
QUICK_SHAPES = [(576, 1536), (2048, 2048)]
QUICK_RANKS = [(64, 32)]
INTERP_SHAPE, INTERP_RANKS = (64, 48), (16, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
WD = 0.01


# ------------------------------------------------------------------------------------------------ machine
def machine(device: torch.device) -> tuple[str, str]:
    """(description, slug for file names)."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        desc = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs), CUDA {torch.version.cuda}, torch {torch.__version__}"
        return desc, re.sub(r"[^a-z0-9]+", "_", p.name.lower()).strip("_")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores, {torch.get_num_threads()} threads, torch {torch.__version__}", "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Median wall time of fn; on CUDA with CUDA events and an L2 flush (256 MiB write) before each run,
    so small shapes are not timed out of L2."""

    def __init__(self, device: torch.device, warmup: int, repeats: int, max_s: float):
        self.device, self.warmup, self.repeats, self.max_s = device, warmup, repeats, max_s
        self.flush = torch.empty(64 * 2**20, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        sync(self.device)
        times = []
        t_start = time.perf_counter()
        for _ in range(self.repeats):
            if self.flush is not None:
                self.flush.zero_()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            if time.perf_counter() - t_start > self.max_s:
                break
        return statistics.median(times)


def measure_card(device: torch.device, timer: Timer, quick: bool) -> dict[str, float]:
    """Copy bandwidth (GB/s, read+write) and matmul rate (TFLOP/s) per dtype."""
    nbytes = (64 if quick else 1024) * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    card = {"copy_GBps": 2 * nbytes / t / 1e9}
    del src, dst
    n = 1024 if quick else 8192
    for name, dt in DTYPES.items():
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        t = timer(lambda: a @ b)
        card[f"gemm_{name}_TFLOPs"] = 2 * n**3 / t / 1e12
    return card


# ------------------------------------------------------------------------------------------------ problem
def make_problem(shape, ranks_st, dtype, K, device, seed=0):
    m, n = shape
    side = R.side_for(shape, "std")
    d = R.side_dim(shape, side)
    r_sh, r_t = (min(r, min(shape)) for r in ranks_st)
    ranks = [r_sh] + [r_t] * T_TASKS
    g = torch.Generator(device="cpu").manual_seed(seed)

    def orth(r):
        q, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
        return q.contiguous().to(device)

    def coord(r):
        return torch.empty(R.coord_shape(shape, side, r), device=device)

    P = dict(side=side, ranks=ranks, shape=shape, dtype=dtype, K=K)
    P["grads"] = [[(torch.randn(m, n, device=device) * 1e-2).to(dtype) for _ in range(T_TASKS)] for _ in range(K)]
    P["weights"] = [torch.randn(m, n, device=device).to(dtype) for _ in range(K)]
    P["bases"] = [[orth(r) for r in ranks] for _ in range(K)]
    P["m"] = [[coord(r).normal_(0, 1e-3) for r in ranks] for _ in range(K)]
    P["v"] = [[coord(r).normal_(0, 1e-3).square_() for r in ranks] for _ in range(K)]
    P["w"] = [1.0 / T_TASKS] * T_TASKS
    P["coeffs"] = [1.0] + [1.0 / T_TASKS] * T_TASKS
    P["step"] = [10]
    return P


def floor(P, card):
    K, (m, n), ranks = P["K"], P["shape"], P["ranks"]
    size = torch.empty((), dtype=P["dtype"]).element_size()
    nbytes = K * (T_TASKS + 2) * m * n * size
    widths = T_TASKS * ranks[0] + sum(ranks[1:])
    flops = K * 2 * m * n * (widths + sum(ranks))
    rate = card["gemm_fp32_TFLOPs" if P["dtype"] == torch.float32 else "gemm_bf16_TFLOPs"] * 1e12
    return nbytes, flops, max(nbytes / (card["copy_GBps"] * 1e9), flops / rate)


# ------------------------------------------------------------------------------------------------ providers
def torch_step(P):
    """One step of the plain torch implementation (working precision, fp32 state)."""
    side, dt = P["side"], P["dtype"]
    key = "_bases_wp"
    if key not in P:  # working-precision copies of the bases: made once per refresh, not per step
        P[key] = [[b.to(dt) for b in row] for row in P["bases"]]
    P["step"][0] += 1
    step = P["step"][0]
    for k in range(P["K"]):
        grads, bases = P["grads"][k], P[key][k]
        g_sh = R.shared_gradient(grads, P["w"]).to(dt)
        deltas = []
        for s, b in enumerate(bases):
            r = R.project(g_sh if s == 0 else grads[s - 1], b, side).float()
            deltas.append(R.adam_delta(r, P["m"][k][s], P["v"][k][s], step, **ADAM))
        upd = None
        for c, b, d in zip(P["coeffs"], bases, deltas):
            term = R.project_back(d.to(dt), b, side)
            upd = term.mul_(c) if upd is None else upd.add_(term, alpha=c)
        R.apply_update(P["weights"][k], upd, lr=ADAM["lr"], weight_decay=WD)


def backend_step(mod):
    def step_fn(P):
        P["step"][0] += 1
        deltas = mod.project_adam(P["grads"], P["w"], P["bases"], P["m"], P["v"], side=P["side"],
                                  step=P["step"][0], **ADAM)
        mod.back_project_update(P["weights"], P["bases"], P["coeffs"], deltas, side=P["side"], lr=ADAM["lr"],
                                weight_decay=WD)
    return step_fn


def providers(device: torch.device, wanted: list[str]) -> dict[str, tuple[object, str]]:
    """name -> (step function or None, note)."""
    out = {}
    if "torch" in wanted:
        out["torch"] = (torch_step, "")
    if "triton" in wanted:
        try:
            import gems_kernels

            ok, why = gems_kernels.available()
            out["triton"] = (backend_step(gems_kernels), "") if ok else (None, why)
        except Exception as exc:  # pragma: no cover
            out["triton"] = (None, f"import failed: {exc}")
    if "cuda" in wanted:
        try:
            import gems.cuda_backend as cb

            ok, why = cb.available()
            if ok and device.type == "cuda":
                cb.load()
                out["cuda"] = (backend_step(cb), "")
            else:
                out["cuda"] = (None, why or "no CUDA device")
        except ImportError:
            out["cuda"] = (None, "gems.cuda_backend not present")
        except Exception as exc:
            out["cuda"] = (None, f"{type(exc).__name__}: {exc}")
    return out


# ------------------------------------------------------------------------------------------------ main
COLUMNS = ["provider", "shape", "side", "ranks", "dtype", "K", "ms", "GBps", "TFLOPs", "floor_ms", "x_floor",
           "note", "machine"]


def run(args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if HAS_CUDA else "cpu"))
    desc, slug = machine(device)
    quick = args.quick or device.type != "cuda"
    timer = Timer(device, warmup=args.warmup, repeats=args.repeats, max_s=args.max_seconds)
    card = measure_card(device, timer, quick)
    print(f"# machine: {desc}")
    print(f"# measured: copy {card['copy_GBps']:.1f} GB/s (read+write), matmul fp32 "
          f"{card['gemm_fp32_TFLOPs']:.2f} TFLOP/s, bf16 {card['gemm_bf16_TFLOPs']:.2f} TFLOP/s")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes] if args.shapes else (
        QUICK_SHAPES if quick else FULL_SHAPES)
    ranks_list = [tuple(int(x) for x in r.split("/")) for r in args.ranks] if args.ranks else (
        QUICK_RANKS if quick else FULL_RANKS)
    provs = providers(device, args.providers)
    for name, (fn, why) in provs.items():
        if fn is None:
            print(f"# provider {name}: skipped ({why})")
    rows = []

    def record(name, P, seconds, note):
        nbytes, flops, fl = floor(P, card)
        row = dict(provider=name, shape=f"{P['shape'][0]}x{P['shape'][1]}", side=P["side"],
                   ranks=f"{P['ranks'][0]}/{P['ranks'][1]}", dtype=args_dtype_name(P["dtype"]), K=P["K"],
                   ms=round(seconds * 1e3, 4), GBps=round(nbytes / seconds / 1e9, 2),
                   TFLOPs=round(flops / seconds / 1e12, 4), floor_ms=round(fl * 1e3, 4),
                   x_floor=round(seconds / fl, 2), note=note, machine=desc)
        rows.append(row)
        print(fmt_row(row), flush=True)
        write_csv(args.out_path, rows)  # after every row: a run cut short by a timeout keeps its results

    print(header())
    interp = device.type != "cuda"
    for dname in args.dtypes:
        dt = DTYPES[dname]
        for shape in shapes:
            for rk in ranks_list:
                P0 = None
                for name, (fn, _) in provs.items():
                    if fn is None or (interp and name == "triton"):
                        continue
                    P0 = make_problem(shape, rk, dt, args.K, device)
                    try:
                        record(name, P0, timer(lambda: fn(P0)), "")
                    except Exception as exc:  # keep the table going; report the failure in it
                        print(f"# {name} {shape} {rk} {dname}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    del P0
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    if interp and "triton" in provs and provs["triton"][0] is not None:
        # correctness smoke under the interpreter: NOT a performance number
        P = make_problem(INTERP_SHAPE, INTERP_RANKS, torch.float32, 1, device)
        slow = Timer(device, warmup=1, repeats=1, max_s=60)
        record("triton", P, slow(lambda: provs["triton"][0](P)), "TRITON_INTERPRET=1 on CPU: not a performance number")
    return rows, slug, desc


def auto_check(rows: list[dict]) -> list[dict]:
    """For each measured (shape, ranks, dtype) and each kernel provider: the provider backend="auto" would
    run that weight on (gems.dispatch.auto_backend_for: the kernel or torch) against the faster of the two
    as measured. Its thresholds come from one card's table; this tells whether they hold on another."""
    from gems.dispatch import auto_backend_for
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if not r.get("note"):
            times.setdefault((r["shape"], r["ranks"], r["dtype"]), {})[r["provider"]] = float(r["ms"])
    out = []
    for (shape, ranks, dname), t in times.items():
        m, n = (int(x) for x in shape.split("x"))
        r_sh, r_t = (int(x) for x in ranks.split("/"))
        for kernel in ("triton", "cuda"):
            if kernel not in t or "torch" not in t:
                continue
            pick = auto_backend_for(kernel, (m, n), DTYPES[dname], r_sh + T_TASKS * r_t)
            best = min(("torch", kernel), key=t.__getitem__)
            out.append(dict(kernel=kernel, shape=shape, ranks=ranks, dtype=dname, auto_pick=pick, faster=best,
                            pick_vs_faster=round(t[pick] / t[best], 2)))
    return out


def print_auto_check(rows: list[dict]) -> None:
    checks = auto_check(rows)
    if not checks:
        print("# auto check: no configuration has torch and a kernel provider both measured")
        return
    for c in checks:
        flag = "" if c["auto_pick"] == c["faster"] else f"  <- {c['pick_vs_faster']}x the faster"
        print(f"# auto {c['kernel']:6s} {c['shape']:>11s} {c['ranks']:>8s} {c['dtype']:5s} picks {c['auto_pick']:6s}"
              f" (faster: {c['faster']}){flag}")
    for kernel in ("triton", "cuda"):
        mine = [c for c in checks if c["kernel"] == kernel]
        if mine:
            hits = sum(c["auto_pick"] == c["faster"] for c in mine)
            worst = max(c["pick_vs_faster"] for c in mine)
            print(f"# auto check, {kernel} installed: picks the faster of {kernel}/torch in {hits}/{len(mine)} "
                  f"configurations; its worst pick takes {worst:.2f}x the faster one's time")


def args_dtype_name(dt):
    return {v: k for k, v in DTYPES.items()}[dt]


def header() -> str:
    return (f"{'provider':8s} {'shape':>11s} {'side':5s} {'ranks':>8s} {'dtype':5s} {'K':>2s} {'ms':>10s} "
            f"{'GB/s':>9s} {'TFLOP/s':>8s} {'floor ms':>9s} {'x floor':>8s}")


def fmt_row(r) -> str:
    s = (f"{r['provider']:8s} {r['shape']:>11s} {r['side']:5s} {r['ranks']:>8s} {r['dtype']:5s} {r['K']:>2d} "
         f"{r['ms']:10.3f} {r['GBps']:9.1f} {r['TFLOPs']:8.3f} {r['floor_ms']:9.3f} {r['x_floor']:8.2f}")
    return s + (f"  ({r['note']})" if r["note"] else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small CPU-friendly run (default without a GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--providers", nargs="+", default=["torch", "triton", "cuda"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--shapes", nargs="+", default=None, help="e.g. 4096x4096")
    p.add_argument("--ranks", nargs="+", default=None, help="shared/task, e.g. 256/128")
    p.add_argument("--K", type=int, default=2, help="weights of one shape per step (one launch)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=5.0, help="stop repeating a config after this")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1 — on a shared, oversubscribed CPU OpenMP spin-waits "
                        "made every op ~15x slower with 2 threads)")
    p.add_argument("--out", default=None, help="CSV path (default benches/results/bench_step_<device>.csv)")
    p.add_argument("--check-auto", default=None, metavar="CSV",
                   help="measure nothing: check backend=\"auto\"'s per-weight choices against a results CSV")
    args = p.parse_args(argv)
    if args.check_auto:
        path = Path(args.check_auto)
        if not path.is_file():
            p.error(f"--check-auto: no such file: {path}")
        with open(path, encoding="utf-8") as fh:
            print_auto_check(list(csv.DictReader(fh)))
        return 0
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
    device = torch.device(args.device or ("cuda" if HAS_CUDA else "cpu"))
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    args.out_path = Path(args.out) if args.out else RESULTS / f"bench_step_{machine(device)[1]}.csv"
    rows, _, _ = run(args)
    write_csv(args.out_path, rows)
    print(f"# wrote {args.out_path}")
    print_auto_check(rows)
    return 0


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
