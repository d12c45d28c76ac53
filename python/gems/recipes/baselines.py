"""Simple non-LLM baselines for the unified search + recommendation benchmark.

Every function scores the *whole* catalogue (items are integer indices ``0..num_items-1``), so the scores
go through the same full-ranking evaluation as the LLM's (:func:`gems.recipes.evaluate.evaluate_ranking`,
where ties count against the target). That is why each score carries a popularity tie-break: a baseline
with many exact ties (an unseen item's transition row is all zeros) would otherwise be punished by the
tie rule rather than judged on what it knows.

Baselines
    * Popularity (:func:`popularity`, :func:`popularity_scores`): training interaction counts, the same
      ranking for everyone. The floor any recommender must beat.
    * Item-to-item transitions (:func:`transition_counts`, :func:`transition_scores`): a first-order
      Markov chain over the training sequences, summed over the last few history items. On
      MovieLens-style data this is a strong sequential baseline for next-item prediction.
    * Transition factors (:func:`factor_scores`): the same history tail scored through a low-rank PPMI
      factorisation of the transition counts (:func:`gems.recipes.collab.transition_factors`), which is
      what the recipe's collaborative item tokens carry: the reference for how much of an LLM's
      recommendation the injected factors alone explain.
    * Lexical search (:func:`lexical_scores`, :func:`item_text`): TF-IDF cosine between the query and the
      item's metadata text. The benchmark's queries are generated from the target's genres, year and
      title words (:class:`gems.recipes.data.QueryGenerator`), so exact word overlap is a strong reference
      that an LLM must approach to be worth its cost.

>>> train = {"u1": [0, 1, 2], "u2": [1, 2]}
>>> popularity(train, 4).tolist()
[1.0, 2.0, 2.0, 0.0]
>>> transition_scores([[1]], transition_counts(train, 4), popularity(train, 4)).argmax(1).tolist()
[2]
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "popularity",
    "transition_counts",
    "transition_scores",
    "popularity_scores",
    "factor_scores",
    "lexical_scores",
    "item_text",
]

_TOKEN = re.compile(r"[a-z0-9]+")
# The lexical tie-break must stay below the smallest cosine difference that matters; 1e-6 of a value in
# [0, 1) is far below the gaps between distinct TF-IDF cosines of short metadata texts.
_LEXICAL_TIE_SCALE = 1e-6
# Queries are scored in chunks so that N queries x vocabulary never has to be dense at once.
_QUERY_CHUNK = 1024


def _check_num_items(num_items: int) -> None:
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")


def _check_seq(seq: Sequence[int], num_items: int, what: str) -> list[int]:
    out = [int(i) for i in seq]
    for i in out:
        if not 0 <= i < num_items:
            raise ValueError(f"item index {i} in {what} is out of range [0, {num_items})")
    return out


def _check_pop(pop: Tensor, num_items: int | None = None) -> Tensor:
    pop = torch.as_tensor(pop, dtype=torch.float64)
    if pop.dim() != 1 or pop.numel() < 1:
        raise ValueError(f"pop must be a non-empty 1-D tensor, got shape {tuple(pop.shape)}")
    if num_items is not None and pop.numel() != num_items:
        raise ValueError(f"pop has {pop.numel()} entries but the catalogue has {num_items} items")
    # A negative or NaN count would push the tie-break outside [0, 1) and let it override real scores.
    if not bool(torch.isfinite(pop).all()) or bool((pop < 0).any()):
        raise ValueError("pop must hold finite, non-negative counts")
    return pop


def _tie_break(pop: Tensor) -> Tensor:
    # pop >= 0, so this lies in [0, 1): below the gap between two distinct integer count sums.
    return pop / (pop.max() + 1.0)


def popularity(train_seqs: Mapping[str, Sequence[int]], num_items: int) -> Tensor:
    """Interaction counts of every item over all training sequences (float64, shape ``[num_items]``)."""
    _check_num_items(num_items)
    pop = torch.zeros(num_items, dtype=torch.float64)
    for user, seq in train_seqs.items():
        idx = _check_seq(seq, num_items, f"the sequence of user {user!r}")
        if idx:
            pop += torch.bincount(torch.tensor(idx, dtype=torch.long), minlength=num_items).double()
    return pop


def transition_counts(train_seqs: Mapping[str, Sequence[int]], num_items: int) -> Tensor:
    """``C[a, b]`` = how often item b directly follows item a within one user's training sequence.

    Dense float64 ``[num_items, num_items]``: for a catalogue of a few thousand items this is tens of MB,
    and dense rows make :func:`transition_scores` a plain index-and-sum.
    """
    _check_num_items(num_items)
    counts = torch.zeros(num_items, num_items, dtype=torch.float64)
    for user, seq in train_seqs.items():
        idx = _check_seq(seq, num_items, f"the sequence of user {user!r}")
        if len(idx) < 2:
            continue
        t = torch.tensor(idx, dtype=torch.long)
        # accumulate=True: a repeated pair within a sequence must count every time, not once.
        counts.index_put_((t[:-1], t[1:]), torch.ones(len(idx) - 1, dtype=torch.float64), accumulate=True)
    return counts


def transition_scores(histories: Sequence[Sequence[int]], counts: Tensor, pop: Tensor, *, last: int = 3) -> Tensor:
    """Next-item scores ``[N, num_items]`` (float64) from the transition counts of each history's tail.

    Row i is ``sum(counts[h] for h in histories[i][-last:])`` (unweighted; a repeated item counts once per
    occurrence) plus the popularity tie-break ``pop / (pop.max() + 1)``. The count sums are integers and
    the tie-break lies in [0, 1), so popularity only orders items whose sums are equal, e.g. every item
    after an unseen history item. An empty history (or ``last=0``) scores by the tie-break alone, i.e. by
    popularity.
    """
    if last < 0:
        raise ValueError(f"last must be >= 0, got {last}")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] < 1:
        raise ValueError(f"counts must be a square [num_items, num_items] tensor, got shape {tuple(counts.shape)}")
    num_items = counts.shape[0]
    pop = _check_pop(pop, num_items)
    tie = _tie_break(pop)
    out = tie.unsqueeze(0).repeat(len(histories), 1)
    for i, hist in enumerate(histories):
        idx = _check_seq(hist, num_items, f"history {i}")
        # hist[-0:] would be the whole history, not none of it.
        tail = idx[-last:] if last > 0 else []
        if tail:
            out[i] += counts[torch.tensor(tail, dtype=torch.long)].sum(0)
    return out


def factor_scores(histories: Sequence[Sequence[int]], left: Tensor, right: Tensor, pop: Tensor, *,
                  last: int = 3) -> Tensor:
    """Next-item scores ``[N, num_items]`` (float64): ``sum(left[h] for h in histories[i][-last:]) @ right.T``
    plus the popularity tie-break scaled by 1e-6 (the scores are real-valued, so it only orders exact ties,
    e.g. every item after an empty or unseen history)."""
    if last < 0:
        raise ValueError(f"last must be >= 0, got {last}")
    left, right = torch.as_tensor(left, dtype=torch.float64), torch.as_tensor(right, dtype=torch.float64)
    if left.dim() != 2 or left.shape != right.shape:
        raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} must both be items × dim")
    num_items = left.shape[0]
    tie = _LEXICAL_TIE_SCALE * _tie_break(_check_pop(pop, num_items))
    ctx = torch.zeros(len(histories), left.shape[1], dtype=torch.float64)
    for i, hist in enumerate(histories):
        idx = _check_seq(hist, num_items, f"history {i}")
        tail = idx[-last:] if last > 0 else []
        if tail:
            ctx[i] = left[torch.tensor(tail, dtype=torch.long)].sum(0)
    return ctx @ right.T + tie


def popularity_scores(n: int, pop: Tensor) -> Tensor:
    """The popularity vector as scores for ``n`` examples: ``[n, num_items]``, every row equal.

    A view (``expand``) of ``pop``, so it costs no memory; clone it before writing into it.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pop = _check_pop(pop)
    return pop.unsqueeze(0).expand(n, -1)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def item_text(title: str, genres: Sequence[str], year: int | None) -> str:
    """The text the lexical baseline indexes for one item: ``"title genres year decade"``.

    The decade is written both ways (``1995`` -> ``"1990s 90s"``) because the query generator says either
    ``"from the 1990s"`` or ``"90s"``; with only the year, those queries would match nothing.

    >>> item_text("Heat", ["Action", "Crime"], 1995)
    'Heat Action Crime 1995 1990s 90s'
    """
    parts = [title.strip(), *(g.strip() for g in genres)]
    if year is not None:
        y = int(year)
        decade = y // 10 * 10
        parts += [str(y), f"{decade}s", f"{decade % 100:02d}s"]
    return " ".join(p for p in parts if p)


