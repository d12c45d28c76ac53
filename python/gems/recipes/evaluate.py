"""Evaluation pieces of the unified search + recommendation recipe: batching, item-token loss, ranking
metrics over the full catalogue and over sampled candidates, perplexity, optimizer-state memory.

Conventions
    * Prompts are token-id lists; batches are **left**-padded so that the last column is the last prompt
      token for every row, with explicit ``position_ids`` (cumulative sum of the attention mask), so a
      padded row computes exactly what it would alone.
    * Training target: the item token id is appended right after the prompt ids (never as text), and the
      loss is the cross-entropy of that one token, read from the logits at the position before it
      (``logits_to_keep=2``: the model never materialises the logits of the other positions).
    * Ranking: one forward per example (batched); the scores of the catalogue are the next-token logits
      at the end of the prompt restricted to the item tokens. The rank of the target is the number of
      other items whose score is **greater than or equal** to its score (ties count against the
      target, so a constant model scores HR@k ≈ k/N, not 1). Items the user interacted with before the
      target are masked out of the full ranking (as in RecBole's full-sort evaluation); the sampled
      protocol (1 positive + 99 negatives never interacted with) needs no mask.
    * HR@k = 1[rank < k]; NDCG@k = 1/log2(rank + 2) if rank < k, else 0 (one relevant item).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KS",
    "collate_left",
    "model_forward",
    "item_token_loss",
    "row_item_losses",
    "item_logits",
    "target_ranks",
    "ranking_metrics",
    "score_items",
    "example_ranks",
    "rank_metrics",
    "evaluate_ranking",
    "perplexity",
    "state_bytes",
]

KS = (5, 10, 20)


def collate_left(rows: Sequence[Sequence[int]], pad_id: int, targets: Sequence[int] | None = None,
                 device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Left-padded ``input_ids``/``attention_mask``/``position_ids``; ``targets`` (token ids) are appended
    one per row right after its prompt ids."""
    if not rows:
        raise ValueError("collate_left needs at least one row")
    seqs = [list(r) + [int(t)] for r, t in zip(rows, targets)] if targets is not None else [list(r) for r in rows]
    if targets is not None and len(targets) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError("empty prompt")
        input_ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    out = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def model_forward(model: Any, batch: Mapping[str, Tensor], keep: int, *, autocast_dtype: torch.dtype | None = None
                  ) -> Tensor:
    """Logits (B × keep × V, fp32) of the last ``keep`` positions of a left-padded batch."""
    device_type = batch["input_ids"].device.type
    ctx = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(device_type, enabled=False))
    with ctx:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False)
    return out.logits[:, -keep:].float()


def item_logits(model: Any, batch: Mapping[str, Tensor], keep: int, item_ids: Tensor, *, head: Any = None,
                tasks: Sequence[str] | None = None, autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Item scores (B × keep × N_items, fp32) at the last ``keep`` positions: the LM head's item-token
    logits, or ``head(final hidden state)`` when an item head is given (the decoder is called directly, so
    no vocabulary-sized logits are computed); ``head(hidden, tasks)`` with one task name per row for
    :class:`~gems.recipes.model.TaskHeads`."""
    if head is None:
        return model_forward(model, batch, keep, autocast_dtype=autocast_dtype)[..., item_ids.to(batch["input_ids"].device)]
    device_type = batch["input_ids"].device.type
    ctx = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(device_type, enabled=False))
    with ctx:
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    hidden = hidden[:, -keep:].float()
    return head(hidden) if tasks is None else head(hidden, tasks)


def item_token_loss(model: Any, batch: Mapping[str, Tensor], *, item_ids: Tensor | None = None,
                    autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Per-example cross-entropy of the appended item token (the batch's last column).

    ``item_ids`` given: the softmax runs over the item tokens only (``"items"`` loss); else over the
    whole vocabulary (``"full"``)."""
    logits = model_forward(model, batch, 2, autocast_dtype=autocast_dtype)[:, 0]  # predicts the last column
    target = batch["input_ids"][:, -1]
    if item_ids is None:
        return F.cross_entropy(logits, target, reduction="none")
    lookup = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=logits.device)
    lookup[item_ids] = torch.arange(item_ids.numel(), device=logits.device)
    idx = lookup[target]
    if bool((idx < 0).any()):
        raise ValueError("a target is not an item token")
    return F.cross_entropy(logits[:, item_ids], idx, reduction="none")


