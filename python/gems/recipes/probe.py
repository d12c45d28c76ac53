"""A general-knowledge retention probe that is not perplexity: seeded multiple-choice cloze.

Why another probe: held-out perplexity moves with any change of the output distribution (a model that
learned to emit item tokens gets a worse perplexity on plain text even when it still "knows" the text),
while a forced choice between a real continuation and distractors asks only whether the model still
prefers the right word. Both are reported; they fail in different ways.

Items (:func:`build_cloze`) come from the shipped general corpus
(``gems.corpus.load_general_corpus("heldout")``): the context is ``context_words`` consecutive words of
one text, the answer is the word that follows (a content word), the distractors are content words of
*other* texts. Words are whitespace-separated pieces of the text; a content word is ASCII-alphabetic (so
no piece with punctuation attached), at least 4 letters long and not a stop word. Distractors prefer the
answer's capitalisation (a capitalised answer gets capitalised distractors when enough exist) so that
case alone does not give the answer away.

Scoring (:func:`cloze_scores`, :func:`cloze_accuracy`): the score of a choice is the summed
log-probability of its tokens (``" " + choice``, no special tokens) after the context's tokens
(``add_special_tokens=True``, so a BOS is there when the tokenizer adds one). Summed, not averaged, as a
language model's probability of the whole continuation; the distractors are single words of similar
length, so the length bias is small. The prediction is the argmax (first maximum on ties).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gems.corpus import _pad_id  # padded positions are masked and never read: any valid id works

__all__ = ["ClozeItem", "build_cloze", "cloze_scores", "cloze_accuracy"]

# Frequent function words of 4+ letters: as answers they test syntax rather than knowledge, and as
# distractors they are ruled out by grammar alone.
_STOPWORDS = frozenset(
    """
    about above after again against also although among another because been before being below between
    both could does doing down during each either else even ever every from further have having here
    hers herself himself into itself just many more most much must neither never none once only other
    ours ourselves over same shall should since some such than that their theirs them themselves then
    there these they this those though through thus together toward towards under until upon very were
    what whatever when where whether which while whom whose will with within without would your yours
    yourself later""".split()
)
_LETTERS = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class ClozeItem:
    """One multiple-choice cloze item: the context, the choices, and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    answer: int


def _is_content(word: str) -> bool:
    return word.isascii() and word.isalpha() and len(word) >= 4 and word.lower() not in _STOPWORDS


