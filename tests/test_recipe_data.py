"""Recipe data: MovieLens-100K from the recbole wheel, CSV pairs, splits, examples, queries, negatives."""

from __future__ import annotations

import importlib.util
import random
import re

import pytest

from gems.errors import DataError, MissingResourceError
from gems.recipes import data as D
from gems.recipes.data import (
    Example,
    Item,
    QueryGenerator,
    build_prompt,
    candidate_lists,
    leave_one_out,
    load_csv,
    load_interactions,
    load_movielens_100k,
    make_examples,
    rec_prompt,
    sample_negatives,
    search_prompt,
)


@pytest.fixture(scope="module")
def ml():
    return load_movielens_100k()


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------- MovieLens
def test_movielens_counts_and_metadata(ml):
    assert (len(ml.histories), len(ml.items), ml.num_interactions) == (943, 1682, 100_000)
    assert ml.item_noun == "movie"
    toy = ml.items["1"]
    assert (toy.title, toy.genres, toy.year, toy.name) == (
        "Toy Story",
        ("Animation", "Children's", "Comedy"),
        1995,
        "Toy Story (1995)",
    )
    assert ml.items["12"].name == "The Usual Suspects (1995)"
    assert ml.items["177"].display_title == "The Good, The Bad and The Ugly"
    # RecBole put the year in the title and "V" in the year column for this one
    garbled = ml.items["1412"]
    assert garbled.year == 1995 and not garbled.title.endswith("(1995)")
    assert ml.items["267"].year is None and ml.items["267"].genres == ()
    assert ml.item_ids[:3] == ["1", "2", "3"] and ml.item_index["3"] == 2
    assert len(ml.titles()) == 1682 and ml.titles()[11] == "The Usual Suspects"


def test_histories_are_time_ordered_with_stable_ties(ml):
    for user, ts in ml.timestamps.items():
        assert all(a <= b for a, b in zip(ts, ts[1:])), user
        assert len(ts) == len(ml.histories[user]) >= 20
    assert ml.users[:3] == ["1", "2", "3"]
    assert ml.histories == load_movielens_100k().histories  # deterministic, ties included


def test_leave_one_out(ml):
    loo = leave_one_out(ml)
    assert len(loo.valid) == len(loo.test) == 943
    for user, seq in ml.histories.items():
        assert loo.train[user] + [loo.valid[user], loo.test[user]] == seq
    with pytest.raises(ValueError):
        leave_one_out(ml, min_interactions=2)


def test_train_examples_slide_over_history(ml):
    loo = leave_one_out(ml)
    ex = make_examples(ml, "train", max_history=5, splits=loo)
    assert len(ex) == sum(len(s) - 1 for s in loo.train.values())
    first = [e for e in ex if e.user == "1"]
    seq = loo.train["1"]
    assert len(first) == len(seq) - 1 > 0
    for i, e in enumerate(first, start=1):
        assert e.target == seq[i] and e.history == tuple(seq[max(0, i - 5) : i])
        assert e.task == "rec" and e.query is None and e.split == "train"


def test_valid_and_test_examples(ml):
    loo = leave_one_out(ml)
    valid = {e.user: e for e in make_examples(ml, "valid", max_history=4, splits=loo)}
    test = {e.user: e for e in make_examples(ml, "test", max_history=4, splits=loo)}
    assert len(valid) == len(test) == 943
    u = "42"
    assert valid[u].target == loo.valid[u] and valid[u].history == tuple(loo.train[u][-4:])
    assert test[u].target == loo.test[u] and test[u].history == tuple(loo.train[u][-3:]) + (loo.valid[u],)


def test_subsampling_is_seeded(ml):
    a = make_examples(ml, "train", "search", max_users=7, max_examples=50, seed=3)
    b = make_examples(ml, "train", "search", max_users=7, max_examples=50, seed=3)
    c = make_examples(ml, "train", "search", max_users=7, max_examples=50, seed=4)
    assert a == b and a != c
    assert len(a) == 50 and len({e.user for e in a}) <= 7
    assert len(make_examples(ml, "test", max_users=10)) == 10


