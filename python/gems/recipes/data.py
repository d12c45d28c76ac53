"""Interaction data for unified search + recommendation: MovieLens-100K or any CSV pair, split by time.

Sources
    * Default: MovieLens-100K (943 users, 1,682 movies, 100,000 ratings) read from the RecBole example
      dataset inside the installed ``recbole==1.2.1`` wheel (``recbole/dataset_example/ml-100k/``,
      RecBole "atomic" files: tab-separated, typed headers such as ``user_id:token``). The wheel is
      located with ``importlib.util.find_spec`` and never imported. MovieLens' terms forbid
      redistribution, so the files are only read in place. Install: ``pip install --no-deps recbole==1.2.1``.
    * Any pair of files given by path (:func:`load_csv`): an interactions file with columns
      ``user, item, timestamp`` (optional ``rating``) and an items file with ``item, title, genres, year``.
      Common aliases are accepted (``user_id``, ``item_id``/``movieId``, ``movie_title``, ``class``/
      ``genre``, ``release_year``; RecBole ``:type`` suffixes are ignored). The delimiter is a comma, or a
      tab when the header has one; genres are separated by ``|`` or ``;`` (``genre_sep`` to override).
      A year may be empty; a year missing from the year column is taken from a trailing ``(1995)`` in the
      title. Timestamps are numbers or ISO dates.

    Ratings are treated as implicit feedback (every rating is an interaction), as in the LLM-recommendation
    literature; ``min_rating`` keeps only ratings at or above a threshold.

Time order and splits
    Each user's interactions are sorted by timestamp; ties (frequent in MovieLens: same-second ratings)
    keep file order, so the order is deterministic. Per-user leave-one-out (:func:`leave_one_out`): the last
    interaction is the test target, the second-to-last the validation target, the rest is training history.
    Users with fewer than ``min_interactions`` (default and minimum 3) interactions cannot give a training
    pair, a validation and a test target; their whole sequence stays in training and they are not
    evaluated (MovieLens-100K has none: every user has at least 20 ratings).

Examples (:func:`make_examples`)
    * train: sliding over each user's training sequence; the target is item i, the history the up to
      ``max_history`` items before it (at least one), so a user with k training items gives k-1 examples.
    * valid: history = the last ``max_history`` training items, target = the validation item.
    * test: history = the last ``max_history`` items of training + validation, target = the test item.
    Two tasks, as in the GEMS paper: ``"rec"`` (history -> next item) and ``"search"`` (history + a query
    -> item). ``max_users`` keeps a seeded random subset of users, ``max_examples`` a seeded random subset
    of examples (original order kept), for quick runs.

Queries (:class:`QueryGenerator`) - synthetic, because no real query log ships offline
    A search query is generated from the *target* item's real metadata. Facets: its genres (1-2 of them,
    lower-cased; "unknown" ignored), its time (``"from 1995"``, ``"from the 1990s"``, ``"released in
    1995"`` or ``"90s"``), and title keywords (1-2 words of the title, in title order, lower-cased, without
    punctuation, stop words, articles in English/French/German/Italian/Spanish, and 1-character words).
    One of a few templates whose facets are all available is picked, e.g. ``"comedy movie from the 1990s"``,
    ``"crime thriller movie about suspects"``, ``"movie called something like godfather"``; an item with no
    usable facet gets ``"<noun> <title>"``. The random choices come from ``random.Random`` seeded by a
    SHA-256 of ``(seed, user, split, position, target)``, so a query does not depend on subsampling,
    on the process, or on ``PYTHONHASHSEED``. ``title_words=False`` builds queries from genres and time only
    (harder: no lexical match with the title).

Prompts
    :func:`rec_prompt` / :func:`search_prompt` return plain strings that list the history by title
    (``"The Usual Suspects (1995)"``: trailing articles such as ``", The"`` moved to the front, year
    appended) and end with ``"Answer:"``; the caller appends the target (e.g. the item token).

Evaluation protocol of the authors: :func:`sample_negatives` draws 99 negatives per example (seeded,
uniform over items the user never interacted with, positive excluded); :func:`candidate_lists` puts the
positive first.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from gems.errors import DataError, MissingResourceError
from gems.resources import packaged_path

__all__ = [
    "TASKS",
    "SPLITS",
    "Item",
    "InteractionData",
    "LeaveOneOut",
    "Example",
    "QueryGenerator",
    "load_movielens_100k",
    "load_csv",
    "load_interactions",
    "leave_one_out",
    "make_examples",
    "history_text",
    "rec_prompt",
    "search_prompt",
    "build_prompt",
    "sample_negatives",
    "candidate_lists",
    "movielens_100k_dir",
]

TASKS = ("rec", "search")
SPLITS = ("train", "valid", "test")

_RECBOLE_INSTALL = "pip install --no-deps recbole==1.2.1"
_ML100K_RELDIR = os.path.join("dataset_example", "ml-100k")

# Column aliases, compared after lower-casing and stripping a RecBole ":type" suffix.
_USER_COLS = ("user", "user_id", "userid", "uid")
_ITEM_COLS = ("item", "item_id", "itemid", "movie_id", "movieid", "iid")
_TIME_COLS = ("timestamp", "time", "ts", "datetime", "date")
_RATING_COLS = ("rating", "score")
_TITLE_COLS = ("title", "movie_title", "item_title", "name")
_GENRE_COLS = ("genres", "genre", "class", "categories", "category")
_YEAR_COLS = ("year", "release_year")

_ARTICLES = ("The", "A", "An", "Il", "La", "Le", "Les", "L'", "Das", "Der", "Die", "El", "Los", "Las", "Lo", "O", "Det")
_STOPWORDS = frozenset(
    """a an the and or of in on at to for from with by as is it its be are was this that these those
    my your his her our their me you he she we they i not no but so if into out up down over under about
    than then there here what who whom which when where why how all any each some such only own same too very
    can will just vs part ii iii iv v movie film story
    il la le les l de du des un une et en au aux lo gli o det der die das den ein eine und von el los las y""".split()
)
_GENRE_DROP = frozenset({"unknown", "(no genres listed)", ""})


# ------------------------------------------------------------------------------------------- records
@functools.lru_cache(maxsize=1 << 16)
def _display_title(title: str) -> str:
    """``"Usual Suspects, The (Foo)"`` -> ``"The Usual Suspects (Foo)"`` (MovieLens' trailing articles)."""
    main, paren = title, ""
    m = re.match(r"^(.*?)(\s*\(.*\))$", title)
    if m and m.group(1):
        main, paren = m.group(1), m.group(2)
    for art in _ARTICLES:
        suffix = ", " + art
        if main.endswith(suffix):
            head = main[: -len(suffix)]
            main = f"{art}{head}" if art.endswith("'") else f"{art} {head}"
            break
    return main + paren


@dataclass(frozen=True)
class Item:
    """One item: id (string, as in the files), title as in the source, genres, release year (or None)."""

    id: str
    title: str
    genres: tuple[str, ...] = ()
    year: int | None = None

    @property
    def display_title(self) -> str:
        """The title with a trailing article moved to the front (``"The Usual Suspects"``)."""
        return _display_title(self.title)

    @property
    def name(self) -> str:
        """How prompts refer to the item: display title and year, ``"The Usual Suspects (1995)"``."""
        return f"{self.display_title} ({self.year})" if self.year is not None else self.display_title


@dataclass
class InteractionData:
    """Items and per-user, time-ordered interaction histories.

    ``items`` keeps the items file's order, which is the item order of :attr:`item_ids`,
    :meth:`titles` and hence of the item tokens. ``histories[user]`` lists item ids oldest first
    (ties in time keep file order) and ``timestamps[user]`` the matching times.
    """

    items: dict[str, Item]
    histories: dict[str, list[str]]
    timestamps: dict[str, list[float]] = field(default_factory=dict)
    source: str = ""
    item_noun: str = "item"

    @property
    def item_ids(self) -> list[str]:
        return list(self.items)

    @property
    def item_index(self) -> dict[str, int]:
        """Item id -> position (0-based) in :attr:`item_ids`; item token i belongs to item_ids[i]."""
        return {iid: k for k, iid in enumerate(self.items)}

    @property
    def users(self) -> list[str]:
        return list(self.histories)

    @property
    def num_interactions(self) -> int:
        return sum(len(h) for h in self.histories.values())

    def titles(self, *, display: bool = True) -> list[str]:
        """Item titles in item order (for :func:`gems.recipes.model.add_item_tokens`)."""
        return [it.display_title if display else it.title for it in self.items.values()]

    def subsample_users(self, max_users: int | None, *, seed: int = 0) -> InteractionData:
        """A copy with a seeded random subset of at most ``max_users`` users (all items kept)."""
        if max_users is None or max_users >= len(self.histories):
            return self
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        keep = set(random.Random(seed).sample(sorted(self.histories), max_users))
        return InteractionData(
            items=self.items,
            histories={u: h for u, h in self.histories.items() if u in keep},
            timestamps={u: t for u, t in self.timestamps.items() if u in keep},
            source=self.source,
            item_noun=self.item_noun,
        )

    def __repr__(self) -> str:
        return (
            f"InteractionData(source={self.source!r}, users={len(self.histories)}, items={len(self.items)}, "
            f"interactions={self.num_interactions})"
        )


# ------------------------------------------------------------------------------------------- reading
def _read_table(path: str, *, delimiter: str | None, atomic: bool) -> tuple[list[str], list[list[str]]]:
    """Header (normalised names) and rows of a delimited text file (UTF-8, falling back to Latin-1)."""
    if not os.path.isfile(path):
        raise MissingResourceError(f"data file not found: {path}; pass an existing file path")
    for encoding in ("utf-8", "latin-1"):
        try:
            with open(path, encoding=encoding, newline="") as f:
                text = f.read()
            break
        except UnicodeDecodeError:
            continue
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path} is empty; it needs a header line and data rows")
    if delimiter is None:
        delimiter = "\t" if "\t" in lines[0] else ","
    quoting = csv.QUOTE_NONE if atomic else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    header = [h.strip().split(":", 1)[0].strip().lower() for h in next(reader)]
    rows = [r for r in reader if r and any(c.strip() for c in r)]
    return header, rows


