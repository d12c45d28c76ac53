"""The experiment that decides: one LLM fine-tuned on search + recommendation by every method, tuned alike.

Run (fully offline)::

    python -m gems.recipes.unified_sr                    # default preset (CPU: <= 15 min)
    python -m gems.recipes.unified_sr --preset full      # experiment of record (CPU: <= 150 min; resumable)
    python -m gems.recipes.unified_sr --preset smoke     # a few minutes, for CI-like checks
    python -m gems.recipes.unified_sr --preset full --device cuda

Protocol (every method gets the same of everything but its update rule):
    * Model SmolLM2-135M-Instruct (``--model``: any local HF causal LM); items are new atomic tokens whose
      embedding rows start at the mean embedding of the item title's tokens (the model already knows those
      words; a random row would start outside its input distribution). Only the item rows of the tied
      embedding train, in every method (:mod:`gems.recipes.methods`).
    * Data MovieLens-100K (``--interactions``/``--items``: any CSV pair), per-user leave-one-out by time.
      Recommendation trains on every transition of the training split (windows of :mod:`prompts`, each
      transition exactly once per epoch), search on (history, generated query -> item) examples of the
      same transitions. Loss on the answers only, softmax over the item tokens.
    * Budget: the same seeded batch sequence and the same number of steps for every method; single-task
      models fill the whole batch with their task, so every method sees about the same number of tokens
      (``tokens`` column).
    * Tuning: each method's learning rate is chosen from ``lr_grid`` (>= 3 values in the full preset) by
      validation NDCG@10 (mean over its tasks) at seed 0; validation users are disjoint from nothing (all
      users have a validation and a test target), but the validation *targets* precede the test targets in
      time and the test split is read once per final run: the chosen seed-0 model (kept in memory) and the
      other seeds' runs at the chosen lr.
    * Statistics: every user (or ``eval_users``) in the test split, full-catalogue ranking with the user's
      own history masked (headline) and 1 + 99 sampled candidates; mean ± std over seeds and a paired
      bootstrap 95 % CI over users of (GEMS - each method) on the per-user metric averaged over seeds.
    * Baselines (same split): popularity, item-transition counts (last 3 items), lexical TF-IDF search,
      the base model.
    * Retention: perplexity on held-out general text and a multiple-choice cloze probe built from it
      (:mod:`probe`), before and after.

Outputs under ``--out`` (stem ``unified_sr_<device>[_<preset>]``): ``.md`` (tables, verdict, command,
machine), ``.csv``, ``.json`` (everything), ``_runs.jsonl`` (one line per finished run: a rerun with the
same command skips them; ``--fresh`` starts over), ``_pareto.png``, ``_val_ndcg.png``,
``_gems_conflict.png`` (the plots need matplotlib, the ``plot`` extra; without it they are skipped with one line
saying so).

Bad input (a missing wheel or data file, an unknown model path, an items file without a needed column,
an empty split) ends with one line ``error: ...`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import hashlib
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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from gems.errors import DataError, GemsError, MissingDependencyError, MissingResourceError
from gems.recipes import baselines as B
from gems.recipes import data as D
from gems.recipes import evaluate as E
from gems.recipes.methods import METHODS, Hyper, build_method, method_packages
from gems.recipes.prompts import Prompts, TrainRow, rec_windows
from gems.resources import require

__all__ = ["Config", "PRESETS", "parse_args", "main", "run", "METHODS"]

TASKS = ("search", "rec")  # GEMS task order; diagnostics keys read "cos/search-rec"
# options added without a version bump: at this value a run is what it was before the option existed, so the
# option stays out of the run-log key and logs written before it keep resuming
_NEW_AT_DEFAULT = {"moments": "fp32"}
RECIPE_VERSION = 4  # bump when a change alters what a finished run in a run log would contain (2: GEMS one backward; 3: task heads;
                    # 4: collaborative item tokens, standardised rec head at its own lr)


# ------------------------------------------------------------------------------------------------ config
@dataclass
class Config:
    preset: str = "default"
    methods: tuple[str, ...] = ("adamw", "lora", "gems")
    lr_grid: tuple[float, ...] = ()          # empty: the preset's per-method choice (LR_CHOSEN)
    seeds: tuple[int, ...] = (0,)
    steps: int = 40
    rec_batch: int = 6                       # recommendation windows per step
    search_batch: int = 8                    # search examples per step
    window: int = 12
    search_history: int = 3
    item_lr: float = 3e-3
    head_lr: float = 3e-5                    # the search head; 3e-4 scored lower on validation (0.137 vs 0.155, adamw pilot)
    rec_head_lr: float = 1e-3                # the rec head's map A (starts at 0); 3e-3 tied on validation (0.2138 vs 0.2144)
    item_init: str = "collab"                # title: item tokens start at their title's mean embedding; collab: + factors
                                             # (validation rec 0.085 vs 0.007 with titles: gems.recipes.collab)
    collab_dim: int = 64                     # rank of the training split's next-item PPMI factorisation (gems.recipes.collab)
    collab_weight: float = 1.0               # injected factor norm / title-mean norm (2: validation rec 0.056, ppl 86)
    collab_avoid: float = 0.99               # inject outside the directions holding this share of general-text final-hidden energy
    head_stats: int = 128                    # training windows whose hidden states standardise the rec head's input
    head_init: float = 1.0                   # the search head's W starts at head_init × the item rows
    rec_head: str = "bilinear"               # bilinear: h·A·e_j + prior, A = 0 at the start; rows: an ItemHead
    rec_head_init: float = 0.0               # rows: the rec head's W starts at rec_head_init × the item rows
    moments: str = "fp32"                    # 8bit: the GEMS methods' inner AdamW keeps 8-bit moments
    item_scores: str = "head"                # head: one ItemHead per task (rows + popularity prior); tied: the LM head's rows
    weight_decay: float = 0.01
    warmup: float = 0.05
    rank: int = 32
    task_rank: int = 16
    gap: int = 16
    lora_r: int = 16
    refresh: str = "subspace_iter"
    eval_users: int | None = 200             # None: every user
    val_users: int = 100
    val_points: int = 2                      # validation evaluations per run (the last one selects)
    num_negatives: int = 99
    ns_threshold: float = 2e-2
    ns_mode: str = "absolute"
    calib_texts: int = 16
    ppl_texts: int = 16
    cloze_items: int = 32
    text_length: int = 96
    eval_batch_size: int = 64
    data_seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    threads: int | None = None
    model: str | None = None
    interactions: str | None = None
    items: str | None = None
    out: str = os.path.join("benches", "results")
    tag: str | None = None
    plots: bool = True
    progress: bool = True
    fresh: bool = False
    argv: list[str] = field(default_factory=list)


# The learning rate each method uses when no grid is run (default and smoke presets): the choice of the
# full preset's validation grid (benches/results/unified_sr_cpu_full.md); until that run exists, of the
# pilot grid recorded in CHANGELOG.md.
LR_CHOSEN = {"adamw": 3e-5, "adamw_rec": 3e-5, "adamw_search": 3e-5, "lora": 1e-3, "galore": 3e-4,
             "galore_ns": 3e-4, "gems_nons": 3e-4, "gems": 3e-4}
LR_GRIDS = {"adamw": (3e-5, 1e-4, 3e-4), "adamw_rec": (3e-5, 1e-4, 3e-4), "adamw_search": (3e-5, 1e-4, 3e-4),
            "lora": (3e-4, 1e-3, 3e-3), "galore": (1e-4, 3e-4, 1e-3), "galore_ns": (1e-4, 3e-4, 1e-3),
            "gems_nons": (1e-4, 3e-4, 1e-3), "gems": (1e-4, 3e-4, 1e-3)}

PRESETS: dict[str, dict[str, Any]] = {
    # the README's main job (<= 15 min on 2 CPU cores): three methods at their chosen lr, one seed, 200 test users
    "default": dict(),
    # the experiment of record: every method, a grid of 3 lrs each, 3 seeds, every user
    "full": dict(methods=tuple(METHODS), lr_grid=("grid",), seeds=(0, 1, 2), eval_users=None, val_users=150,
                 val_points=2, cloze_items=48, calib_texts=32),
    # minutes: a pipeline check on the real model and data
    "smoke": dict(methods=("adamw", "gems"), steps=3, rec_batch=2, search_batch=2, eval_users=16, val_users=8,
                  val_points=1, calib_texts=4, ppl_texts=2, cloze_items=8, text_length=32, rank=8, task_rank=4,
                  gap=2),
}


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; choose from {','.join(METHODS)}")
    return tuple(dict.fromkeys(names))


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(dict.fromkeys(float(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise argparse.ArgumentTypeError(f"learning rates must be positive and finite: {text!r}")
    return vals


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("give at least one seed")
    return tuple(dict.fromkeys(vals))


_OVERRIDABLE = ("steps", "rec_batch", "search_batch", "window", "search_history", "item_lr", "head_lr", "rec_head_lr", "item_init", "collab_dim", "collab_weight", "collab_avoid",
                "head_stats", "head_init", "rec_head", "rec_head_init", "moments", "item_scores", "weight_decay", "warmup",
                "rank", "task_rank", "gap", "lora_r", "refresh", "val_users", "val_points", "num_negatives",
                "ns_threshold", "ns_mode", "calib_texts", "ppl_texts", "cloze_items", "text_length", "eval_batch_size",
                "data_seed", "device", "threads", "model", "interactions", "items", "out", "tag")


def parse_args(argv: Sequence[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m gems.recipes.unified_sr",
                                description="Search + recommendation fine-tuning: GEMS against tuned baselines.")
    a = p.add_argument
    a("--preset", choices=tuple(PRESETS), default="default", help="default (<=15 min CPU), full (of record), smoke")
    a("--methods", type=_methods, default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    a("--lr-grid", type=_floats, default=None, help="learning rates tried by every method (validation picks)")
    a("--seeds", type=_ints, default=None, help="seeds of the final runs, e.g. 0,1,2")
    a("--eval-users", type=int, default=None, help="test users (0 = every user)")
    for name in _OVERRIDABLE:
        default = getattr(d, name)
        kind = type(default) if default is not None else str
        if name in ("threads",):
            kind = int
        a("--" + name.replace("_", "-"), type=kind, default=None, help=f"(default {default})")
    a("--bf16", action="store_true", help="bf16 autocast for forward passes (weights and optimizer state stay fp32)")
    a("--no-plots", action="store_true")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--fresh", action="store_true", help="ignore finished runs recorded in <tag>_runs.jsonl")
    ns = p.parse_args(list(argv) if argv is not None else None)
    cfg = Config(preset=ns.preset)
    for k, v in PRESETS[ns.preset].items():
        setattr(cfg, k, v)
    for name in _OVERRIDABLE:
        v = getattr(ns, name)
        if v is not None:
            setattr(cfg, name, v)
    if ns.methods is not None:
        cfg.methods = ns.methods
    if ns.lr_grid is not None:
        cfg.lr_grid = ns.lr_grid
    if ns.seeds is not None:
        cfg.seeds = ns.seeds
    if ns.eval_users is not None:
        cfg.eval_users = None if ns.eval_users == 0 else ns.eval_users
    cfg.bf16, cfg.plots, cfg.progress, cfg.fresh = ns.bf16, not ns.no_plots, not ns.no_progress, ns.fresh
    cfg.argv = list(argv) if argv is not None else sys.argv[1:]
    for name in ("steps", "rec_batch", "search_batch", "window", "val_users", "val_points", "calib_texts", "ppl_texts",
                 "text_length", "eval_batch_size", "lora_r", "gap", "rank"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.eval_users is not None and cfg.eval_users < 1:
        p.error("--eval-users must be >= 1 (or 0 for every user)")
    if cfg.task_rank < 0 or cfg.item_lr <= 0 or cfg.cloze_items < 0 or cfg.search_history < 0:
        p.error("--task-rank, --cloze-items and --search-history must be >= 0 and --item-lr > 0")
    if cfg.item_scores not in ("head", "tied"):
        p.error("--item-scores must be head or tied")
    if cfg.item_init not in ("title", "collab"):
        p.error("--item-init must be title or collab")
    if cfg.collab_dim < 1 or cfg.collab_weight < 0 or cfg.head_stats < 1 or cfg.rec_head_lr <= 0:
        p.error("--collab-dim and --head-stats must be >= 1, --collab-weight >= 0 and --rec-head-lr > 0")
    if not 0 <= cfg.collab_avoid < 1:
        p.error("--collab-avoid must be in [0, 1)")
    if cfg.rec_head not in ("bilinear", "rows"):
        p.error("--rec-head must be bilinear or rows")
    if cfg.moments not in ("fp32", "8bit"):
        p.error("--moments must be fp32 or 8bit")
    from gems.nullspace import MODES
    from gems.refresh import REFRESH_METHODS

    if cfg.refresh not in REFRESH_METHODS:
        p.error(f"--refresh must be one of {', '.join(REFRESH_METHODS)}")
    if cfg.ns_mode not in MODES:
        p.error(f"--ns-mode must be one of {', '.join(MODES)}")
    for name, ok in (("ns_threshold", cfg.ns_threshold > 0), ("head_lr", cfg.head_lr > 0),
                     ("weight_decay", cfg.weight_decay >= 0), ("warmup", 0 <= cfg.warmup < 1),
                     ("num_negatives", cfg.num_negatives >= 1), ("threads", cfg.threads is None or cfg.threads >= 1)):
        if not ok:
            p.error(f"--{name.replace('_', '-')} is out of range: {getattr(cfg, name)!r}")
    if cfg.device not in ("cpu", "cuda"):
        p.error("--device must be cpu or cuda")
    if (cfg.interactions is None) != (cfg.items is None):
        p.error("give both --interactions and --items, or neither (MovieLens-100K)")
    if cfg.tag is None:
        cfg.tag = f"unified_sr_{cfg.device}" + ("" if cfg.preset == "default" else f"_{cfg.preset}")
    return cfg


def grid_of(cfg: Config, method: str) -> tuple[float, ...]:
    if cfg.lr_grid == ("grid",):
        return LR_GRIDS[method]
    return tuple(cfg.lr_grid) or (LR_CHOSEN[method],)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class EvalSet:
    rows: list[list[int]]
    targets: list[int]
    seen: list[list[int]]
    cands: list[list[int]]
    users: list[str]
    histories: list[list[int]]
    queries: list[str | None]

    @property
    def n(self) -> int:
        return len(self.rows)


@dataclass
class Prepared:
    data: D.InteractionData
    loo: D.LeaveOneOut
    prompts: Prompts
    rec_rows: list[TrainRow]
    search_pool: list[tuple[list[int], str, int]]      # (history item indices, query, target index)
    val: dict[str, EvalSet]
    test: dict[str, EvalSet]
    stats: dict[str, Any]
    log_prior: torch.Tensor                              # log(1 + training count) per item
    factors: "tuple[torch.Tensor, torch.Tensor] | None"  # (left, right) collaborative item vectors, or None
    title_rows: "torch.Tensor | None" = None             # the item tokens' title-mean rows (set by init_items)
    hidden_stats: "tuple[torch.Tensor, torch.Tensor] | None" = None  # (mean, std) of the start's hidden states
    avoid: "torch.Tensor | None" = None                 # hidden × k directions the injection stays out of
    _search_cache: dict[int, TrainRow] = field(default_factory=dict)

    def search_row(self, k: int) -> TrainRow:
        row = self._search_cache.get(k)
        if row is None:
            hist, query, target = self.search_pool[k]
            row = self._search_cache[k] = self.prompts.search_train(hist, query, target)
        return row


def _eval_set(split: str, task: str, users: list[str], data: D.InteractionData, loo: D.LeaveOneOut, prompts: Prompts,
              queries: D.QueryGenerator, cfg: Config) -> EvalSet:
    idx = data.item_index
    keep = set(users)
    exs = [ex for ex in D.make_examples(data, split, task, max_history=cfg.window, seed=cfg.data_seed, splits=loo,
                                        queries=queries) if ex.user in keep]
    if not exs:
        raise DataError(f"the {task!r} {split} split is empty for the chosen users; use more users")
    hists = [[idx[i] for i in ex.history] for ex in exs]
    rows = [prompts.rec_prompt(h) if task == "rec" else prompts.search_prompt(h, ex.query) for h, ex in zip(hists, exs)]
    seen = []
    for ex in exs:
        prior = list(loo.train.get(ex.user, ()))
        if split == "test":
            prior.append(loo.valid[ex.user])
        seen.append(sorted({idx[i] for i in prior}))
    cands = [[idx[i] for i in c] for c in D.candidate_lists(exs, data, num_negatives=cfg.num_negatives,
                                                             seed=cfg.data_seed)]
    return EvalSet(rows, [idx[ex.target] for ex in exs], seen, cands, [ex.user for ex in exs], hists,
                   [ex.query for ex in exs])


def prepare(cfg: Config, tokenizer: Any, item_tokens: Sequence[int], data: D.InteractionData) -> Prepared:
    loo = D.leave_one_out(data)
    idx = data.item_index
    prompts = Prompts(tokenizer, item_tokens, noun=data.item_noun, window=cfg.window, search_history=cfg.search_history)
    queries = D.QueryGenerator(seed=cfg.data_seed, noun=data.item_noun)
    rec_rows = [prompts.rec_train(c) for u in data.histories for c in
                rec_windows([idx[i] for i in loo.train.get(u, ())], cfg.window)]
    if not rec_rows:
        raise DataError("no user has two training interactions: nothing to train recommendation on")
    pool = []
    for ex in D.make_examples(data, "train", "search", max_history=max(cfg.search_history, 1), seed=cfg.data_seed,
                              splits=loo, queries=queries):
        pool.append(([idx[i] for i in ex.history], ex.query, idx[ex.target]))
    evaluable = sorted((u for u in data.histories if u in loo.valid), key=D._natural_key)
    if not evaluable:
        raise DataError("no user has enough interactions (>= 3) for validation and test; use more data")
    rng = random.Random(cfg.data_seed)
    test_users = evaluable if cfg.eval_users is None or cfg.eval_users >= len(evaluable) else sorted(
        rng.sample(evaluable, cfg.eval_users), key=D._natural_key)
    val_users = sorted(random.Random(cfg.data_seed + 1).sample(evaluable, min(cfg.val_users, len(evaluable))),
                       key=D._natural_key)
    val = {t: _eval_set("valid", t, val_users, data, loo, prompts, queries, cfg) for t in ("rec", "search")}
    test = {t: _eval_set("test", t, test_users, data, loo, prompts, queries, cfg) for t in ("rec", "search")}
    stats = {"source": data.source, "users": len(data.histories), "items": len(data.items),
             "interactions": data.num_interactions, "rec_windows": len(rec_rows),
             "rec_transitions": sum(r.targets for r in rec_rows), "search_examples": len(pool),
             "test_users": len(test_users), "val_users": len(val_users),
             "rec_prompt_tokens_mean": round(sum(map(len, test["rec"].rows)) / test["rec"].n, 1),
             "search_prompt_tokens_mean": round(sum(map(len, test["search"].rows)) / test["search"].n, 1)}
    train_seqs = {u: [idx[i] for i in s] for u, s in loo.train.items()}
    pop = B.popularity(train_seqs, len(data.items))
    factors = None
    if cfg.item_init == "collab":
        from gems.recipes.collab import transition_factors

        factors = transition_factors(train_seqs, len(data.items), min(cfg.collab_dim, len(data.items)))
    return Prepared(data, loo, prompts, rec_rows, pool, val, test, stats, torch.log1p(pop).float(), factors)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def schedule(prep: Prepared, cfg: Config, tasks: tuple[str, ...], seed: int) -> list[dict[str, list[int]]]:
    """The per-step example indices: epochs over a seeded shuffle of each task's pool. Single-task methods
    take both halves of the batch from their task (same steps, about the same tokens)."""
    size = {"rec": len(prep.rec_rows), "search": len(prep.search_pool)}
    per = {"rec": cfg.rec_batch, "search": cfg.search_batch}
    if len(tasks) == 1:
        t = tasks[0]
        other = "search" if t == "rec" else "rec"
        probe = random.Random("gems-token-probe")   # mean row length from a seeded sample of each pool
        tok = {"rec": _mean([len(prep.rec_rows[k].ids) for k in probe.sample(range(size["rec"]), min(512, size["rec"]))]),
               "search": _mean([len(prep.search_row(k).ids)
                                for k in probe.sample(range(size["search"]), min(512, size["search"]))])}
        per = {t: per[t] + max(1, round(per[other] * tok[other] / tok[t]))}
    out: list[dict[str, list[int]]] = []
    rngs = {t: random.Random(f"gems-order-{seed}-{t}") for t in per}  # str seeds hash stably
    orders: dict[str, list[int]] = {t: [] for t in per}
    for _ in range(cfg.steps):
        entry = {}
        for t, n in per.items():
            picks = []
            for _ in range(n):
                if not orders[t]:
                    orders[t] = list(range(size[t]))
                    rngs[t].shuffle(orders[t])
                picks.append(orders[t].pop())
            entry[t] = picks
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------ model
def load_fresh(cfg: Config, titles: list[str]) -> tuple[Any, Any, list[int]]:
    """A freshly loaded model and tokenizer with the item tokens added (same result every call)."""
    from gems.recipes.model import add_item_tokens, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    ids = add_item_tokens(model, tokenizer, titles)
    model.config.use_cache = False
    return model.to(cfg.device), tokenizer, ids


@torch.no_grad()
def init_items(model: Any, prep: Prepared, cfg: Config) -> None:
    """Give a freshly loaded model's item tokens the recipe's start (the same for every method): the title
    means, plus the collaborative left factors when ``item_init == "collab"`` (outside the directions of the
    general text's final hidden states, docs/design_notes.md §16). The first call also records the title
    rows (the search head starts there), those directions and the standardisation of the rec head's input."""
    emb = model.get_input_embeddings().weight
    ids = torch.as_tensor(prep.prompts.item_tokens, device=emb.device)
    if prep.title_rows is None:
        prep.title_rows = emb[ids].detach().float().cpu().clone()
    if prep.factors is not None:
        from gems.recipes.collab import energy_directions, inject_factors

        if prep.factors[0].shape[1] > emb.shape[1]:  # a model narrower than the factors: keep the leading ones
            prep.factors = tuple(f[:, :emb.shape[1]] for f in prep.factors)
        if prep.avoid is None:
            # the general-text calibration texts (those the null space is calibrated on), seen by the start
            texts = _general_texts("calibration", cfg)[:cfg.calib_texts]
            d = energy_directions(_final_hidden(model, _general_batches(prep.prompts.tokenizer, texts, cfg, False), cfg),
                                  cfg.collab_avoid)
            prep.avoid = d[:, :emb.shape[1] - prep.factors[0].shape[1]]
        rows = inject_factors(prep.title_rows, prep.factors[0], cfg.collab_weight, seed=cfg.data_seed,
                              avoid=prep.avoid)
        emb[ids] = rows.to(emb.device, emb.dtype)
    if prep.hidden_stats is None:
        prep.hidden_stats = _hidden_stats(model, prep, cfg)


@torch.no_grad()
def _hidden_stats(model: Any, prep: Prepared, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the final hidden state over every position of a seeded sample of
    training windows (the starting model; what the rec head standardises with)."""
    rng = random.Random(f"gems-head-stats-{cfg.data_seed}")
    rows = [prep.rec_rows[k].ids for k in rng.sample(range(len(prep.rec_rows)), min(cfg.head_stats, len(prep.rec_rows)))]
    pad = _pad_id(prep.prompts.tokenizer)
    batches = [E.collate_left(rows[k:k + cfg.eval_batch_size], pad, device=cfg.device)
               for k in range(0, len(rows), cfg.eval_batch_size)]
    h = _final_hidden(model, batches, cfg)
    return h.mean(0), h.std(0).clamp_min(1e-6)


@torch.no_grad()
def _final_hidden(model: Any, batches: Sequence[dict[str, torch.Tensor]], cfg: Config) -> torch.Tensor:
    """The final hidden state (what the heads and the tied LM head read) at every unpadded position, fp32 CPU."""
    was, hs = model.training, []
    model.eval()
    for batch in batches:
        batch = {k: v.to(cfg.device) for k, v in batch.items() if k != "labels"}  # left padding keeps position_ids
        h = model.get_decoder()(**batch, use_cache=False).last_hidden_state.float()
        hs.append(h[batch["attention_mask"].bool()].cpu())
    model.train(was)
    return torch.cat(hs)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _general_texts(split: str, cfg: Config) -> list[str]:
    from gems.corpus import load_general_corpus

    return load_general_corpus(split, seed=cfg.data_seed)


def _general_batches(tokenizer: Any, texts: list[str], cfg: Config, with_labels: bool) -> list[dict[str, torch.Tensor]]:
    from gems.corpus import token_batches

    return list(token_batches(tokenizer, texts, max_length=cfg.text_length, batch_size=8, with_labels=with_labels))


def _autocast(cfg: Config) -> torch.dtype | None:
    return torch.bfloat16 if cfg.bf16 else None


def _bar(cfg: Config, **kw):
    require("tqdm", _FEATURE)
    from tqdm.auto import tqdm

    return tqdm(disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr, **kw)


# ------------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Validation/test ranking, retention (perplexity, cloze) of one model; shared by every run."""

    def __init__(self, cfg: Config, prep: Prepared, item_ids: torch.Tensor, pad_id: int, tokenizer: Any,
                 ppl_batches: list[dict[str, torch.Tensor]], cloze: list[Any]):
        self.cfg, self.prep, self.item_ids, self.pad_id = cfg, prep, item_ids, pad_id
        self.tokenizer, self.ppl_batches, self.cloze = tokenizer, ppl_batches, cloze

    def ranks(self, model: Any, sets: dict[str, EvalSet], desc: str, head: Any = None) -> dict[str, dict[str, list[int]]]:
        out = {}
        with _bar(self.cfg, total=sum(s.n for s in sets.values()), desc=desc, leave=False, unit="ex") as bar:
            for task, s in sets.items():
                scores = E.score_items(model, s.rows, self.item_ids, self.pad_id, batch_size=self.cfg.eval_batch_size,
                                       device=self.cfg.device, head=None if head is None else head[task],
                                       autocast_dtype=_autocast(self.cfg),
                                       progress=bar)
                full, sampled = E.example_ranks(scores, s.targets, seen=s.seen, candidates=s.cands)
                out[task] = {"full": full.tolist(), "sampled": sampled.tolist()}
        return out

    def retention(self, model: Any, *, cloze: bool, ppl: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if ppl:
            out["ppl"] = E.perplexity(model, self.ppl_batches, device=self.cfg.device, autocast_dtype=_autocast(self.cfg))
        if cloze and self.cloze:
            from gems.recipes.probe import cloze_scores

            hits = cloze_scores(model, self.tokenizer, self.cloze, device=self.cfg.device)
            out["cloze"] = [bool(h) for h in hits]
        return out


def baseline_ranks(prep: Prepared, sets: dict[str, EvalSet]) -> dict[str, dict[str, dict[str, list[int]]]]:
    """Non-LLM baselines on ``sets``: popularity, item transitions (last 3 items), the transition factors the
    item tokens carry (when ``item_init == "collab"``), lexical search."""
    data, loo, idx = prep.data, prep.loo, prep.data.item_index
    n_items = len(data.items)
    train = {u: [idx[i] for i in s] for u, s in loo.train.items()}
    pop = B.popularity(train, n_items)
    counts = B.transition_counts(train, n_items)
    texts = [B.item_text(it.display_title, it.genres, it.year) for it in data.items.values()]
    out: dict[str, dict[str, dict[str, list[int]]]] = {}
    for task, s in sets.items():
        scores = {"popularity": B.popularity_scores(s.n, pop),
                  "transition": B.transition_scores(s.histories, counts, pop, last=3)}
        if prep.factors is not None:
            scores["factors"] = B.factor_scores(s.histories, *prep.factors, pop, last=3)
        if task == "search":
            scores["lexical"] = B.lexical_scores(s.queries, texts, pop)
        for name, sc in scores.items():
            full, sampled = E.example_ranks(sc, s.targets, seen=s.seen, candidates=s.cands)
            out.setdefault(name, {})[task] = {"full": full.tolist(), "sampled": sampled.tolist()}
    return out


# ------------------------------------------------------------------------------------------------ training
def _cosine(step: int, cfg: Config) -> float:
    warm = max(1, int(round(cfg.warmup * cfg.steps)))
    if step < warm:
        return (step + 1) / warm
    prog = (step - warm) / max(1, cfg.steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(prog, 1.0)))


def _val_steps(cfg: Config) -> list[int]:
    pts = max(1, cfg.val_points)
    return sorted({max(1, round(cfg.steps * (k + 1) / pts)) for k in range(pts)})


def train_run(method: str, lr: float, seed: int, cfg: Config, prep: Prepared, titles: list[str], ev: Evaluator,
              nullspace: Any) -> tuple[dict[str, Any], Any]:
    """Train one (method, lr, seed); returns its record (validation curve, retention, timings) and the model."""
    torch.manual_seed(seed)
    random.seed(seed)
    model, tokenizer, ids = load_fresh(cfg, titles)
    init_items(model, prep, cfg)
    hp = Hyper(**{f.name: getattr(cfg, f.name) for f in fields(Hyper) if f.name != "seed"}, seed=seed)
    spec = METHODS[method]
    head = new_head(cfg, prep, model)
    model, opt, info = build_method(method, model, ids, lr, hp, nullspace if spec.nullspace else None,
                                    extra=head_groups(head, cfg))
    model.train()
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer if hasattr(opt, "protect") else opt,
                                              lambda s: _cosine(s, cfg))
    item_ids = ev.item_ids
    plan = schedule(prep, cfg, spec.tasks, seed)
    checks = set(_val_steps(cfg))
    curve, losses, diag = [], [], []
    train_s = val_s = 0.0
    tokens = 0
    diverged = 0
    is_gems = spec.optimizer == "gems"
    with _bar(cfg, total=cfg.steps, desc=f"{method} lr={lr:g} s={seed}", leave=False, unit="step") as bar:
        for step, entry in enumerate(plan):
            t0 = time.perf_counter()
            rows = {"rec": [prep.rec_rows[k] for k in entry.get("rec", ())],
                    "search": [prep.search_row(k) for k in entry.get("search", ())]}
            rows = {t: r for t, r in rows.items() if r}
            tokens += sum(len(r.ids) for rs in rows.values() for r in rs)
            order = [t for t in ("rec", "search") if t in rows]
            flat = [r for t in order for r in rows[t]]
            # one forward over the mixed batch for every method (GEMS too: one backward splits its task gradients)
            per = E.row_item_losses(model, flat, ev.pad_id, item_ids, head=head, device=cfg.device,
                                    tasks=None if head is None else [t for t in order for _ in rows[t]],
                                    autocast_dtype=_autocast(cfg))
            task_loss, start = {}, 0
            for t in order:
                n = sum(r.targets for r in rows[t])
                task_loss[t] = per[start:start + n].mean()
                start += n
            if is_gems:
                gems_backward(opt, per, [(t, rows[t]) for t in order])
                if step + 1 in checks or step == 0:
                    td = time.perf_counter()
                    diag.append({"step": step + 1, "diag": opt.diagnostics()})
                    t0 += time.perf_counter() - td   # opt-in logging, not training time
            else:
                task_backward(opt, task_loss, gems=False)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            train_s += time.perf_counter() - t0
            losses.append({t: float(v.detach()) for t, v in task_loss.items()})
            if not all(math.isfinite(v) for v in losses[-1].values()):
                diverged = step + 1
                break
            bar.set_postfix({t: f"{v:.2f}" for t, v in losses[-1].items()})
            bar.update(1)
            if step + 1 in checks:
                tv = time.perf_counter()
                curve.append({"step": step + 1, **E.rank_metrics(ev.ranks(model, prep.val, "valid", head))})
                val_s += time.perf_counter() - tv
    state_mib = optimizer_state_mib(opt)
    if diverged:  # a non-finite loss: the run is kept (and reported) but can never be selected
        curve.append({"step": diverged, **E.rank_metrics(ev.ranks(model, prep.val, "valid", head))})
    rec = {"method": method, "lr": lr, "seed": seed, "train_s": train_s, "val_s": val_s, "tokens": tokens,
           "state_mib": state_mib, "curve": curve, "val": curve[-1], "losses": losses, "diagnostics": diag,
           "retention": ev.retention(model, cloze=False), "diverged_at": diverged, **info}
    rec["select"] = -1.0 if diverged else _selection_score(rec["val"], spec.tasks)
    del opt
    return rec, Trained(model, head)


@dataclass
class Trained:
    """A trained model and its item head (None for tied item scores)."""

    model: Any
    head: Any = None

    def to(self, device: str) -> "Trained":
        self.model.to(device)
        if self.head is not None:
            self.head.to(device)
        return self


def new_head(cfg: Config, prep: Prepared, model: Any) -> Any:
    if cfg.item_scores == "tied":
        return None
    from gems.recipes.model import BilinearItemHead, ItemHead, TaskHeads

    if prep.title_rows is None or prep.hidden_stats is None:
        raise RuntimeError("new_head needs init_items(model, prep, cfg) first")
    rows = prep.title_rows
    n, dim = len(prep.data.items), model.config.hidden_size
    # the rec head scores against the collaborative right factors when the tokens carry the left ones
    vectors = rows if prep.factors is None else prep.factors[1]
    mean, std = prep.hidden_stats
    rec = (BilinearItemHead(vectors, prep.log_prior, hidden_size=dim, center=mean, scale=std) if cfg.rec_head == "bilinear"
           else ItemHead(n, dim, prep.log_prior, cfg.rec_head_init * rows))
    return TaskHeads({"search": ItemHead(n, dim, prep.log_prior, cfg.head_init * rows), "rec": rec}).to(cfg.device)


def task_backward(opt: Any, task_loss: dict[str, torch.Tensor], *, gems: bool) -> None:
    """The one multi-task objective of every method: equal task weights. GEMS gets ``num_samples`` 1:1 so
    its shared gradient sum_t N_t/N G_t is the gradient of the mixed methods' mean of the task losses."""
    if gems:
        opt.backward(task_loss, num_samples={t: 1 for t in task_loss})
    else:
        (sum(task_loss.values()) / len(task_loss)).backward()


def gems_backward(opt: Any, per_target: torch.Tensor, rows: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """The same objective as ``task_backward(gems=True)`` in one backward: each row's loss is the mean over
    its targets, weighted by targets / (its task's targets), so every task weighs 1 (equal task weights) and
    a task's loss is the mean over its targets."""
    row_loss, ids, weights, start = [], [], [], 0
    for t, rs in rows:
        total = sum(r.targets for r in rs)
        for r in rs:
            row_loss.append(per_target[start:start + r.targets].mean())
            ids.append(t)
            weights.append(r.targets / total)
            start += r.targets
    opt.backward(torch.stack(row_loss), task_ids=ids, row_weights=weights)


def head_groups(head: Any, cfg: Config) -> list[dict[str, Any]]:
    """The item heads' parameter groups: each head at its own lr (the rec map starts at 0 and must move)."""
    if head is None:
        return []
    return [{"params": list(head[t].parameters()), "lr": cfg.rec_head_lr if t == "rec" else cfg.head_lr}
            for t in head.heads]


def _selection_score(val: dict[str, float], tasks: Sequence[str]) -> float:
    return sum(val[f"{t}/ndcg@10"] for t in tasks) / len(tasks)


def fingerprint(prep: Prepared, model: Any) -> str:
    """A hash of the evaluation examples (users, targets, prompts) and the model's architecture and first
    weights: a run log only resumes runs made on the same data and model."""
    h = hashlib.sha256()
    for sets in (prep.val, prep.test):
        for t in sorted(sets):
            s = sets[t]
            h.update(json.dumps([s.users, s.targets, s.rows], separators=(",", ":")).encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    first = next(model.parameters()).detach().float().cpu()
    h.update(first.flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:16]


def optimizer_state_mib(opt: Any) -> float:
    """MiB of the optimizer's state tensors (+ GEMS' bases)."""
    inner = getattr(opt, "optimizer", None) if hasattr(opt, "protect") else None
    opt = inner or opt
    seen: set[int] = set()
    # GEMS: the inner optimizer's state over coordinates (opt.state's entries by weight hold copies of the bases)
    total = E.state_bytes(getattr(getattr(opt, "inner", opt), "state", {}), seen)
    for w in getattr(opt, "subspaces", []) if hasattr(opt, "subspaces") else []:
        total += E.state_bytes(dict(w.bases), seen)
    return total / 2**20


def nullspace_mib(ns: Any) -> float:
    if ns is None:
        return 0.0
    return sum(ns._get(m).numel() * 4 for m in ns.modules) / 2**20


# ------------------------------------------------------------------------------------------------ run log
class RunLog:
    """Finished runs as JSON lines keyed by the configuration that decides them: a rerun skips them."""

    def __init__(self, path: str, cfg: Config, fresh: bool, fingerprint: str = ""):
        """``fingerprint``: what the config does not show (the evaluation users and targets, the model)."""
        self.path = path
        keep = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in (
            "methods", "lr_grid", "seeds", "threads", "out", "tag", "plots", "progress", "fresh", "argv",
            "preset", "eval_batch_size")}
        for name, value in _NEW_AT_DEFAULT.items():  # added after the run logs of this recipe version
            if keep.get(name) == value:
                del keep[name]
        from gems.version import __version__

        keep.update(recipe=RECIPE_VERSION, gems=__version__, fingerprint=fingerprint)
        self.key = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.done: dict[tuple[str, str, float, int], dict[str, Any]] = {}
        if fresh and os.path.exists(path):
            os.remove(path)
        if os.path.exists(path):
            with open(path, "rb+") as f:   # a line cut by a kill: drop it so the next record starts clean
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill: that run is redone
                    if r.get("key") == self.key:
                        self.done[(r["kind"], r["method"], float(r["lr"]), int(r["seed"]))] = r

    def get(self, kind: str, method: str, lr: float, seed: int) -> dict[str, Any] | None:
        return self.done.get((kind, method, float(lr), int(seed)))

    def put(self, kind: str, rec: dict[str, Any]) -> None:
        rec = dict(rec, kind=kind, key=self.key)
        self.done[(kind, rec["method"], float(rec["lr"]), int(rec["seed"]))] = rec
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ run
_FEATURE = "python -m gems.recipes.unified_sr"


def check_dependencies(cfg: Config) -> None:
    """Before any work: import every optional package the run needs (transformers, tqdm, and each method's
    library), so a missing one ends the run at once with the extra that installs it, not after minutes of
    training. Without matplotlib the plots are skipped (``cfg.plots`` set False) with one line on stderr
    saying how to enable them."""
    for module in ("transformers", "tqdm"):
        require(module, _FEATURE)
    for module, feature in method_packages(cfg.methods).items():
        require(module, f"{feature} of {_FEATURE}")
    if cfg.plots:
        try:
            require("matplotlib", "the PNG plots")
        except MissingDependencyError as exc:
            cfg.plots = False
            print(f"plots skipped: {exc} to enable them (--no-plots hides this line)", file=sys.stderr)


def run(cfg: Config) -> dict[str, Any]:
    """Tune, train the final seeds and evaluate every method of ``cfg``; write the outputs; return the report."""
    t_all = time.perf_counter()
    check_dependencies(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise MissingResourceError("--device cuda but torch sees no CUDA device; use --device cpu")
    torch.manual_seed(cfg.data_seed)
    data = D.load_interactions(cfg.interactions, cfg.items)
    titles = data.titles()
    base, tokenizer, ids = load_fresh(cfg, titles)
    out_emb = base.get_output_embeddings()
    if out_emb is not None and out_emb.weight is not base.get_input_embeddings().weight:
        # the shared rule "only item rows of the vocabulary train" is written for tied embeddings
        raise DataError("the benchmark needs a model with tied input/output embeddings (tie_word_embeddings)")
    prep = prepare(cfg, tokenizer, ids, data)
    init_items(base, prep, cfg)
    print(f"data: {prep.stats}", file=sys.stderr)
    pad_id = _pad_id(tokenizer)
    item_ids = torch.tensor(ids, dtype=torch.long, device=cfg.device)
    heldout = _general_texts("heldout", cfg)
    ppl_batches = _general_batches(tokenizer, heldout[:cfg.ppl_texts], cfg, with_labels=True)
    cloze = []
    if cfg.cloze_items:
        from gems.recipes.probe import build_cloze

        cloze = build_cloze(heldout, n_items=cfg.cloze_items, seed=cfg.data_seed)
    ev = Evaluator(cfg, prep, item_ids, pad_id, tokenizer, ppl_batches, cloze)
    log = RunLog(os.path.join(cfg.out, cfg.tag + "_runs.jsonl"), cfg, cfg.fresh, fingerprint(prep, base))

    t0 = time.perf_counter()
    base_rec = log.get("base", "base", 0.0, 0)
    if base_rec is None:
        head0 = new_head(cfg, prep, base)
        base_rec = {"method": "base", "lr": 0.0, "seed": 0,
                    "val": E.rank_metrics(ev.ranks(base, prep.val, "base valid", head0)),
                    "test_ranks": ev.ranks(base, prep.test, "base test", head0),
                    "retention": ev.retention(base, cloze=True)}
        log.put("base", base_rec)
    base_s = time.perf_counter() - t0
    ns, ns_report, calib_s = None, {}, 0.0
    if any(METHODS[m].nullspace for m in cfg.methods):
        from gems.nullspace import NullSpace

        t0 = time.perf_counter()
        calib = _general_batches(tokenizer, _general_texts("calibration", cfg)[:cfg.calib_texts], cfg, with_labels=False)
        calib = [{k: v.to(cfg.device) for k, v in b.items()} for b in calib]
        ns = NullSpace.calibrate(base, calib, side="input", threshold=cfg.ns_threshold, mode=cfg.ns_mode)
        calib_s = time.perf_counter() - t0
        rep = ns.report()
        ns_report = {"modules": len(rep),
                     "protected_fraction": sum(r["protected_dim"] for r in rep.values())
                     / max(1, sum(r["total_dim"] for r in rep.values())),
                     "status": {s: sum(1 for r in rep.values() if r["status"] == s) for s in ("partial", "empty", "full")},
                     "mib": nullspace_mib(ns)}
        print(f"null space: {ns_report} ({calib_s:.0f} s)", file=sys.stderr)
    del base
    bases = baseline_ranks(prep, prep.test)
    bases_val = {n: E.rank_metrics(r) for n, r in baseline_ranks(prep, prep.val).items()}

    plan = [(m, lr) for m in cfg.methods for lr in grid_of(cfg, m)]
    n_runs = len(plan) + len(cfg.methods) * (len(cfg.seeds) - 1)
    grid: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
    finals: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
    chosen: dict[str, float] = {}
    first = cfg.seeds[0]
    clock = {"t0": time.perf_counter(), "done": 0, "trained": 0}

    def tick(rec: dict[str, Any], trained: bool) -> None:
        """One line per run for logs of long jobs: what finished, elapsed time and an ETA."""
        overall.update(1)
        clock["done"] += 1
        clock["trained"] += trained
        el = time.perf_counter() - clock["t0"]
        left = n_runs - clock["done"]
        eta = el / clock["trained"] * left if clock["trained"] else float("nan")
        print(f"[{clock['done']}/{n_runs}] {rec['method']} lr={rec['lr']:g} seed={rec['seed']}: val rec "
              f"{rec['val']['rec/ndcg@10']:.4f} search {rec['val']['search/ndcg@10']:.4f}, ppl "
              f"{rec['retention']['ppl']:.2f}, {rec.get('train_s', 0):.0f} s train; elapsed {el / 60:.1f} min, "
              f"ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)

    with _bar(cfg, total=n_runs, desc="runs", unit="run", position=0) as overall:
        for m in cfg.methods:
            best, best_model = None, None
            lrs = grid_of(cfg, m)
            for lr in lrs:
                rec = log.get("grid", m, lr, first)
                model = None
                if rec is None:
                    rec, model = train_run(m, lr, first, cfg, prep, titles, ev, ns)
                    log.put("grid", rec)
                grid[m].append(rec)
                tick(rec, model is not None)
                if best is None or rec["select"] > best["select"]:
                    best = rec
                    best_model = model.to("cpu") if model is not None else None
                model = None
            chosen[m] = best["lr"]
            rec = log.get("final", m, best["lr"], first)
            if rec is None:
                if best_model is None:  # resumed after the grid: retrain the chosen point (same seed)
                    again, best_model = train_run(m, best["lr"], first, cfg, prep, titles, ev, ns)
                    best = dict(again, retrained=True)
                best_model.to(cfg.device)
                rec = dict(best, test_ranks=ev.ranks(best_model.model, prep.test, f"{m} test", best_model.head),
                           retention={**best["retention"], **ev.retention(best_model.model, cloze=True, ppl=False)})
                log.put("final", rec)
            best_model = None
            finals[m].append(rec)
            for seed in cfg.seeds[1:]:
                rec = log.get("final", m, chosen[m], seed)
                trained = rec is None
                if trained:
                    r, model = train_run(m, chosen[m], seed, cfg, prep, titles, ev, ns)
                    rec = dict(r, test_ranks=ev.ranks(model.model, prep.test, f"{m} test", model.head),
                               retention={**r["retention"], **ev.retention(model.model, cloze=True, ppl=False)})
                    log.put("final", rec)
                    model = None
                finals[m].append(rec)
                tick(rec, trained)
            f = finals[m]
            print(f"{m}: lr {chosen[m]:g}; test rec ndcg@10 "
                  f"{sum(E.rank_metrics(r['test_ranks'])['rec/ndcg@10'] for r in f) / len(f):.4f}, search "
                  f"{sum(E.rank_metrics(r['test_ranks'])['search/ndcg@10'] for r in f) / len(f):.4f}", file=sys.stderr)
    report = {"config": {k: v for k, v in asdict(cfg).items() if k != "argv"},
              "command": "python -m gems.recipes.unified_sr" + "".join(" " + shlex.quote(a) for a in cfg.argv),
              "machine": _machine(cfg), "data": prep.stats, "nullspace": ns_report, "calibration_s": calib_s,
              "base": base_rec, "baselines": bases, "baselines_val": bases_val, "grid": grid, "finals": finals,
              "chosen_lr": chosen, "total_s": time.perf_counter() - t_all, "base_s": base_s}
    from gems.recipes.report import summarise, write_outputs

    report["summary"] = summarise(report)
    write_outputs(report, cfg)
    print(report["summary"]["table_md"], file=sys.stdout)
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


# ------------------------------------------------------------------------------------------------ entry
def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            run(cfg)
    except (GemsError, FileNotFoundError, ImportError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
