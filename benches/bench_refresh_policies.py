"""Convergence of the refresh policies before any is offered as a default: state_transfer keep / rotate /
reset, adaptive refresh on / off, and the refresh engine (svd / subspace_iter), on a two-task problem.

The problem: a tiny Llama-architecture language model (random init, from a config: nothing downloaded)
trained on two tasks with different token statistics (a "search" and a "rec" stream), GEMS with AdamW.
Reports the final mean training loss per task (median over seeds) and the number of refreshes.

    python benches/bench_refresh_policies.py [--steps 240] [--gap 20] [--seeds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

import gems
from gems.resources import require
from _common import RESULTS_DIR, machine_description, print_table, write_csv, write_markdown

POLICIES = [
    dict(state_transfer="keep", adaptive_refresh=None, refresh="svd"),
    dict(state_transfer="rotate", adaptive_refresh=None, refresh="svd"),
    dict(state_transfer="reset", adaptive_refresh=None, refresh="svd"),
    dict(state_transfer="keep", adaptive_refresh=0.9, refresh="svd"),
    dict(state_transfer="keep", adaptive_refresh=None, refresh="subspace_iter"),
]


def _model(seed):
    require("transformers", "benches/bench_refresh_policies.py")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _stream(task, g, batch=8, length=24):
    """'search': tokens 0–63 with a +1 successor rule; 'rec': tokens 32–95 with a +3 rule (conflicting)."""
    lo, stride = (0, 1) if task == "search" else (32, 3)
    start = torch.randint(lo, lo + 64, (batch, 1), generator=g)
    noise = (torch.rand(batch, length, generator=g) < 0.1).long() * torch.randint(0, 7, (batch, length), generator=g)
    return lo + (start - lo + stride * torch.arange(length) + noise) % 64


def run(policy, *, steps, gap, seed):
    model = _model(seed)
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(inner, model=model, tasks=["search", "rec"], rank=8, task_rank=4,
                                 update_proj_gap=gap, **policy)
    g = torch.Generator().manual_seed(1000 + seed)
    tail = {"search": [], "rec": []}
    refreshes = 0
    for step in range(steps):
        batch = {t: _stream(t, g) for t in ("search", "rec")}
        losses = {t: model(input_ids=ids, labels=ids).loss for t, ids in batch.items()}
        refreshes += sum(w.step >= w.next_refresh for w in opt.subspaces)
        opt.backward(losses)
        opt.step()
        opt.zero_grad()
        if step >= steps - 20:
            for t, l in losses.items():
                tail[t].append(float(l.detach()))
    return {t: statistics.mean(v) for t, v in tail.items()}, refreshes / len(opt.subspaces)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--gap", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for policy in POLICIES:
        t0 = time.perf_counter()
        results = [run(policy, steps=args.steps, gap=args.gap, seed=s) for s in range(args.seeds)]
        rows.append({**{k: str(v) for k, v in policy.items()},
                     "search_loss": statistics.median(r[0]["search"] for r in results),
                     "rec_loss": statistics.median(r[0]["rec"] for r in results),
                     "refreshes_per_weight": statistics.median(r[1] for r in results),
                     "seconds": time.perf_counter() - t0})
    print_table(rows)
    command = "python benches/bench_refresh_policies.py " + " ".join(argv or sys.argv[1:])
    write_csv(RESULTS_DIR / "refresh_policies_cpu.csv", rows)
    write_markdown(RESULTS_DIR / "refresh_policies_cpu.md",
                   f"Refresh policies: final training loss (mean of the last 20 steps, median of {args.seeds} seeds)",
                   rows,
                   preamble=f"Machine: {machine_description()}\n\nCommand: `{command.strip()}`",
                   notes=f"{args.steps} steps, gap {args.gap}, rank 8 / task 4, AdamW lr 3e-3, tiny Llama (2 layers, "
                         "hidden 64), two synthetic token streams with conflicting successor rules.")


if __name__ == "__main__":
    main()
