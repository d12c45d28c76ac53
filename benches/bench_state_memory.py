"""Optimizer-state bytes of GEMS vs the plain inner AdamW on a SmolLM2-shaped stack of weights.

Counts what each optimizer keeps between steps after one real step: AdamW's two moments per weight, and
for GEMS the inner AdamW's moments of every subspace's coordinates plus the fp32 bases. Also prints what
GEMS holds only transiently during a step (the per-task gradient stash), since that is real peak memory.

    python benches/bench_state_memory.py [--layers 30] [--rank 64] [--task-rank 32]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings

import torch
from torch import nn

import gems

SHAPES = [(576, 576), (576, 1536), (1536, 576)]  # attention square, MLP down, MLP up/gate (out × in)


class Stack(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(n, m, bias=False) for _ in range(layers) for m, n in SHAPES)


def _state_bytes(state) -> int:
    return sum(v.numel() * v.element_size() for s in state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def _one_step(model, opt, tasks):
    for layer in model.layers:
        layer.weight.grad = None
    if tasks:
        losses = {t: sum((layer.weight * torch.randn_like(layer.weight)).sum() for layer in model.layers)
                  for t in tasks}
        opt.backward(losses)
    else:
        for layer in model.layers:
            layer.weight.grad = torch.randn_like(layer.weight)
    opt.step()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--task-rank", type=int, default=32)
    ap.add_argument("--refresh", default="subspace_iter", help="basis engine (does not change the memory)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "state_memory_cpu.md"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    model = Stack(args.layers)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _one_step(model, adamw, None)
    adamw_bytes = _state_bytes(adamw.state)

    model = Stack(args.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model=model,
                                 tasks=["search", "rec"], rank=args.rank, task_rank=args.task_rank,
                                 refresh=args.refresh)
    _one_step(model, opt, ["search", "rec"])
    moments = _state_bytes(opt.inner.state)
    bases = sum(b.numel() * b.element_size() for w in opt.subspaces for b in w.bases.values() if b is not None)
    coords = sum(c.numel() * c.element_size() for w in opt.subspaces for c in w.coords.values())
    stash = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    gems_bytes = moments + bases + coords

    mib = 1 / 2**20
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    rows = [
        ("weights (fp32)", sum(p.numel() * 4 for p in model.parameters())),
        ("AdamW state (2 moments)", adamw_bytes),
        ("GEMS inner AdamW moments of coordinates", moments),
        ("GEMS bases (fp32)", bases),
        ("GEMS coordinate tensors between steps (zero, so released)", coords),
        ("GEMS state total", gems_bytes),
        ("GEMS transient per-task gradient stash (2 tasks, during a step)", stash),
    ]
    lines = [f"# Optimizer-state memory, SmolLM2-shaped stack ({args.layers} × {SHAPES}), "
             f"rank {args.rank} / task {args.task_rank}, 2 tasks",
             "", f"Machine: {machine}. Command: `python benches/bench_state_memory.py "
             f"--layers {args.layers} --rank {args.rank} --task-rank {args.task_rank}`", "",
             "| what | MiB |", "|---|---:|"]
    lines += [f"| {name} | {b * mib:.1f} |" for name, b in rows]
    lines += ["", f"**GEMS state / AdamW state = {gems_bytes / adamw_bytes:.1%}** (target ≤ 30%)"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
