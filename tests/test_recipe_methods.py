"""The benchmark's building blocks: prompt windows, the multi-target item loss, the item head, the null-space
wrapper for any optimizer, and the method builder's shared rules (which rows train, at which lr)."""
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import require
from gems.nullspace import leakage, project_update
from gems.recipes import evaluate as E
from gems.recipes.methods import METHODS, Hyper, NullSpaceUpdate, build_method
from gems.recipes.model import BilinearItemHead, ItemHead, TaskHeads
from gems.recipes.prompts import Prompts, TrainRow, rec_windows

VOCAB, ITEMS = 64, list(range(50, 60))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


class WordTokenizer:
    """Whitespace tokenizer with a BOS, enough for Prompts."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        for w in text.split():
            ids.append(2 + self.vocab.setdefault(w, len(self.vocab)) % 40)
        return {"input_ids": ids}


# ------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("n,window", [(2, 1), (7, 3), (30, 12), (12, 12), (13, 12)])
def test_rec_windows_cover_every_transition_exactly_once(n, window):
    seq = list(range(100, 100 + n))
    chunks = rec_windows(seq, window)
    pairs = [(c[j - 1], c[j]) for c in chunks for j in range(1, len(c))]
    assert pairs == list(zip(seq, seq[1:]))
    assert all(2 <= len(c) <= window + 1 for c in chunks)


def test_prompts_layout_and_errors():
    p = Prompts(WordTokenizer(), ITEMS, window=3, search_history=2)
    row = p.rec_train([0, 1, 2])
    assert row.ids[-3:] == (50, 51, 52) and row.targets == 2 and row.ids[:len(p.head)] == tuple(p.head)
    assert p.rec_prompt([0, 1, 2, 3, 4])[-3:] == [52, 53, 54]        # the last `window` items
    s = p.search_train([0, 1, 2], "funny film", 5)
    assert s.targets == 1 and s.ids[-1] == 55 and s.ids[len(p.head):len(p.head) + 2] == (51, 52)
    with pytest.raises(ValueError, match="outside the 10 items"):
        p.rec_prompt([10])
    with pytest.raises(ValueError, match="at least 2 items"):
        p.rec_train([3])
    with pytest.raises(ValueError, match="cannot have 3 targets"):
        TrainRow((1, 2, 3), 3)
    with pytest.raises(ValueError, match="window must be >= 1"):
        rec_windows([1, 2], 0)


# ------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("with_head", [False, True])
def test_row_item_losses_match_unpadded_per_position_cross_entropy(with_head):
    model = tiny_llama()
    model.eval()
    item_ids = torch.tensor(ITEMS)
    head = None
    if with_head:
        head = ItemHead(len(ITEMS), 16, torch.linspace(0, 2, len(ITEMS)))
        torch.nn.init.normal_(head.weight, std=0.3)
    rows = [TrainRow((1, 5, 50, 53, 57), 2), TrainRow((1, 6, 7, 8, 59), 1), TrainRow((1, 52, 51), 2)]
    got = E.row_item_losses(model, rows, 0, item_ids, head=head)
    want = []
    for r in rows:
        ids = torch.tensor([r.ids])
        with torch.no_grad():
            if head is None:
                logits = model(input_ids=ids).logits[0][:, item_ids]
            else:
                logits = head(model.get_decoder()(input_ids=ids).last_hidden_state[0])
        for j in range(len(r.ids) - r.targets, len(r.ids)):
            want.append(F.cross_entropy(logits[j - 1], torch.tensor(ITEMS.index(r.ids[j]))))
    assert got.shape == (5,)
    torch.testing.assert_close(got.detach(), torch.stack(want), atol=1e-5, rtol=1e-5)


def test_row_item_losses_refuses_a_non_item_target():
    with pytest.raises(ValueError, match="not an item token"):
        E.row_item_losses(tiny_llama(), [TrainRow((1, 5, 6), 1)], 0, torch.tensor(ITEMS))


def test_item_head_starts_at_tied_logits_plus_the_centred_prior():
    prior = torch.log1p(torch.tensor([3.0, 0.0, 7.0, 1.0]))
    h = torch.randn(5, 8)
    assert torch.equal(ItemHead(4, 8, prior)(h).argsort(dim=1, descending=True)[0], torch.tensor([2, 0, 3, 1]))
    rows = torch.randn(4, 8)
    torch.testing.assert_close(ItemHead(4, 8, prior, rows)(h), h @ rows.T + prior - prior.mean())
    with pytest.raises(ValueError, match="4 finite values"):
        ItemHead(4, 8, torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="4 × 8 finite"):
        ItemHead(4, 8, prior, torch.randn(4, 7))


def test_task_heads_score_each_row_with_its_tasks_head():
    torch.manual_seed(0)
    prior = torch.log1p(torch.tensor([3.0, 0.0, 7.0, 1.0]))
    heads = TaskHeads({"search": ItemHead(4, 8, prior, torch.randn(4, 8)), "rec": ItemHead(4, 8, prior)})
    h = torch.randn(5, 3, 8)
    tasks = ["rec", "search", "search", "rec", "search"]
    out = heads(h, tasks)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(out[i], heads[t](h[i]), rtol=0, atol=0)
    out[[0, 3]].sum().backward()  # rec rows only: the search head gets no gradient
    assert not heads["search"].weight.grad.any() and heads["rec"].weight.grad.abs().sum() > 0
    # the rec head starts at W = 0: the popularity ranking for every hidden state
    assert (heads["rec"](h).argsort(-1, descending=True) == torch.tensor([2, 0, 3, 1])).all()
    # the bilinear head starts there too, and one answer's step moves items it never saw as answers
    items = torch.randn(4, 8)
    bil = BilinearItemHead(items, prior)
    assert (bil(h).argsort(-1, descending=True) == torch.tensor([2, 0, 3, 1])).all()
    torch.nn.functional.cross_entropy(bil(h[0]), torch.tensor([1, 1, 1])).backward()
    with torch.no_grad():
        bil.map -= 0.1 * bil.map.grad
    moved = bil(h[0]) - heads["rec"](h[0])
    e = items / items.norm(dim=1, keepdim=True)
    torch.testing.assert_close(moved, h[0] @ bil.map @ e.T)  # h·A·e_j on unit item vectors
    assert bool((moved[:, [0, 2, 3]].abs() > 0).all())
    with pytest.raises(KeyError, match="no item head for task 'other'"):
        heads(h, ["other"] * 5)
    with pytest.raises(ValueError, match="2 task names for 5 rows"):
        heads(h, ["rec", "rec"])


# ------------------------------------------------------------------------------------------ null space wrapper
def test_null_space_update_keeps_any_optimizer_step_out_of_the_protected_space():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4, bias=False)
    q, _ = torch.linalg.qr(torch.randn(6, 2))
    for wrapped in (False, True):
        w0 = torch.randn(4, 6)
        lin.weight.data.copy_(w0)
        opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.1)
        if wrapped:
            opt = NullSpaceUpdate(opt, {lin.weight: q}, "input")
        for _ in range(3):
            lin(torch.randn(5, 6)).pow(2).sum().backward()
            before = lin.weight.detach().clone()
            opt.step()
            opt.zero_grad()
            delta = lin.weight.detach() - before
            if wrapped:
                assert leakage(delta, q, "input") < 1e-6
            else:
                raw = delta
        if not wrapped:
            assert leakage(raw, q, "input") > 1e-2  # the unwrapped optimizer does leak: the test can fail
    # the wrapper's step is the projection of the inner step
    lin.weight.data.copy_(w0)
    inner = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(torch.ones(1, 6)).sum().backward()
    expect = w0 + project_update(-0.5 * lin.weight.grad, q, "input")
    NullSpaceUpdate(inner, {lin.weight: q}, "input").step()
    torch.testing.assert_close(lin.weight.detach(), expect)


# ------------------------------------------------------------------------------------------ builder rules
def _calibrated(model):
    from gems.nullspace import NullSpace

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(2, 40, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long)}]
    return NullSpace.calibrate(model, batches, side="input", threshold=0.2, mode="energy")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_item_rows_and_never_text_rows(name):
    if METHODS[name].optimizer == "lora":
        require("peft")
    if METHODS[name].optimizer == "galore":
        require("galore_torch")
    model = tiny_llama()
    ns = _calibrated(model) if METHODS[name].nullspace else None
    head = ItemHead(len(ITEMS), 16)
    hp = Hyper(item_lr=1e-2, rank=2, task_rank=1, gap=1, lora_r=2)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    model, opt, info = build_method(name, model, ITEMS, 1e-3, hp, ns, extra=list(head.parameters()))
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [3e-4, 1e-3, 1e-2], lrs
    item_ids = torch.tensor(ITEMS)
    rows = {"rec": [TrainRow((1, 50, 51, 52), 2)], "search": [TrainRow((1, 7, 8, 55), 1)]}
    for _ in range(2):
        losses = {t: E.row_item_losses(model, r, 0, item_ids, head=head).mean() for t, r in rows.items()}
        if METHODS[name].optimizer == "gems":
            opt.backward(losses, num_samples={"rec": 1, "search": 1})
        else:
            sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()
    if METHODS[name].optimizer == "lora":   # PEFT keeps the base rows and trains a delta for the item rows
        delta = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
        assert delta and float(delta[0].detach().abs().sum()) > 0
        full = [p for p in model.parameters() if p.shape == emb0.shape]
        assert full and all(not p.requires_grad and torch.equal(p.detach(), emb0) for p in full)
    else:
        w = emb.weight.detach()
        text = [i for i in range(VOCAB) if i not in ITEMS]
        assert torch.equal(w[text], emb0[text])
        assert not torch.equal(w[ITEMS], emb0[ITEMS])
    assert float(head.weight.detach().abs().sum()) > 0
    assert info["trainable_params"] > 0


def test_galore_ns_updates_stay_in_the_null_space():
    require("galore_torch")
    model = tiny_llama()
    ns = _calibrated(model)
    hp = Hyper(item_lr=1e-2, rank=2, task_rank=1, gap=1)
    model, opt, info = build_method("galore_ns", model, ITEMS, 1e-2, hp, ns)
    assert info["protected_weights"] > 0
    name = "model.layers.0.mlp.down_proj"
    w = dict(model.named_modules())[name].weight
    before = w.detach().clone()
    E.row_item_losses(model, [TrainRow((1, 50, 51, 52), 2)], 0, torch.tensor(ITEMS)).mean().backward()
    opt.step()
    delta = w.detach() - before
    assert float(delta.abs().sum()) > 0
    assert leakage(delta, ns.basis(name), ns.protect_side) < 1e-5


def test_build_method_errors():
    with pytest.raises(ValueError, match="unknown method"):
        build_method("sgd", tiny_llama(), ITEMS, 1e-3, Hyper(item_lr=1e-2))
    with pytest.raises(ValueError, match="needs a calibrated null space"):
        build_method("gems", tiny_llama(), ITEMS, 1e-3, Hyper(item_lr=1e-2))


def test_gems_shared_gradient_is_the_mixed_objectives_gradient():
    """task_backward gives GEMS the mixed methods' objective: on a parameter GEMS does not project (the item
    head's bias) its SGD step is -lr times the gradient of (rec + search) / 2."""
    import warnings

    import gems
    from gems.recipes.unified_sr import task_backward

    rows = {"rec": [TrainRow((1, 50, 51, 52, 53), 3)], "search": [TrainRow((1, 7, 8, 9, 55), 1)]}
    item_ids = torch.tensor(ITEMS)

    def setup():
        model = tiny_llama()
        return model, ItemHead(len(ITEMS), 16, torch.linspace(0, 1, len(ITEMS)))

    def losses(model, head):
        return {t: E.row_item_losses(model, rows[t], 0, item_ids, head=head).mean() for t in ("search", "rec")}

    model, head = setup()
    task_backward(None, losses(model, head), gems=False)
    want = head.bias.grad.detach().clone()
    assert float(want.abs().sum()) > 0
    model, head = setup()
    b0 = head.bias.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.5),
                                 model=model, tasks=["search", "rec"], rank=2, task_rank=1)
    task_backward(opt, losses(model, head), gems=True)
    opt.step()
    torch.testing.assert_close((b0 - head.bias.detach()) / 0.5, want, atol=1e-6, rtol=1e-5)