def row_item_losses(model: Any, rows: Sequence[Any], pad_id: int, item_ids: Tensor, *, head: Any = None,
                    tasks: Sequence[str] | None = None, device: torch.device | str = "cpu",
                    autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Cross-entropy over the item tokens of every target of ``rows`` (:class:`~gems.recipes.prompts.TrainRow`:
    the last ``targets`` ids of each row are answers, each predicted from its own prefix), flattened row
    by row (B-th row's targets in order).

    Left padding puts every row's answers in its last columns, so one forward with
    ``logits_to_keep = max(targets) + 1`` reads all of them and no other position's logits exist."""
    if not rows:
        raise ValueError("row_item_losses needs at least one row")
    batch = collate_left([r.ids for r in rows], pad_id, device=device)
    keep = max(r.targets for r in rows) + 1
    logits = item_logits(model, batch, keep, item_ids, head=head, tasks=tasks, autocast_dtype=autocast_dtype)[:, :-1]
    cols = torch.arange(keep - 1, device=logits.device)
    n = torch.tensor([r.targets for r in rows], device=logits.device)
    valid = cols.unsqueeze(0) >= (keep - 1 - n).unsqueeze(1)       # the last n predicting positions
    answers = batch["input_ids"][:, -(keep - 1):]
    lookup = torch.full((int(max(int(item_ids.max()), int(answers.max()))) + 1,), -1, dtype=torch.long,
                        device=logits.device)
    lookup[item_ids.to(logits.device)] = torch.arange(item_ids.numel(), device=logits.device)
    target = lookup[answers[valid]]
    if bool((target < 0).any()):
        raise ValueError("a target is not an item token")
    return F.cross_entropy(logits[valid], target, reduction="none")


def target_ranks(scores: Tensor, target: Tensor) -> Tensor:
    """0-based rank of ``target[i]`` in row i of ``scores`` (B × N): the number of *other* entries with a
    score ≥ the target's (ties count against the target)."""
    t = scores.gather(1, target.view(-1, 1))
    return (scores >= t).sum(1) - 1


def ranking_metrics(ranks: Tensor | Sequence[int], ks: Iterable[int] = KS) -> dict[str, float]:
    """Mean HR@k and NDCG@k over examples with 0-based ranks ``ranks`` (one relevant item each)."""
    r = torch.as_tensor(ranks, dtype=torch.float64).reshape(-1)
    if r.numel() == 0:
        raise ValueError("no ranks to average")
    out: dict[str, float] = {}
    for k in ks:
        hit = r < k
        out[f"hr@{k}"] = float(hit.double().mean())
        out[f"ndcg@{k}"] = float(torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean())
    return out


@torch.no_grad()
def score_items(model: Any, rows: Sequence[Sequence[int]], item_ids: Tensor, pad_id: int, *,
                batch_size: int = 32, device: torch.device | str = "cpu", head: Any = None,
                autocast_dtype: torch.dtype | None = None, progress: Any = None) -> Tensor:
    """Next-token logits at the end of each prompt restricted to ``item_ids`` (N_examples × N_items, fp32,
    on the CPU)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = collate_left(chunk, pad_id, device=device)
            out.append(item_logits(model, batch, 1, item_ids, head=head, autocast_dtype=autocast_dtype)[:, 0].cpu())
            if progress is not None:
                progress.update(len(chunk))
    finally:
        model.train(was_training)
    return torch.cat(out)


def example_ranks(scores: Tensor, targets: Sequence[int], *, seen: Sequence[Sequence[int]] | None = None,
                  candidates: Sequence[Sequence[int]] | None = None) -> tuple[Tensor, Tensor | None]:
    """0-based rank of each example's target in the full catalogue (``seen[i]`` masked, the target never)
    and, with ``candidates`` (item indices, positive first), among its sampled candidates."""
    scores = scores.clone()
    target = torch.as_tensor(list(targets), dtype=torch.long)
    if scores.shape[0] != target.numel():
        raise ValueError(f"{scores.shape[0]} score rows but {target.numel()} targets")
    # a diverged model must rank last, never first: NaN compares false, which would give rank -1
    bad_target = ~torch.isfinite(scores.gather(1, target.view(-1, 1)).squeeze(1))
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    scores[bad_target] = 0.0
    scores[bad_target, target[bad_target]] = float("-inf")
    if seen is not None:
        for i, s in enumerate(seen):
            idx = [j for j in s if j != int(target[i])]
            if idx:
                scores[i, idx] = float("-inf")
    full = target_ranks(scores, target)
    if candidates is None:
        return full, None
    cand = torch.as_tensor([list(c) for c in candidates], dtype=torch.long)
    sub = scores.gather(1, cand) if seen is None else _gather_unmasked(scores, cand)
    return full, target_ranks(sub, torch.zeros(len(cand), dtype=torch.long))


def rank_metrics(ranks: Mapping[str, Mapping[str, Sequence[int] | None]]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` from stored per-example ranks ``{task: {"full": [...], "sampled": [...]}}``
    (the sampled metrics only where sampled ranks are given)."""
    out: dict[str, float] = {}
    for task, r in ranks.items():
        out.update({f"{task}/{k}": v for k, v in ranking_metrics(r["full"]).items()})
        if r.get("sampled") is not None:
            out.update({f"{task}/sampled/{k}": v for k, v in ranking_metrics(r["sampled"], (5, 10)).items()})
    return out


def evaluate_ranking(scores: Tensor, targets: Sequence[int], *, seen: Sequence[Sequence[int]] | None = None,
                     candidates: Sequence[Sequence[int]] | None = None, ks: Iterable[int] = KS,
                     prefix: str = "") -> dict[str, float]:
    """Full-catalogue metrics (``seen[i]``: item indices masked for example i, the target never) and, with
    ``candidates`` (item indices, positive first), the sampled-candidates metrics under ``sampled/``."""
    full, sampled = example_ranks(scores, targets, seen=seen, candidates=candidates)
    out = {f"{prefix}{k}": v for k, v in ranking_metrics(full, ks).items()}
    if sampled is not None:
        out.update({f"{prefix}sampled/{k}": v for k, v in ranking_metrics(sampled, (5, 10)).items()})
    return out


def _gather_unmasked(masked: Tensor, cand: Tensor) -> Tensor:
    # candidates are positive + never-interacted items, which the full-ranking mask leaves alone
    return masked.gather(1, cand)


@torch.no_grad()
def perplexity(model: Any, batches: Iterable[Mapping[str, Tensor]], *, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, progress: Any = None) -> float:
    """exp(mean next-token NLL) over every labelled token of ``batches`` (``token_batches(...,
    with_labels=True)``; right-padded, padding labelled -100)."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            ctx = (torch.autocast(batch["input_ids"].device.type, dtype=autocast_dtype) if autocast_dtype is not None
                   else torch.autocast(batch["input_ids"].device.type, enabled=False))
            with ctx:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
            logits = logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                         ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no labelled tokens")
    return math.exp(nll / count)


def state_bytes(obj: Any, _seen: set[int] | None = None, _depth: int = 0) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (dicts, lists, tuples and plain objects'
    attributes, e.g. GaLore's projector), each storage counted once."""
    seen = set() if _seen is None else _seen
    if _depth > 8:
        return 0
    if isinstance(obj, Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    total = 0
    if isinstance(obj, Mapping):
        for v in obj.values():
            total += state_bytes(v, seen, _depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            total += state_bytes(v, seen, _depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for v in vars(obj).values():
            total += state_bytes(v, seen, _depth + 1)
    return total
