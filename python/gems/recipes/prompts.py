"""Compact token prompts for search + recommendation: items are single tokens, text only where it carries meaning.

Why compact: on the 2-core CPU the 135M model trains at ~110 tokens/s, so every token of boilerplate is
budget taken from learning. A title-list prompt (``"1. The Usual Suspects (1995)"``) costs ~8 tokens per
history item and supervises one answer; here a history item costs one token and a recommendation window
supervises every item in it.

Layouts (``H`` = ``"<Noun>s watched:"`` with the tokenizer's special tokens, ``<i>`` = an item token)::

    rec window   H <i1> <i2> ... <ik>                      targets <i2>..<ik>, each from its own prefix
    rec prompt   H <h1> ... <hw>                           the next item is scored at the last position
    search       H <h1> <h2> <h3> " Search: <query>. Pick:" <target>

A recommendation window is a causal-LM training sequence (SASRec-style): one forward gives k-1 next-item
losses, so every training transition of the split can be seen (:func:`rec_windows` covers each exactly
once). Search keeps a short history (personalised search, as in the GEMS paper) and one answer token.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainRow", "Prompts", "rec_windows"]


@dataclass(frozen=True)
class TrainRow:
    """Token ids of one training sequence whose last ``targets`` tokens are the supervised answers."""

    ids: tuple[int, ...]
    targets: int

    def __post_init__(self) -> None:
        if not 1 <= self.targets < len(self.ids):
            raise ValueError(f"a row of {len(self.ids)} tokens cannot have {self.targets} targets")


def rec_windows(seq: Sequence[int], window: int) -> list[list[int]]:
    """Chunks of ``seq`` (item indices) of at most ``window`` + 1 items that overlap by one item, so every
    transition ``seq[j-1] -> seq[j]`` is the target of exactly one chunk position (the chunk's first item is
    context only)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    for start in range(0, len(seq) - 1, window):
        out.append(list(seq[start:start + window + 1]))
    return out


class Prompts:
    """Builds the token rows of both tasks for one tokenizer and one item vocabulary.

    ``item_tokens[i]`` is the token id of item index i. ``window`` caps the recommendation history,
    ``search_history`` the history shown with a query."""

    def __init__(self, tokenizer: Any, item_tokens: Sequence[int], *, noun: str = "movie", window: int = 20,
                 search_history: int = 3):
        if window < 1 or search_history < 0:
            raise ValueError(f"window must be >= 1 and search_history >= 0, got {window}, {search_history}")
        if not item_tokens:
            raise ValueError("no item tokens")
        self.tokenizer = tokenizer
        self.item_tokens = list(item_tokens)
        self.window = window
        self.search_history = search_history
        self.head = list(tokenizer(f"{noun.capitalize()}s watched:", add_special_tokens=True)["input_ids"])

    def _items(self, items: Sequence[int]) -> list[int]:
        n = len(self.item_tokens)
        bad = [i for i in items if not 0 <= i < n]
        if bad:
            raise ValueError(f"item index {bad[0]} outside the {n} items")
        return [self.item_tokens[i] for i in items]

    def rec_train(self, chunk: Sequence[int]) -> TrainRow:
        """A window from :func:`rec_windows`: every item after the first is a target."""
        if len(chunk) < 2:
            raise ValueError("a recommendation window needs at least 2 items")
        return TrainRow(tuple(self.head + self._items(chunk)), len(chunk) - 1)

    def rec_prompt(self, history: Sequence[int]) -> list[int]:
        """Evaluation prompt: the last ``window`` items of the history."""
        if not history:
            raise ValueError("a recommendation prompt needs a history")
        return self.head + self._items(list(history)[-self.window:])

    def _query_ids(self, query: str) -> list[int]:
        return list(self.tokenizer(f" Search: {query.strip()}. Pick:", add_special_tokens=False)["input_ids"])

    def search_prompt(self, history: Sequence[int], query: str) -> list[int]:
        hist = list(history)[-self.search_history:] if self.search_history else []
        return self.head + self._items(hist) + self._query_ids(query)

    def search_train(self, history: Sequence[int], query: str, target: int) -> TrainRow:
        return TrainRow(tuple(self.search_prompt(history, query) + self._items([target])), 1)