def _column(header: list[str], aliases: Sequence[str], path: str, what: str, required: bool = True) -> int | None:
    for name in aliases:
        if name in header:
            return header.index(name)
    if required:
        raise DataError(
            f"{path} has no {what} column (looked for {', '.join(aliases)}; found {', '.join(header)}); "
            "rename the column"
        )
    return None


def _parse_time(value: str, path: str, line: int) -> float:
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise DataError(
            f"{path} line {line}: timestamp {value!r} is neither a number nor an ISO date; fix that row"
        ) from None


def _parse_year(value: str) -> int | None:
    m = re.search(r"\b(\d{4})\b", value or "")
    return int(m.group(1)) if m else None


def _split_genres(value: str, sep: str | None) -> tuple[str, ...]:
    value = (value or "").strip()
    if sep == "":  # RecBole token_seq: whitespace-separated
        parts = value.split()
    else:
        if sep is None:
            sep = "|" if "|" in value else ";" if ";" in value else None
        parts = value.split(sep) if sep is not None else [value]
    return tuple(g.strip() for g in parts if g.strip().lower() not in _GENRE_DROP)


def _read_items(path: str, *, delimiter: str | None, atomic: bool, genre_sep: str | None) -> dict[str, Item]:
    header, rows = _read_table(path, delimiter=delimiter, atomic=atomic)
    ci = _column(header, _ITEM_COLS, path, "item id")
    ct = _column(header, _TITLE_COLS, path, "title")
    cg = _column(header, _GENRE_COLS, path, "genres")
    cy = _column(header, _YEAR_COLS, path, "year")
    width = max(ci, ct, cg, cy) + 1
    items: dict[str, Item] = {}
    for n, row in enumerate(rows, start=2):
        if len(row) < width:
            raise DataError(f"{path} line {n}: {len(row)} fields, expected {len(header)}; fix that row")
        iid = row[ci].strip()
        if not iid:
            raise DataError(f"{path} line {n}: empty item id; fix that row")
        title = row[ct].strip()
        year = _parse_year(row[cy])
        m = re.match(r"^(.*\S)\s*\((\d{4})\)$", title)
        if m:  # "Title (1995)": MovieLens style; the year column may be empty or garbled
            title = m.group(1)
            year = year if year is not None else int(m.group(2))
        if not title or title.lower() in ("unknown", "unkonwn"):
            title = f"unknown item {iid}"
        genres = _split_genres(row[cg], "" if atomic else genre_sep)
        if iid in items:
            raise DataError(f"{path} line {n}: item id {iid!r} appears twice; keep one row per item")
        items[iid] = Item(iid, title, genres, year)
    if not items:
        raise DataError(f"{path} has a header but no items; add item rows")
    return items