def build_cloze(
    texts: Sequence[str],
    *,
    n_items: int = 64,
    n_choices: int = 4,
    context_words: int = 24,
    seed: int = 0,
) -> list[ClozeItem]:
    """Up to ``n_items`` seeded cloze items, at most one per text (see the module docstring).

    The texts are visited in a seeded random order; a text is skipped when it has no content word after
    its first ``context_words`` words, or when the other texts cannot supply ``n_choices - 1`` distinct
    distractors (case-insensitively different from the answer, absent from the context). The answer's
    position among the choices is seeded-random too. The result depends only on the inputs. Raises
    ValueError when no item can be built.
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if n_choices < 2:
        raise ValueError(f"n_choices must be >= 2, got {n_choices}")
    if context_words < 1:
        raise ValueError(f"context_words must be >= 1, got {context_words}")
    words_of = [t.split() for t in texts]

    # Distinct content words (by lower case) -> surface form of the first occurrence and the texts that
    # hold them; sorted so that the seeded draws do not depend on set iteration order.
    surface: dict[str, str] = {}
    owners: dict[str, set[int]] = {}
    for i, words in enumerate(words_of):
        for w in words:
            if _is_content(w):
                key = w.lower()
                surface.setdefault(key, w)
                owners.setdefault(key, set()).add(i)
    pool = sorted(surface)

    rng = random.Random(seed)
    order = list(range(len(words_of)))
    rng.shuffle(order)
    items: list[ClozeItem] = []
    for i in order:
        if len(items) == n_items:
            break
        words = words_of[i]
        positions = [p for p in range(context_words, len(words)) if _is_content(words[p])]
        if not positions:
            continue
        p = rng.choice(positions)
        answer = words[p]
        context_list = words[p - context_words:p]
        context_keys = set(_LETTERS.findall(" ".join(context_list).lower()))
        candidates = [
            k for k in pool
            if k != answer.lower() and k not in context_keys and owners[k] != {i}
        ]
        same_case = [k for k in candidates if surface[k][0].isupper() == answer[0].isupper()]
        if len(same_case) >= n_choices - 1:
            candidates = same_case
        if len(candidates) < n_choices - 1:
            continue
        distractors = [surface[k] for k in rng.sample(candidates, n_choices - 1)]
        at = rng.randrange(n_choices)
        choices = tuple(distractors[:at] + [answer] + distractors[at:])
        items.append(ClozeItem(" ".join(context_list), choices, at))
    if not items:
        raise ValueError(
            f"no cloze item could be built from {len(words_of)} texts: each needs a content word after its "
            f"first {context_words} words and {n_choices - 1} distractors from the other texts"
        )
    return items


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"]
    if isinstance(ids, Tensor):
        ids = ids.reshape(-1).tolist()
    return [int(t) for t in ids]


def cloze_scores(
    model: Any,
    tokenizer: Any,
    items: Sequence[ClozeItem],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> list[bool]:
    """Per-item correctness (argmax of the summed choice log-probabilities equals the answer).

    One forward per (item, choice) row, rows batched ``batch_size`` at a time with right padding and an
    attention mask. The model's training flag is restored afterwards. A list rather than a mean so that
    two models can be compared item by item (:func:`gems.recipes.stats.paired_bootstrap`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows: list[tuple[list[int], int]] = []  # (context + choice ids, number of context ids)
    for n, item in enumerate(items):
        if not 0 <= item.answer < len(item.choices):
            raise ValueError(f"item {n}: answer {item.answer} is not an index into its {len(item.choices)} choices")
        ctx = _ids(tokenizer(item.context, add_special_tokens=True))
        if not ctx:
            # Without at least one context token there is no position to predict the first choice token from.
            raise ValueError(f"item {n}: the context tokenises to no tokens")
        for choice in item.choices:
            ch = _ids(tokenizer(" " + choice, add_special_tokens=False))
            if not ch:
                raise ValueError(f"item {n}: choice {choice!r} tokenises to no tokens")
            rows.append((ctx + ch, len(ctx)))

    pad = _pad_id(tokenizer)
    scores: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                width = max(len(ids) for ids, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, (ids, _) in enumerate(chunk):
                    input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[r, :len(ids)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
                for r, (ids, n_ctx) in enumerate(chunk):
                    # Token t is predicted by the logits at t - 1: the choice tokens n_ctx..len-1 are read
                    # from positions n_ctx-1..len-2. Only those rows go through log_softmax (and fp32).
                    pos = torch.arange(n_ctx - 1, len(ids) - 1, device=logits.device)
                    logp = logits[r, pos].float().log_softmax(-1)
                    target = torch.tensor(ids[n_ctx:], dtype=torch.long, device=logits.device)
                    scores.append(float(logp.gather(1, target.view(-1, 1)).sum()))
    finally:
        model.train(was_training)

    out: list[bool] = []
    at = 0
    for item in items:
        s = torch.tensor(scores[at:at + len(item.choices)])
        at += len(item.choices)
        out.append(int(s.argmax()) == item.answer)
    return out


def cloze_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[ClozeItem],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> float:
    """Fraction of ``items`` answered correctly (mean of :func:`cloze_scores`), in [0, 1]."""
    if not items:
        raise ValueError("cloze_accuracy needs at least one item")
    correct = cloze_scores(model, tokenizer, items, device=device, batch_size=batch_size)
    return sum(correct) / len(correct)