def test_gems_one_backward_is_the_per_task_objective():
    """gems_backward (one forward over the mixed batch, the default in train_run) gives the per-task
    gradients and the step of task_backward(gems=True), with rows of unequal target counts."""
    import warnings

    import gems
    from gems.recipes.unified_sr import gems_backward, task_backward

    rows = {"rec": [TrainRow((1, 50, 51, 52, 53), 3), TrainRow((1, 52, 54, 50), 2)],
            "search": [TrainRow((1, 7, 8, 9, 55), 1), TrainRow((1, 9, 9, 51), 1)]}
    item_ids = torch.tensor(ITEMS)
    runs = []
    for form in ("dict", "rows"):
        model = tiny_llama()
        head = ItemHead(len(ITEMS), 16, torch.linspace(0, 1, len(ITEMS)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = gems.GemsOptimizer(torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.5),
                                     model=model, tasks=["search", "rec"], rank=2, task_rank=1, stash="full")
        if form == "dict":
            task_backward(opt, {t: E.row_item_losses(model, rows[t], 0, item_ids, head=head).mean()
                                for t in ("search", "rec")}, gems=True)
        else:
            flat = rows["rec"] + rows["search"]
            gems_backward(opt, E.row_item_losses(model, flat, 0, item_ids, head=head),
                          [("rec", rows["rec"]), ("search", rows["search"])])
        grads = {t: {w.name: opt._task_grads.grads[t][id(w.param)].clone() for w in opt.subspaces}
                 for t in ("search", "rec")}
        assert opt._task_grads.shared_weights() == pytest.approx([0.5, 0.5])
        opt.step()
        runs.append((grads, [p.detach().clone() for p in [*model.parameters(), *head.parameters()]]))
    (g1, p1), (g2, p2) = runs
    for t in g1:
        for k in g1[t]:
            torch.testing.assert_close(g2[t][k], g1[t][k], rtol=1e-5, atol=1e-7, msg=k)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