def _read_interactions(
    path: str, items: Mapping[str, Item], *, delimiter: str | None, atomic: bool, min_rating: float | None
) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
    header, rows = _read_table(path, delimiter=delimiter, atomic=atomic)
    cu = _column(header, _USER_COLS, path, "user id")
    ci = _column(header, _ITEM_COLS, path, "item id")
    cts = _column(header, _TIME_COLS, path, "timestamp")
    cr = _column(header, _RATING_COLS, path, "rating", required=min_rating is not None)
    width = max(c for c in (cu, ci, cts, cr) if c is not None) + 1
    per_user: dict[str, list[tuple[float, int, str]]] = {}
    unknown: dict[str, int] = {}
    for n, row in enumerate(rows, start=2):
        if len(row) < width:
            raise DataError(f"{path} line {n}: {len(row)} fields, expected {len(header)}; fix that row")
        if min_rating is not None:
            try:
                if float(row[cr]) < min_rating:
                    continue
            except ValueError:
                raise DataError(f"{path} line {n}: rating {row[cr]!r} is not a number; fix that row") from None
        user, iid = row[cu].strip(), row[ci].strip()
        if iid not in items:
            unknown[iid] = unknown.get(iid, 0) + 1
            continue
        per_user.setdefault(user, []).append((_parse_time(row[cts], path, n), n, iid))
    if unknown:
        example = next(iter(unknown))
        raise DataError(
            f"{path}: {sum(unknown.values())} interactions refer to {len(unknown)} item ids "
            "missing from the items file "
            f"(e.g. {example!r}); add those items or drop those rows"
        )
    if not per_user:
        what = f"with rating >= {min_rating}" if min_rating is not None else "rows"
        raise DataError(f"{path} has no interactions {what}; give a file with (user, item, timestamp) rows")
    histories: dict[str, list[str]] = {}
    timestamps: dict[str, list[float]] = {}
    for user in sorted(per_user, key=_natural_key):
        seq = sorted(per_user[user])  # (time, file line): ties keep file order
        histories[user] = [iid for _, _, iid in seq]
        timestamps[user] = [t for t, _, _ in seq]
    return histories, timestamps


