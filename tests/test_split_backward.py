"""The one-backward form opt.backward(row_losses, task_ids=...) against the per-task-backward dict form (the
reference path): per-task gradients, coordinates and norms, mixed gradients, whole runs, a tiny Llama with
padding and gradient checkpointing, accumulation with unequal task counts, autocast, and its errors."""
import warnings

import pytest
import torch
import transformers
from torch import nn

import gems
from gems import split_backward
from helpers import TwoTaskNet, make_opt

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ["a", "b"]


def _rows(seed=0, n=10, d_in=12, d_out=6):
    """n rows of two regression tasks, interleaved (non-contiguous task rows), with different targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    wa, wb = torch.randn(d_in, d_out, generator=g), torch.randn(d_in, d_out, generator=g)
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1][:n] if n <= 10 else [i % 3 % 2 for i in range(n)])
    y = torch.where(ids[:, None] == 0, torch.tanh(x @ wa), torch.tanh(x @ wb))
    weights = torch.rand(n, generator=g) + 0.5
    return x, y, ids, weights


def _row_losses(model, x, y):
    return ((model(x) - y) ** 2).mean(1)


def _dict_losses(model, x, y, ids, weights):
    """The same objective as per-task weighted means (the reference form), and the per-task weights."""
    per_row = _row_losses(model, x, y)
    losses, counts = {}, {}
    for k, t in enumerate(TASKS):
        rows = ids == k
        counts[t] = float(weights[rows].sum())
        losses[t] = (per_row[rows] * weights[rows]).sum() / counts[t]
    return losses, counts


def _twins(seed=0, **kw):
    out = []
    for _ in range(2):
        torch.manual_seed(seed)
        model = TwoTaskNet()
        out.append((model, make_opt(model, **kw)))
    return out


def _step_both(*opts):
    for o in opts:
        o.step()
        o.zero_grad()


def _assert_same_params(m1, m2):
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-5)


def test_row_split_linear_is_an_nn_linear_with_the_same_gradients():
    torch.manual_seed(0)
    ref = nn.Linear(7, 5)
    model = nn.Sequential(nn.Linear(7, 5))
    model[0].load_state_dict(ref.state_dict())
    split_backward.convert(model, {id(model[0].weight)})
    assert type(model[0]) is split_backward.RowSplitLinear and isinstance(model[0], nn.Linear)
    x = torch.randn(3, 4, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    (model(x) ** 2).sum().backward()
    (ref(x2) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(model[0].weight.grad, ref.weight.grad)
    torch.testing.assert_close(model[0].bias.grad, ref.bias.grad)
    assert set(model.state_dict()) == {"0.weight", "0.bias"}


@pytest.mark.parametrize("stash", ["full", "projected"])
def test_one_backward_gives_each_tasks_gradient_and_the_mixed_gradient(stash):
    (m1, o1), (m2, o2) = _twins(stash=stash, update_proj_gap=100)
    x, y, ids, weights = _rows(1)
    for m, o in ((m1, o1), (m2, o2)):  # a first step builds the bases, so the projected stash projects next
        losses, counts = _dict_losses(m, x, y, ids, weights)
        o.backward(losses, num_samples=counts)
        o.step()
        o.zero_grad()
    x, y, ids, weights = _rows(2)
    losses, counts = _dict_losses(m1, x, y, ids, weights)
    o1.backward(losses, num_samples=counts)
    o2.backward(_row_losses(m2, x, y), task_ids=[TASKS[i] for i in ids], row_weights=weights)
    s1, s2 = o1._task_grads, o2._task_grads
    assert s1.samples == pytest.approx(s2.samples) and s1.mean_losses() == pytest.approx(s2.mean_losses())
    for w1, w2 in zip(o1.subspaces, o2.subspaces):
        for t in TASKS:
            if stash == "full":
                torch.testing.assert_close(s2.grads[t][id(w2.param)], s1.grads[t][id(w1.param)], rtol=1e-5, atol=1e-6)
            else:
                assert id(w2.param) not in s2.grads[t]  # coordinates only, no m×n gradient kept
                torch.testing.assert_close(s2.coords[t][id(w2.param)], s1.coords[t][id(w1.param)],
                                           rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(s2.sqnorms[t][id(w2.param)], s1.sqnorms[t][id(w1.param)],
                                           rtol=1e-5, atol=1e-7)
    mix = [c / sum(counts.values()) for c in counts.values()]
    for p1, p2 in zip(o1._plain_params, o2._plain_params):  # biases, the LayerNorm and the gain
        expected = sum(wt * s1.grads[t][id(p1)] for wt, t in zip(mix, TASKS))
        torch.testing.assert_close(s2.mixed[id(p2)], expected, rtol=1e-5, atol=1e-6)
        assert all(id(p2) not in s2.grads[t] for t in TASKS)  # kept once, not per task
    assert o1.shared_grad_norm() == pytest.approx(o2.shared_grad_norm(), rel=1e-5)


@pytest.mark.parametrize("n_rows", [4, 40])
def test_projected_coordinates_and_norms_on_both_sides(n_rows):
    """Few rows take the Gram form of ‖G‖², many rows form G; both sides (TwoTaskNet has m<n and m>n)."""
    torch.manual_seed(3)
    x = torch.randn(2, n_rows // 2, 9)
    dy = torch.randn(2, n_rows // 2, 13)
    g = (dy.reshape(-1, 13).T @ x.reshape(-1, 9)) * 1.7
    for side, dim in (("left", 13), ("right", 9)):
        basis = torch.linalg.qr(torch.randn(dim, 3))[0]
        coords, sq = split_backward.task_coordinates(x.reshape(-1, 9), dy.reshape(-1, 13), basis, side, 1.7)
        torch.testing.assert_close(coords, basis.T @ g if side == "left" else g @ basis, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sq, g.square().sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stash", ["full", "projected"])
def test_a_whole_run_matches_the_per_task_backward_run_step_for_step(stash):
    """Refreshes every 3 steps (in backward for the projected stash), heuristic gates, 7 steps."""
    (m1, o1), (m2, o2) = _twins(seed=5, stash=stash, update_proj_gap=3)
    for step in range(7):
        x, y, ids, weights = _rows(10 + step)
        losses, counts = _dict_losses(m1, x, y, ids, weights)
        o1.backward(losses, num_samples=counts)
        o2.backward(_row_losses(m2, x, y), task_ids=ids, row_weights=weights)
        _step_both(o1, o2)
        _assert_same_params(m1, m2)
        assert o1.last_gates == pytest.approx(o2.last_gates, rel=1e-4)
    assert any(w.step == 7 for w in o2.subspaces)


@pytest.mark.parametrize("stash", ["full", "projected"])
def test_accumulation_with_unequal_task_counts(stash):
    """Three micro-batches, one without task b (first on even steps: a due weight then waits for b's rows
    before its refresh): the same stash as the dict form (itself checked against the concatenated batch in
    test_defects)."""
    (m1, o1), (m2, o2) = _twins(seed=7, stash=stash, update_proj_gap=2)
    for step in range(4):
        micros = ((3, True), (6, False), (10, False)) if step % 2 == 0 else ((6, False), (3, True), (10, False))
        for micro, (n, only_a) in enumerate(micros):
            x, y, ids, weights = _rows(100 * step + micro, n=n)
            if only_a:
                ids = torch.zeros_like(ids)
            losses, counts = _dict_losses(m1, x, y, ids, weights)
            if only_a:
                losses["b"] = losses["a"] * 0.0
            o1.backward(losses, num_samples=counts)
            o2.backward(_row_losses(m2, x, y), task_ids=ids, row_weights=weights)
        _step_both(o1, o2)
        _assert_same_params(m1, m2)


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _llama_batch(seed=0, n=6, length=9):
    """Left-padded rows of different lengths; labels on the last half of each row's real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 48, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    labels = ids.clone()
    for r in range(n):
        pad = int(torch.randint(0, 4, (), generator=g))
        mask[r, :pad] = 0
        ids[r, :pad] = 0
        labels[r, :pad + (length - pad) // 2] = -100
    ids[0, -3] = 0  # the padding token as a real token too: nn.Embedding(padding_idx=0) gives its row no gradient
    tasks = torch.tensor([0, 1, 0, 0, 1, 1][:n])
    return ids, mask, labels, tasks


def _token_losses(model, ids, mask, labels):
    """Per row: mean next-token NLL over its label tokens, and its label-token count."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    count = (target != -100).sum(1)
    return (nll.sum(1) / count.clamp_min(1)), count.float()


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_tiny_llama_with_padding_and_gradient_checkpointing(checkpointing):
    """The reference runs without checkpointing (the dict form cannot run under reentrant checkpointing:
    torch refuses autograd.grad/inputs= there; the one-backward form needs neither)."""
    pairs = []
    for i in range(2):
        model = _llama(11)
        if checkpointing and i == 1:
            model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        model.train()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = gems.GemsOptimizer(inner, model=model, tasks=TASKS, rank=4, task_rank=2, update_proj_gap=2,
                                     stash="projected")
        pairs.append((model, opt))
    (m1, o1), (m2, o2) = pairs
    for step in range(3):
        ids, mask, labels, tasks = _llama_batch(step)
        per_row, count = _token_losses(m1, ids, mask, labels)
        losses = {t: (per_row * count)[tasks == k].sum() / count[tasks == k].sum() for k, t in enumerate(TASKS)}
        o1.backward(losses, num_samples={t: float(count[tasks == k].sum()) for k, t in enumerate(TASKS)})
        per_row, count = _token_losses(m2, ids, mask, labels)
        o2.backward(per_row, task_ids=tasks, row_weights=count)
        if step == 2:  # between refreshes: coordinates and norms
            for w1, w2 in zip(o1.subspaces, o2.subspaces):
                for t in TASKS:
                    torch.testing.assert_close(o2._task_grads.coords[t][id(w2.param)],
                                               o1._task_grads.coords[t][id(w1.param)], rtol=1e-4, atol=1e-6)
        _step_both(o1, o2)
    assert len(o2.subspaces) == 14  # 7 Linear layers per block
    _assert_same_params(m1, m2)


def test_autocast_bf16_is_close_to_the_per_task_backward():
    pairs = []
    for _ in range(2):
        model = _llama(13)
        opt = make_opt(model, stash="full", update_proj_gap=10)
        pairs.append((model, opt))
    (m1, o1), (m2, o2) = pairs
    ids, mask, labels, tasks = _llama_batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_row, count = _token_losses(m1, ids, mask, labels)
    losses = {t: (per_row * count)[tasks == k].sum() / count[tasks == k].sum() for k, t in enumerate(TASKS)}
    o1.backward(losses, num_samples={t: float(count[tasks == k].sum()) for k, t in enumerate(TASKS)})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_row, count = _token_losses(m2, ids, mask, labels)
    o2.backward(per_row, task_ids=tasks, row_weights=count)
    for w1, w2 in zip(o1.subspaces, o2.subspaces):
        for t in TASKS:
            g1, g2 = o1._task_grads.grads[t][id(w1.param)], o2._task_grads.grads[t][id(w2.param)]
            assert g2.dtype == torch.float32
            assert float((g2 - g1).norm() / g1.norm()) < 0.02  # bf16 rounding of X, dY and the products


def test_errors_at_the_boundary():
    model = TwoTaskNet()
    opt = make_opt(model)
    x, y, ids, _ = _rows(0)
    with pytest.raises(KeyError, match="unknown task"):
        opt.backward(_row_losses(model, x, y), task_ids=["a"] * 9 + ["c"])
    with pytest.raises(ValueError, match="10 rows"):
        opt.backward(_row_losses(model, x, y), task_ids=ids[:4])
    with pytest.raises(ValueError, match="index the tasks"):
        opt.backward(_row_losses(model, x, y), task_ids=ids + 1)
    with pytest.raises(ValueError, match="1-D"):
        opt.backward((model(x) - y) ** 2, task_ids=ids)
    with pytest.raises(ValueError, match="need task_ids"):
        opt.backward(_row_losses(model, x, y))
    with pytest.raises(ValueError, match="row_weights"):
        opt.backward(_row_losses(model, x, y), task_ids=ids, row_weights=-torch.ones(10))
    with pytest.raises(ValueError, match="num_samples is for the dict form"):
        opt.backward(_row_losses(model, x, y), num_samples={"a": 1, "b": 1})
    with pytest.raises(ValueError, match="go with a 1-D tensor"):
        opt.backward({"a": _row_losses(model, x, y).mean(), "b": _row_losses(model, x, y).mean()}, task_ids=ids)
    with pytest.raises(RuntimeError, match="rows in the first"):  # the batch is not the first dimension
        opt.backward(((model(x[None]) - y[None]) ** 2).mean(-1).flatten(), task_ids=ids)
    assert opt._task_grads.empty
    opt.backward(_row_losses(model, x, y), task_ids=ids)
    with pytest.raises(RuntimeError, match="one form per step"):
        opt.backward({t: _row_losses(model, x, y).mean() for t in TASKS})
    opt.zero_grad()
    inner = torch.optim.AdamW(TwoTaskNet().parameters(), lr=1e-2)
    no_model = gems.GemsOptimizer(inner, tasks=TASKS, rank=2, task_rank=1)
    with pytest.raises(ValueError, match="no model="):
        no_model.backward(torch.ones(2, requires_grad=True), task_ids=[0, 1])


def test_a_weight_used_outside_its_linear_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6, bias=False)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)) + x @ self.a.weight.T)

    torch.manual_seed(0)
    model = Tied()
    opt = make_opt(model)
    with pytest.raises(RuntimeError, match="used outside its Linear"):
        opt.backward(model(torch.randn(4, 6)).square().mean(1), task_ids=[0, 1, 0, 1])
    assert opt._task_grads.empty and all(p.grad is None for p in model.parameters())


def _llama_opt(tied, stash, seed=17, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tied, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    model.model.embed_tokens.padding_idx = 0
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(inner, model=model, tasks=TASKS, rank=4, task_rank=2, update_proj_gap=2,
                                 stash=stash, target_embeddings=True, **kw)
    return model, opt


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("stash", ["full", "projected"])
def test_target_embeddings_split_by_rows(tied, stash):
    """The embedding's task gradients are a scatter-add of dY's rows (the padding row gets none); a tied LM head
    adds its own piece. Untied: the same stash as the dict form (coordinates and norms); tied: the same
    coordinates (projected norms are then estimated, see split_backward), and with uniform gates the same run."""
    kw = {"gating": "uniform"} if tied and stash == "projected" else {}
    (m1, o1), (m2, o2) = _llama_opt(tied, stash, **kw), _llama_opt(tied, stash, **kw)
    emb = m2.model.embed_tokens
    assert type(emb) is split_backward.RowSplitEmbedding and id(emb.weight) in o2._row_split
    if tied:
        assert type(m2.lm_head) is split_backward.RowSplitLinear
    for step in range(4):
        ids, mask, labels, tasks = _llama_batch(20 + step)
        per_row, count = _token_losses(m1, ids, mask, labels)
        losses = {t: (per_row * count)[tasks == k].sum() / count[tasks == k].sum() for k, t in enumerate(TASKS)}
        o1.backward(losses, num_samples={t: float(count[tasks == k].sum()) for k, t in enumerate(TASKS)})
        per_row, count = _token_losses(m2, ids, mask, labels)
        o2.backward(per_row, task_ids=tasks, row_weights=count)
        s1, s2 = o1._task_grads, o2._task_grads
        w1 = next(w for w in o1.subspaces if w.name.endswith("embed_tokens.weight"))
        w2 = next(w for w in o2.subspaces if w.name.endswith("embed_tokens.weight"))
        for t in TASKS:
            if id(w1.param) in s1.grads[t]:
                g = s2.grads[t][id(w2.param)]
                # atol 1e-5: by step 3 the two runs' fp32 reduction orders differ by up to 3e-6 on Intel CPUs
                # (mean |entry| ~2e-2); a wrong row split, scale or sign is off by the entries themselves
                torch.testing.assert_close(g, s1.grads[t][id(w1.param)], rtol=1e-4, atol=1e-5)
                if not tied:  # the padding row (tied: the LM head's logit of token 0 still has a gradient)
                    assert float(g[0].abs().max()) == 0.0
            if id(w1.param) in s1.coords[t]:
                torch.testing.assert_close(s2.coords[t][id(w2.param)], s1.coords[t][id(w1.param)], rtol=1e-4, atol=2e-5)
                if not tied:
                    torch.testing.assert_close(s2.sqnorms[t][id(w2.param)], s1.sqnorms[t][id(w1.param)], rtol=1e-4,
                                               atol=1e-9)
        _step_both(o1, o2)
    _assert_same_params(m1, m2)
