"""Wall time of a full training step: GEMS vs the optimizers users would pick instead, on SmolLM2-135M.

    python benches/bench_e2e_step.py                 # CPU, SmolLM2-135M-Instruct fp32, ~10 min on 2 shared cores
    python benches/bench_e2e_step.py --device cuda   # same on a GPU (more steps are cheap there: --steps 13)
    python benches/bench_e2e_step.py --threads 1     # what the committed CPU table used (see its notes)
    python benches/bench_e2e_step.py --tiny          # random 2-layer LlamaConfig model (smoke test)

Methods and batches are those of bench_memory.py (2 tasks × ``--batch`` sequences × ``--seq`` tokens; the
baselines step on the mixed-batch loss): ``adamw``, ``galore`` (galore-torch, SVD refresh), ``apollo``
(apollo-torch, random-projection refresh), ``lora`` (peft), ``gems`` (defaults: one forward and one
backward over the mixed batch, ``opt.backward(row_losses, task_ids=...)``, which with ``stash="auto"`` keeps
coordinates only between refreshes; refresh="subspace_iter"), ``gems-full`` (the same with ``stash="full"``:
full task gradients until the step), ``gems-pertask`` (``opt.backward({task: loss})``: a forward and an
autograd pass per task, the reference path), ``gems-svd`` (refresh="svd") and ``gems-lowmem``
(``refresh_schedule="staggered"``, ``target_embeddings=True``). Staggered refreshes are timed with the
aligned schedule so that refresh steps can be told apart (staggering spreads the same work over the gap);
``--methods`` picks a subset.

Every method has its own copy of the model. The steps are interleaved: round k runs step k of every method
(in an order rotated each round), so slow phases of a shared machine hit all methods alike. Each step is
timed in two parts, wall clock and process CPU time: forward+backward(s), and optimizer step (+ zero_grad).

Refresh cost is measured, not guessed: the projecting methods are built with ``update_proj_gap =
--measure-gap`` (default 4), so steps 4, 8, ... are refresh steps (step 0, the first refresh with the lazy
state allocation, is warm-up and not used). ``refresh`` = median optimizer time of refresh steps − median of
normal steps, and the per-step cost at the real gap (``--gap``, default 200) is amortised:

    total = fwd+bwd + optimizer step + refresh / gap,     overhead share = (optimizer step + refresh/gap) / total.

Caveat: the warm-started subspace iteration starts from a basis ``--measure-gap`` steps old here rather than
``--gap`` steps old; its adaptive iteration count (1–2) may differ at the real gap. Writes
benches/results/e2e_step_<device>.csv and .md (``--out`` changes the stem).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, print_table, synchronize, write_csv, write_markdown  # noqa: E402
from bench_memory import (TASKS, add_common_args, build, load_model, make_batches, preimport,  # noqa: E402
                          run_plan)

ALL_METHODS = ("adamw", "galore", "apollo", "lora", "gems", "gems-full", "gems-pertask", "gems-svd", "gems-lowmem")
PROJECTING = ("galore", "apollo", "gems")
# Why the committed CPU run uses one thread (measured on the shared 2-core machine, load average 6-8):
THREADS_NOTE = ("With 2 threads on this shared 2-core machine (load average 6-8 from other jobs), LAPACK's SVD of "
                "one 576×1536 matrix took 13-31 s against 0.44 s with 1 thread (OpenMP barriers waiting for "
                "descheduled threads), and a 512×576·576×1536 matmul 44 ms against 32 ms: 2 threads would have "
                "measured the machine's contention, not the methods.")


def _projecting(method: str) -> bool:
    return method.split("-")[0] in PROJECTING


def time_step(runner, batch, device: str) -> dict[str, float]:
    """One training step, timed in two parts (seconds): forward+backward(s), optimizer step + zero_grad."""
    synchronize(device)
    c0, t0 = time.process_time(), time.perf_counter()
    runner.forward_backward(batch)
    synchronize(device)
    c1, t1 = time.process_time(), time.perf_counter()
    runner.step()
    synchronize(device)
    c2, t2 = time.process_time(), time.perf_counter()
    return {"fb": t1 - t0, "opt": t2 - t1, "fb_cpu": c1 - c0, "opt_cpu": c2 - c1}


def summarize(method: str, samples: list[dict[str, float]], measure_gap: int, gap: int) -> dict[str, Any]:
    """Medians (ms) over the timed steps (step 0 is warm-up) and the amortised totals."""
    timed = list(enumerate(samples))[1:]
    is_refresh = lambda k: _projecting(method) and k % measure_gap == 0  # noqa: E731
    normal = [s for k, s in timed if not is_refresh(k)]
    refresh = [s for k, s in timed if is_refresh(k)]
    row: dict[str, Any] = {"method": method, "n_normal": len(normal), "n_refresh": len(refresh)}
    for suffix in ("", "_cpu"):
        fb = statistics.median(s["fb" + suffix] for s in normal) * 1e3
        opt = statistics.median(s["opt" + suffix] for s in normal) * 1e3
        # extra time of a whole refresh step (gems-lowmem refreshes inside backward, the others in step)
        ref = (statistics.median(s["fb" + suffix] + s["opt" + suffix] for s in refresh) * 1e3 - fb - opt) if refresh else 0.0
        total = fb + opt + ref / gap
        row.update({f"fwd_bwd_ms{suffix}": fb, f"opt_step_ms{suffix}": opt, f"refresh_ms{suffix}": ref,
                    f"total_ms{suffix}": total, f"overhead_share{suffix}": (opt + ref / gap) / total})
    return row


COLUMNS = ("method", "fwd_bwd_ms", "opt_step_ms", "refresh_ms", "total_ms", "overhead_share", "fwd_bwd_vs_adamw",
           "total_vs_adamw", "opt_step_ms_cpu", "refresh_ms_cpu", "total_ms_cpu", "overhead_share_cpu",
           "n_normal", "n_refresh")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.set_defaults(methods=",".join(ALL_METHODS))  # this benchmark's own list (gems-svd included)
    ap.add_argument("--steps", type=int, default=5, help="steps per method, step 0 is warm-up [5: 3 normal + 1 refresh]")
    ap.add_argument("--measure-gap", type=int, default=4, help="update_proj_gap used while timing (refresh steps)")
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap the refresh cost is amortised over")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="output stem [benches/results/e2e_step_<device>]")
    args = ap.parse_args(argv)
    for name, full, tiny in (("rank", 64, 8), ("task_rank", 32, 4), ("lora_rank", 16, 4)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.steps <= args.measure_gap:
        ap.error("--steps must exceed --measure-gap so that at least one refresh step is timed")
    return args


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, skipped, machine, model_name = run_plan(args)
    print(f"# machine: {machine}")
    print(f"# model: {model_name}; {len(TASKS)} tasks × {args.batch} seq × {args.seq} tokens; {args.steps} steps, "
          f"measure gap {args.measure_gap}, amortised over gap {args.gap}; rank {args.rank} / task {args.task_rank}; "
          f"LoRA r {args.lora_rank}", flush=True)

    torch.manual_seed(0)
    base, tok = load_model(args.tiny, args.random_init)
    base.to(args.device).train()
    batches = [{t: x.to(args.device) for t, x in b.items()}
               for b in make_batches(tok, base.config.vocab_size, args.steps, args.batch, args.seq)]
    runners = []
    for i, m in enumerate(methods):
        preimport(m)
        model = base if i == len(methods) - 1 else copy.deepcopy(base)
        runners.append(build(m, model, rank=args.rank, task_rank=args.task_rank, lora_rank=args.lora_rank,
                             gap=args.measure_gap, device=args.device))
        if runners[-1].opt.__class__.__name__ == "GemsOptimizer" and runners[-1].opt.refresh_schedule == "staggered":
            opt = runners[-1].opt
            opt.config = dataclasses.replace(opt.config, refresh_schedule="aligned")
            runners[-1].settings = runners[-1].settings.replace("staggered", "aligned (timing)")
    del base
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    t_start = time.perf_counter()
    for k, batch in enumerate(batches):
        order = runners[k % len(runners):] + runners[:k % len(runners)]
        for r in order:
            samples[r.name].append(time_step(r, batch, args.device))
        print(f"# round {k}: " + ", ".join(f"{r.name} {samples[r.name][-1]['fb'] + samples[r.name][-1]['opt']:.2f}s"
                                         for r in runners) + f" (elapsed {time.perf_counter() - t_start:.0f}s)", flush=True)

    rows = [summarize(m, samples[m], args.measure_gap, args.gap) for m in methods]
    ref = next((r for r in rows if r["method"] == "adamw"), None)
    for r in rows:
        r["fwd_bwd_vs_adamw"] = r["fwd_bwd_ms"] / ref["fwd_bwd_ms"] if ref else ""
        r["total_vs_adamw"] = r["total_ms"] / ref["total_ms"] if ref else ""
        r["settings"] = next(x.settings for x in runners if x.name == r["method"])
    print_table(rows, COLUMNS)

    by = {r["method"]: r for r in rows}
    notes = ["Columns (ms, medians): `fwd_bwd` = forward + backward(s) (every `gems*` but `gems-pertask`: one "
             "forward and one backward over the mixed batch, per-task gradients or coordinates split by rows inside "
             "it; `gems-pertask`: a forward and an autograd pass per task), `opt_step` = optimizer step + "
             "zero_grad, both medians over normal steps, `refresh` = extra time of a refresh step (median "
             "refresh-step fwd_bwd + opt_step − theirs on normal steps), `total` = fwd_bwd + opt_step + "
             f"refresh/{args.gap}, `overhead_share` = (opt_step + refresh/{args.gap}) / total; `_cpu` columns are "
             "the same from process CPU time (all threads), less sensitive to other jobs on the machine. "
             f"Wall-clock medians of {args.steps - 1} interleaved steps per method; the machine was shared with "
             "other agents while this ran, so single numbers are noisy: compare ratios within the table."]
    for g in ("gems", "gems-full", "gems-pertask", "gems-svd", "gems-lowmem"):
        if g in by:
            r = by[g]
            notes.append(f"Target, `{g}` amortised optimizer overhead ≤ 25% of the full step at gap {args.gap} on "
                         f"{args.device}: {r['overhead_share']:.1%} wall ({r['overhead_share_cpu']:.1%} CPU time); "
                         f"refresh {r['refresh_ms']:.0f} ms per refresh ({r['refresh_ms'] / args.gap:.1f} ms/step "
                         "amortised).")
    if "gems" in by and "gems-svd" in by and by["gems"]["refresh_ms"] > 0:
        notes.append(f"Refresh, svd vs subspace_iter: {by['gems-svd']['refresh_ms']:.0f} ms vs "
                     f"{by['gems']['refresh_ms']:.0f} ms ({by['gems-svd']['refresh_ms'] / by['gems']['refresh_ms']:.1f}×; "
                     f"CPU time {by['gems-svd']['refresh_ms_cpu'] / max(by['gems']['refresh_ms_cpu'], 1e-9):.1f}×).")
    if skipped:
        notes.append("Skipped: " + "; ".join(skipped) + ".")
    if args.threads:
        notes.append(f"torch.set_num_threads({args.threads}) (`--threads`). " + (THREADS_NOTE if args.threads == 1 else ""))
    notes.append(f"The warm-started subspace iteration starts from a basis {args.measure_gap} steps old here (refresh "
                 f"steps timed at update_proj_gap={args.measure_gap}); at gap {args.gap} its adaptive iteration count "
                 "(1–2) may be higher.")
    print("\n".join(notes))

    stem = Path(args.out) if args.out else RESULTS_DIR / f"e2e_step_{torch.device(args.device).type}"
    command = "python benches/bench_e2e_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_csv(stem.with_suffix(".csv"), rows, COLUMNS + ("settings",))
    preamble = (f"Machine: {machine}.\n\nModel: {model_name}; one step = forward over {len(TASKS)} tasks × "
                f"{args.batch} sequences × {args.seq} tokens, backward(s), optimizer step; rank {args.rank} / task "
                f"{args.task_rank}, LoRA r {args.lora_rank}.\n\nSettings: "
                + "; ".join(f"`{r['method']}`: {r['settings']}" for r in rows)
                + f".\n\nCommand: `{command.strip()}` (total {time.perf_counter() - t_start:.0f} s of stepping)")
    write_markdown(stem.with_suffix(".md"), f"End-to-end training step time ({args.device})", rows, COLUMNS,
                   preamble=preamble, notes="\n\n".join(notes))
    print(f"# wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