def _natural_key(s: str) -> tuple[int, int | str]:
    return (0, int(s)) if s.isdigit() else (1, s)


def movielens_100k_dir() -> str:
    """Folder of MovieLens-100K (RecBole atomic files) inside the installed ``recbole`` wheel."""
    return packaged_path("recbole", _ML100K_RELDIR, install=_RECBOLE_INSTALL, required=("ml-100k.inter", "ml-100k.item"),
                         missing_package="MovieLens-100K needs the recbole wheel (package 'recbole' not found)",
                         missing_file=f"MovieLens-100K files missing from the installed recbole package ({_ML100K_RELDIR})")


def load_movielens_100k(*, min_rating: float | None = None) -> InteractionData:
    """MovieLens-100K from the installed ``recbole`` wheel (read in place, never copied)."""
    folder = movielens_100k_dir()
    return _load(
        os.path.join(folder, "ml-100k.inter"),
        os.path.join(folder, "ml-100k.item"),
        delimiter="\t",
        atomic=True,
        genre_sep=None,
        min_rating=min_rating,
        source="MovieLens-100K (recbole wheel)",
        item_noun="movie",
    )


def load_csv(
    interactions: str | os.PathLike[str],
    items: str | os.PathLike[str],
    *,
    delimiter: str | None = None,
    genre_sep: str | None = None,
    min_rating: float | None = None,
    item_noun: str = "item",
) -> InteractionData:
    """An interactions file (user, item, timestamp[, rating]) and an items file (item, title, genres, year).

    See the module docstring for accepted column names and formats. Files whose header uses RecBole's
    ``name:type`` form are read as RecBole atomic files (tab-separated, no quoting, space-separated genres).
    """
    inter_path, item_path = os.fspath(interactions), os.fspath(items)
    atomic = _looks_atomic(item_path)
    return _load(
        inter_path,
        item_path,
        delimiter=delimiter,
        atomic=atomic,
        genre_sep=genre_sep,
        min_rating=min_rating,
        source=f"{inter_path} + {item_path}",
        item_noun=item_noun,
    )