def test_queries_deterministic_and_independent_of_subsampling(ml):
    full = make_examples(ml, "test", "search")
    sub = make_examples(ml, "test", "search", max_users=50)
    by_user = {e.user: e.query for e in full}
    assert len(sub) == 50 and all(by_user[e.user] == e.query for e in sub)
    assert len({e.query for e in full}) > 500  # varied


def _facet_words(item: Item) -> set[str]:
    words = {g.lower() for g in item.genres} | set(D._title_keywords(item))
    words |= {w for g in item.genres for w in g.lower().split()}
    if item.year is not None:
        words |= {str(item.year), f"{item.year // 10 * 10}s", f"{item.year // 10 % 10 * 10:02d}s"}
    return words


def test_queries_come_from_target_metadata(ml):
    ex = make_examples(ml, "train", "search", max_examples=400, seed=1)
    assert len(ex) == 400
    for e in ex:
        item = ml.items[e.target]
        assert e.query and e.query == e.query.strip()
        found = [w for w in _facet_words(item) if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", e.query)]
        assert found, (e.query, item)
    # genres and time only, when asked for
    gen = QueryGenerator(seed=0, title_words=False)
    for e in ex[:100]:
        facets = gen.facets(ml.items[e.target], random.Random(0))
        assert "words" not in facets and facets
        assert gen(ml.items[e.target], key=e.user) == gen(ml.items[e.target], key=e.user)


def test_query_without_any_facet():
    item = Item("x", "The", (), None)
    assert QueryGenerator(noun="item")(item) == "item the"


def test_prompts(ml):
    ex = make_examples(ml, "test", "search", max_users=3)[0]
    p = search_prompt(ex, ml)
    names = [ml.items[i].name for i in ex.history]
    positions = [p.index(f"{k}. {n}") for k, n in enumerate(names, start=1)]
    assert positions == sorted(positions)
    assert f'"{ex.query}"' in p and p.endswith("Answer:") and build_prompt(ex, ml) == p
    r = rec_prompt(ex, ml)
    assert ex.query not in r and r.endswith("Answer:") and "movies" in r
    with pytest.raises(ValueError, match="task='search'"):
        search_prompt(Example("1", ("1",), "2"), ml)


def test_negatives(ml):
    ex = make_examples(ml, "test", max_users=20)
    cands = candidate_lists(ex, ml)
    assert len(ex) == len(cands) == 20
    for e, c in zip(ex, cands):
        assert c[0] == e.target and len(c) == 100 and len(set(c)) == 100
        assert not set(c[1:]) & set(ml.histories[e.user])
    assert cands == candidate_lists(ex, ml)
    assert cands != candidate_lists(ex, ml, seed=1)
    with pytest.raises(DataError):
        sample_negatives(ml, "1", "1", num_negatives=2000)


def test_missing_recbole(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "recbole" else real(name, *a))
    with pytest.raises(MissingResourceError) as info:
        load_interactions()
    assert "pip install --no-deps recbole==1.2.1" in _one_line(info.value)


# ----------------------------------------------------------------------------------------- CSV
ITEMS_CSV = """item,title,genres,year
10,"Matrix, The",Action|Sci-Fi,1999
11,Heat,Action|Crime|Thriller,1995
12,Amélie (2001),Comedy|Romance,
13,Up,Animation,2009
14,Alien,Horror|Sci-Fi,1979
"""
INTER_CSV = """user,item,timestamp,rating
a,10,100,5
a,11,50,4
a,12,300,3
a,13,200,5
b,14,2020-01-02T00:00:00,4
b,10,2020-01-01T00:00:00,2
c,11,7,1
"""


@pytest.fixture
def csv_pair(tmp_path):
    inter, items = tmp_path / "inter.csv", tmp_path / "items.csv"
    inter.write_text(INTER_CSV, encoding="utf-8")
    items.write_text(ITEMS_CSV, encoding="utf-8")
    return inter, items


def test_csv_pair(csv_pair):
    data = load_interactions(*csv_pair)
    assert data.item_noun == "item" and len(data.items) == 5
    assert data.histories == {"a": ["11", "10", "13", "12"], "b": ["10", "14"], "c": ["11"]}
    assert data.items["10"].name == "The Matrix (1999)"
    assert data.items["12"].year == 2001 and data.items["12"].title == "Amélie"
    assert data.items["11"].genres == ("Action", "Crime", "Thriller")
    loo = leave_one_out(data)
    # users with < 3 interactions stay in train and are not evaluated
    assert loo.valid == {"a": "13"} and loo.test == {"a": "12"} and loo.train["b"] == ["10", "14"]
    train = make_examples(data, "train")
    assert [(e.user, e.history, e.target) for e in train] == [("a", ("11",), "10"), ("b", ("10",), "14")]
    assert load_csv(*csv_pair, min_rating=4).histories == {"a": ["11", "10", "13"], "b": ["14"]}


def test_csv_empty_split(tmp_path, csv_pair):
    inter = tmp_path / "short.csv"
    inter.write_text("user,item,timestamp\nb,14,2\nb,10,1\n", encoding="utf-8")
    data = load_csv(inter, csv_pair[1])
    with pytest.raises(DataError) as info:
        make_examples(data, "test")
    assert "'test' split is empty" in _one_line(info.value)
    with pytest.raises(DataError):
        load_csv(csv_pair[0], csv_pair[1], min_rating=6)


def test_recbole_atomic_header_via_load_csv(tmp_path):
    items = tmp_path / "x.item"
    items.write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tHeat\t1995\tAction Crime\n2\tUp\t2009\tAnimation\n",
        encoding="utf-8",
    )
    inter = tmp_path / "x.inter"
    inter.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t2\t3\t5\n7\t1\t3\t4\n", encoding="utf-8"
    )
    data = load_csv(inter, items)
    assert data.items["1"].genres == ("Action", "Crime") and data.histories == {"7": ["1", "2"]}


