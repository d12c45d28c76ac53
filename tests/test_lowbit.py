"""gems.AdamW8bit: the fp32 path is torch's AdamW bit for bit; the 8-bit path rounds without bias, keeps
second moments decaying, tracks fp32 AdamW, holds ~¼ of its state, resumes bit-exactly, and works as the
inner optimizer of GemsOptimizer."""
import io

import pytest
import torch

import gems
from gems.lowbit import FP8, FP8_MAX, _round_e4m3, dequantize_blockwise, quantize_blockwise
from helpers import make_model, make_opt, task_batches, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed=0, m=64, n=96):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(256, m, generator=g), torch.randn(256, n, generator=g)
    return a, b, (torch.randn(m, n, generator=g) * 0.1).requires_grad_()


def _fit(opt, a, b, w, steps):
    losses = []
    for _ in range(steps):
        loss = ((a @ w - b) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_fp32_path_is_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    ps = [torch.randn(7, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    ref = torch.optim.AdamW([{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.0, "lr": 3e-3}],
                            lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    ours = gems.AdamW8bit([{"params": qs[:1]}, {"params": qs[1:], "weight_decay": 0.0, "lr": 3e-3}],
                          lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, min_size=10 ** 9)
    for step in range(6):
        g = [torch.randn_like(p) for p in ps]
        for p, q, gi in zip(ps, qs, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        ref.step()
        ours.step()
        for p, q in zip(ps, qs):
            assert torch.equal(p, q), step


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    grid = torch.arange(-127, 128, dtype=torch.int16).to(torch.int8).view(FP8).float()
    grid = torch.unique(grid[torch.isfinite(grid)])
    x = torch.tensor([0.3, -0.3, 1.1, -5.3, 17.7, 300.0, 0.001, 2.0 ** -7 + 2.0 ** -10, 440.0, 448.0, 0.0])
    draws = torch.stack([_round_e4m3(x, torch.Generator().manual_seed(s)).float() for s in range(4000)])
    for j, v in enumerate(x.tolist()):
        lo = grid[grid <= v].max()
        hi = grid[grid >= v].min()
        vals = set(draws[:, j].tolist())
        assert vals <= {float(lo), float(hi)}, (v, vals)
        step = float(hi - lo)
        if step:  # the mean is x to within the binomial noise of 4000 draws
            assert abs(float(draws[:, j].mean()) - v) < 4 * step / (2 * 4000 ** 0.5) + 1e-9, v
        else:
            assert vals == {v}  # representable values are kept
    assert float(draws.abs().max()) <= FP8_MAX


def test_blockwise_round_trip_and_nonzero_floor():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000) * torch.logspace(-6, 2, 1000)
    q, s = quantize_blockwise(x, 128, gen)
    assert q.dtype == FP8 and q.shape == (8, 128) and s.shape == (8, 1)
    y = dequantize_blockwise(q, s, x)
    big = x.abs() > 2.0 ** -6 * s.repeat_interleave(128)[:1000]
    assert (((y - x).abs() / x.abs())[big] <= 0.125 + 1e-6).all()  # within one e4m3 step of relative size
    tiny = torch.tensor([1.0] + [1e-9] * 15)
    q, s = quantize_blockwise(tiny, 16, gen, keep_nonzero=True)
    assert (dequantize_blockwise(q, s, tiny) > 0).all()


def test_second_moments_keep_decaying():
    """With round-to-nearest, an entry below its block's largest one rounds √v·√β2 back to itself and its v
    would never decay (only the block maximum decays, through the scale)."""
    p = torch.zeros(8192, requires_grad=True)
    opt = gems.AdamW8bit([p], lr=1e-3, weight_decay=0.0)
    g0 = torch.linspace(0.3, 1.0, 8192)
    p.grad = g0.clone()
    opt.step()
    for _ in range(400):
        p.grad = torch.zeros(8192)
        opt.step()
    st = opt.state[p]
    v = dequantize_blockwise(st["exp_avg_sqrt_fp8"], st["exp_avg_sqrt_scale"], p) ** 2
    expect = (1 - 0.999) * g0 ** 2 * 0.999 ** 400
    assert abs(float(v.sum() / expect.sum()) - 1) < 0.01
    m = dequantize_blockwise(st["exp_avg_fp8"], st["exp_avg_scale"], p)
    assert abs(float(m.sum() / (0.1 * g0 * 0.9 ** 400).sum()) - 1) < 0.01


def test_tracks_fp32_adamw_and_holds_a_quarter_of_its_state():
    a, b, w = _problem()
    w32 = w.detach().clone().requires_grad_()
    ref = torch.optim.AdamW([w32], lr=3e-3, weight_decay=0.01, foreach=False)
    ours = gems.AdamW8bit([w], lr=3e-3, weight_decay=0.01)
    l32, l8 = _fit(ref, a, b, w32, 150), _fit(ours, a, b, w, 150)
    assert l8[-1] < 0.5 * l8[0]
    assert abs(l8[-1] / l32[-1] - 1) < 0.02
    assert float((w - w32).norm() / (w32 - _problem()[2]).norm()) < 0.05
    fp32_bytes = sum(v.numel() * v.element_size() for v in ref.state[w32].values())
    assert ours.state_bytes() <= 0.27 * fp32_bytes


def test_resume_is_bit_exact_with_8bit_state():
    a, b, w = _problem(1)
    opt = gems.AdamW8bit([w], lr=3e-3)
    _fit(opt, a, b, w, 5)
    buf = io.BytesIO()
    torch.save({"w": w.detach().clone(), "opt": opt.state_dict()}, buf)
    _fit(opt, a, b, w, 5)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    w2 = saved["w"].clone().requires_grad_()
    opt2 = gems.AdamW8bit([w2], lr=3e-3)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[w2]["exp_avg_fp8"].dtype == FP8 and opt2.state_bytes() == opt.state_bytes()
    _fit(opt2, a, b, w2, 5)
    assert torch.equal(w, w2)


def test_as_the_inner_optimizer_of_gems():
    batches = task_batches(30, seed=3)
    runs = {}
    for name, cls in (("fp32", torch.optim.AdamW), ("8bit", gems.AdamW8bit)):
        model = make_model(3, hidden=64)
        kw = {"lr": 1e-2} if cls is torch.optim.AdamW else {"lr": 1e-2, "min_size": 256}
        opt = make_opt(model, inner_cls=cls, inner_kw=kw, rank=8, task_rank=4)
        losses = train(model, opt, batches)
        runs[name] = (sum(losses[-1].values()), sum(losses[0].values()), opt)
    (l32, l0, _), (l8, l08, opt8) = runs["fp32"], runs["8bit"]
    assert l0 == l08 and l8 < 0.75 * l08
    assert abs(l8 / l32 - 1) < 0.1
    quantized = [st for st in opt8.inner.state.values() if "exp_avg_fp8" in st]
    assert quantized  # the subspace coordinates' moments are the 8-bit ones
    with pytest.raises(ValueError, match="rotate"):
        make_opt(make_model(0), inner_cls=gems.AdamW8bit, state_transfer="rotate")


@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(block_size=8), dict(min_size=-1)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        gems.AdamW8bit([torch.zeros(3, requires_grad=True)], **kw)