def _looks_atomic(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        return False
    return "\t" in first and ":token" in first


def load_interactions(
    interactions: str | os.PathLike[str] | None = None,
    items: str | os.PathLike[str] | None = None,
    **kwargs,
) -> InteractionData:
    """MovieLens-100K when both paths are None, else :func:`load_csv` on the two files."""
    if interactions is None and items is None:
        return load_movielens_100k(min_rating=kwargs.get("min_rating"))
    if interactions is None or items is None:
        raise DataError("give both an interactions file and an items file, or neither for MovieLens-100K")
    return load_csv(interactions, items, **kwargs)


def _load(inter_path, item_path, *, delimiter, atomic, genre_sep, min_rating, source, item_noun) -> InteractionData:
    if not os.path.isfile(item_path):
        raise MissingResourceError(f"items file not found: {item_path}; pass an existing file path")
    if not os.path.isfile(inter_path):
        raise MissingResourceError(f"interactions file not found: {inter_path}; pass an existing file path")
    items = _read_items(item_path, delimiter=delimiter, atomic=atomic, genre_sep=genre_sep)
    histories, timestamps = _read_interactions(
        inter_path, items, delimiter=delimiter, atomic=atomic, min_rating=min_rating
    )
    return InteractionData(items, histories, timestamps, source=source, item_noun=item_noun)


# ------------------------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class LeaveOneOut:
    """Per-user split by time: training sequence, validation target and test target.

    Users with fewer than ``min_interactions`` interactions are only in ``train`` (not evaluated).
    """

    train: dict[str, list[str]]
    valid: dict[str, str]
    test: dict[str, str]
    min_interactions: int = 3


def leave_one_out(data: InteractionData, *, min_interactions: int = 3) -> LeaveOneOut:
    """Last interaction -> test, second-to-last -> validation, the rest -> training."""
    if min_interactions < 3:
        raise ValueError(
            f"min_interactions must be >= 3 (one training pair, a validation and a test target), got {min_interactions}"
        )
    train: dict[str, list[str]] = {}
    valid: dict[str, str] = {}
    test: dict[str, str] = {}
    for user, seq in data.histories.items():
        if len(seq) < min_interactions:
            train[user] = list(seq)
            continue
        train[user] = list(seq[:-2])
        valid[user] = seq[-2]
        test[user] = seq[-1]
    return LeaveOneOut(train, valid, test, min_interactions)


@dataclass(frozen=True)
class Example:
    """One training or evaluation example; ``query`` is set for the search task only."""

    user: str
    history: tuple[str, ...]
    target: str
    task: str = "rec"
    query: str | None = None
    split: str = "train"


# ------------------------------------------------------------------------------------------- queries
def _title_keywords(item: Item) -> tuple[str, ...]:
    return _keywords(item.display_title)


@functools.lru_cache(maxsize=1 << 16)
def _keywords(display_title: str) -> tuple[str, ...]:
    main = re.sub(r"\s*\(.*\)\s*$", "", display_title)
    words = re.findall(r"[^\W_]+(?:'[^\W_]+)?", main.lower())
    out: list[str] = []
    for w in words:
        if len(w) < 2 or w in _STOPWORDS or w.isdigit() or w in out:
            continue
        out.append(w)
    return tuple(out)


def _seeded_rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# Templates: (facets needed, format). {noun}: "movie"/"item"; {genres}, {time}, {words} are facet phrases.
_TEMPLATES: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"genres", "time"}), "{genres} {noun} {time}"),
    (frozenset({"genres", "time"}), "looking for a {genres} {noun} {time}"),
    (frozenset({"genres", "words"}), "{genres} {noun} about {words}"),
    (frozenset({"words", "time"}), "{noun} {time} with {words} in the title"),
    (frozenset({"genres", "words", "time"}), "{genres} {noun} {time}, something with {words}"),
    (frozenset({"genres"}), "a good {genres} {noun}"),
    (frozenset({"words"}), "{noun} called something like {words}"),
)