def lexical_scores(queries: Sequence[str], item_texts: Sequence[str], pop: Tensor) -> Tensor:
    """TF-IDF cosine between each query and each item text, ``[N, num_items]`` (float64).

    Tokens are the lower-cased ``[a-z0-9]+`` runs. Term frequency is the raw count, idf the smoothed
    ``log((1 + n_items) / (1 + df)) + 1`` over the item texts (the catalogue is the document collection;
    query words that no item contains carry no information about which item is meant and are dropped).
    Rows are L2-normalised, so the score is a cosine in [0, 1]. A popularity tie-break scaled by 1e-6 is
    added: it orders items with equal cosines (e.g. every item for a query with no known word) and is too
    small to reverse a lexical difference. Computed in float64 so that float rounding between equal
    cosines stays far below the tie-break.
    """
    n_items = len(item_texts)
    if n_items < 1:
        raise ValueError("item_texts must not be empty")
    pop = _check_pop(pop, n_items)
    docs = [Counter(_tokens(t)) for t in item_texts]
    vocab = {w: j for j, w in enumerate(sorted({w for d in docs for w in d}))}
    tie = (_LEXICAL_TIE_SCALE * _tie_break(pop)).unsqueeze(0)

    df = torch.zeros(len(vocab), dtype=torch.float64)
    for d in docs:
        df[[vocab[w] for w in d]] += 1.0
    idf = torch.log((1.0 + n_items) / (1.0 + df)) + 1.0

    def matrix(bags: Sequence[Counter[str]]) -> Tensor:
        m = torch.zeros(len(bags), len(vocab), dtype=torch.float64)
        for r, bag in enumerate(bags):
            known = [(vocab[w], c) for w, c in bag.items() if w in vocab]
            if known:
                cols, vals = zip(*known)
                m[r, list(cols)] = torch.tensor(vals, dtype=torch.float64)
        m *= idf
        # clamp: an all-zero row (empty text) stays zero instead of becoming NaN.
        return m / m.norm(dim=1, keepdim=True).clamp_min(1e-300)

    items = matrix(docs)
    out = []
    for start in range(0, len(queries), _QUERY_CHUNK):
        q = matrix([Counter(_tokens(s)) for s in queries[start:start + _QUERY_CHUNK]])
        out.append(q @ items.T + tie)
    if not out:
        return torch.zeros(0, n_items, dtype=torch.float64)
    return torch.cat(out)
