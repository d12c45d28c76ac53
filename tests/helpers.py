"""Small deterministic models and task data shared by the optimizer tests."""
import warnings

import torch
from torch import nn

import gems


class TwoTaskNet(nn.Module):
    """A trunk of Linear layers (m<n and m>n shapes, odd sizes) with a bias, a norm and a 1-D scale."""

    def __init__(self, d_in=12, hidden=20, d_out=6):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.mid = nn.Linear(hidden, 2 * hidden + 3, bias=False)
        self.out = nn.Linear(2 * hidden + 3, d_out)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.gain * self.out(torch.tanh(self.mid(self.norm(torch.tanh(self.inp(x))))))


class SameShapesNet(nn.Module):
    """Four 16×16 weights (one batch for the refresh), plus an input and an output layer of other shapes."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.mid = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(4))
        self.out = nn.Linear(16, 6)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        for layer in self.mid:
            x = torch.tanh(layer(x))
        return self.out(x)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TwoTaskNet(**kw)


def task_batches(steps, seed=0, n=16, d_in=12, d_out=6):
    """Two regression tasks with different targets (so their gradients differ)."""
    g = torch.Generator().manual_seed(seed)
    wa, wb = torch.randn(d_in, d_out, generator=g), torch.randn(d_in, d_out, generator=g)
    out = []
    for _ in range(steps):
        xa, xb = torch.randn(n, d_in, generator=g), torch.randn(n, d_in, generator=g)
        out.append({"a": (xa, torch.tanh(xa @ wa)), "b": (xb, torch.tanh(xb @ wb))})
    return out


def task_losses(model, batch):
    return {t: nn.functional.mse_loss(model(x), y) for t, (x, y) in batch.items()}


def make_opt(model, inner_cls=torch.optim.AdamW, inner_kw=None, **kw):
    inner = inner_cls(model.parameters(), **(inner_kw or {"lr": 1e-2}))
    kw.setdefault("tasks", ["a", "b"])
    kw.setdefault("rank", 4)
    kw.setdefault("task_rank", 2)
    kw.setdefault("update_proj_gap", 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gems.GemsOptimizer(inner, model=model, **kw)


def train(model, opt, batches, num_samples=None):
    losses = []
    for batch in batches:
        ls = task_losses(model, batch)
        opt.backward(ls, num_samples=num_samples)
        opt.step()
        opt.zero_grad()
        losses.append({t: float(v.detach()) for t, v in ls.items()})
    return losses


def saved_weight(opt, sd, name):
    """Targeted weight ``name``'s entry in ``opt.state_dict()`` (torch's layout: keyed by its position in
    ``opt.param_groups``): {"gems": {step, bases, ...}, "coords": {subspace: inner state}}."""
    params = [p for g in opt.param_groups for p in g["params"]]
    w = next(w for w in opt.subspaces if w.name == name)
    return sd["state"][next(i for i, p in enumerate(params) if p is w.param)]