@dataclass(frozen=True)
class QueryGenerator:
    """Seeded generator of search queries from an item's real metadata (see the module docstring).

    ``gen(item, key)`` always returns the same query for the same ``(seed, key, item)``.
    """

    seed: int = 0
    title_words: bool = True
    noun: str = "movie"

    def facets(self, item: Item, rng: random.Random) -> dict[str, str]:
        out: dict[str, str] = {}
        genres = [g.lower() for g in item.genres]
        if genres:
            k = 1 if len(genres) == 1 else rng.choice((1, 2))
            chosen = sorted(rng.sample(range(len(genres)), k))
            out["genres"] = " ".join(genres[i] for i in chosen)
        if item.year is not None:
            y = item.year
            out["time"] = rng.choice(
                (f"from {y}", f"from the {y // 10 * 10}s", f"released in {y}", f"{y // 10 % 10 * 10:02d}s")
            )
        if self.title_words:
            words = _title_keywords(item)
            if words:
                k = 1 if len(words) == 1 else rng.choice((1, 2))
                start = rng.randrange(len(words) - k + 1)
                out["words"] = " ".join(words[start : start + k])
        return out

    def __call__(self, item: Item, key: object = "") -> str:
        rng = _seeded_rng("gems-query-v1", self.seed, key, item.id)
        facets = self.facets(item, rng)
        options = [fmt for need, fmt in _TEMPLATES if need <= facets.keys()]
        if not options:
            return f"{self.noun} {item.display_title.lower()}"
        return rng.choice(options).format(noun=self.noun, **facets)