@pytest.mark.parametrize(
    "items_text, needle",
    [
        ("item,title,year\n1,Heat,1995\n", "genres"),
        ("item,genres,year\n1,Action,1995\n", "title"),
        ("id,title,genres,year\n1,Heat,Action,1995\n", "item id"),
        ("item,title,genres\n1,Heat,Action\n", "year"),
    ],
)
def test_items_file_missing_column(tmp_path, csv_pair, items_text, needle):
    items = tmp_path / "bad.csv"
    items.write_text(items_text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_csv(csv_pair[0], items)
    msg = _one_line(info.value)
    assert f"no {needle} column" in msg and "rename" in msg


def test_bad_files(tmp_path, csv_pair):
    inter, items = csv_pair
    with pytest.raises(MissingResourceError) as info:
        load_csv(tmp_path / "nope.csv", items)
    assert "not found" in _one_line(info.value)
    with pytest.raises(MissingResourceError):
        load_csv(inter, tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError):
        load_csv(inter, empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("user,item,timestamp\n", encoding="utf-8")
    with pytest.raises(DataError, match="no interactions"):
        load_csv(header_only, items)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("user,item,timestamp\na,99,1\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_csv(unknown, items)
    assert "missing from the items file" in _one_line(info.value)
    bad_time = tmp_path / "time.csv"
    bad_time.write_text("user,item,timestamp\na,10,yesterday\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        load_csv(bad_time, items)
    with pytest.raises(DataError, match="give both"):
        load_interactions(inter)


def test_argument_checks(csv_pair):
    data = load_csv(*csv_pair)
    for kwargs in ({"split": "dev"}, {"task": "qa"}, {"max_history": 0}, {"max_examples": 0}):
        with pytest.raises(ValueError):
            make_examples(data, **kwargs)