# ------------------------------------------------------------------------------------------- examples
def make_examples(
    data: InteractionData,
    split: str = "train",
    task: str = "rec",
    *,
    max_history: int = 10,
    max_users: int | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    min_interactions: int = 3,
    queries: QueryGenerator | None = None,
    splits: LeaveOneOut | None = None,
) -> list[Example]:
    """Examples of one split and task (see the module docstring for how each split is built).

    ``queries`` defaults to ``QueryGenerator(seed, noun=data.item_noun)`` for the search task; pass
    ``splits`` to reuse a :func:`leave_one_out` result. Raises :class:`DataError` when the result is empty.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    data = data.subsample_users(max_users, seed=seed)
    loo = splits if splits is not None else leave_one_out(data, min_interactions=min_interactions)
    gen = queries if queries is not None else QueryGenerator(seed=seed, noun=data.item_noun)

    raw: list[tuple[str, tuple[str, ...], str, int]] = []  # user, history, target, position
    for user in data.histories:
        seq = loo.train.get(user)
        if seq is None:
            continue
        if split == "train":
            for i in range(1, len(seq)):
                raw.append((user, tuple(seq[max(0, i - max_history) : i]), seq[i], i))
        elif user in loo.valid:
            if split == "valid":
                hist = seq
                target = loo.valid[user]
            else:
                hist = seq + [loo.valid[user]]
                target = loo.test[user]
            if hist:
                raw.append((user, tuple(hist[-max_history:]), target, len(hist)))
    if max_examples is not None and len(raw) > max_examples:
        keep = sorted(random.Random(seed).sample(range(len(raw)), max_examples))
        raw = [raw[k] for k in keep]
    if not raw:
        raise DataError(
            f"the {split!r} split is empty ({len(data.histories)} users; "
            f"users need >= {loo.min_interactions} interactions); "
            "use more data or a larger max_users"
        )
    out: list[Example] = []
    for user, hist, target, pos in raw:
        query = gen(data.items[target], key=(user, split, pos)) if task == "search" else None
        out.append(Example(user, hist, target, task, query, split))
    return out


# ------------------------------------------------------------------------------------------- prompts
def history_text(history: Iterable[str], data: InteractionData) -> str:
    """Numbered list of the history's item names, oldest first, one per line."""
    return "\n".join(f"{k}. {data.items[iid].name}" for k, iid in enumerate(history, start=1))


def rec_prompt(example: Example, data: InteractionData) -> str:
    """Recommendation prompt: the history by title, then the question. The caller appends the target."""
    noun = data.item_noun
    return (
        f"A user interacted with these {noun}s, oldest first:\n{history_text(example.history, data)}\n"
        f"Which {noun} will the user choose next?\nAnswer:"
    )


def search_prompt(example: Example, data: InteractionData) -> str:
    """Search prompt: the history by title, the query, then the question. The caller appends the target."""
    if example.query is None:
        raise ValueError("a search prompt needs example.query; make the examples with task='search'")
    noun = data.item_noun
    return (
        f"A user interacted with these {noun}s, oldest first:\n{history_text(example.history, data)}\n"
        f'The user now searches for: "{example.query}"\n'
        f"Which {noun} matches the search?\nAnswer:"
    )


def build_prompt(example: Example, data: InteractionData) -> str:
    """:func:`rec_prompt` or :func:`search_prompt`, by ``example.task``."""
    return search_prompt(example, data) if example.task == "search" else rec_prompt(example, data)


# ------------------------------------------------------------------------------------------- negatives
def sample_negatives(
    data: InteractionData,
    user: str,
    positive: str,
    *,
    num_negatives: int = 99,
    seed: int = 0,
) -> list[str]:
    """``num_negatives`` distinct items the user never interacted with (any split), never ``positive``.

    Uniform over the remaining items, seeded by ``(seed, user, positive)``: the same call gives the same
    list in any process. Raises :class:`DataError` when too few items are left.
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    seen = set(data.histories.get(user, ()))
    seen.add(positive)
    pool = [iid for iid in data.items if iid not in seen]
    if len(pool) < num_negatives:
        raise DataError(
            f"user {user!r} has only {len(pool)} unseen items, fewer than num_negatives={num_negatives}; "
            "lower num_negatives"
        )
    return _seeded_rng("gems-negatives-v1", seed, user, positive).sample(pool, num_negatives)


def candidate_lists(
    examples: Sequence[Example],
    data: InteractionData,
    *,
    num_negatives: int = 99,
    seed: int = 0,
) -> list[list[str]]:
    """For each example, ``[positive, negative_1, ..., negative_n]`` (the authors' 1 + 99 protocol)."""
    return [
        [ex.target, *sample_negatives(data, ex.user, ex.target, num_negatives=num_negatives, seed=seed)]
        for ex in examples
    ]
