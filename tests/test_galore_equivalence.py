"""With one task, task_rank=0 and no null space, GEMS over torch AdamW is GaLore (galore-torch) step for step."""
import copy
import warnings

import pytest
import torch
from torch import nn

import gems
from conftest import require

galore_torch = require("galore_torch")


def _mlp(dims, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _batches(dims, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, dims[0], generator=g), torch.randn(32, dims[-1], generator=g)) for _ in range(steps)]


def _train_galore(model, batches, *, rank, gap, scale, lr, proj_type="std"):
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    others = [p for p in model.parameters() if all(p is not w for w in weights)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = galore_torch.GaLoreAdamW(
            [{"params": others},
             {"params": weights, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": proj_type}],
            lr=lr, eps=0.0, weight_decay=0.0, no_deprecation_warning=True)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _train_gems(model, batches, *, rank, gap, scale, lr, proj_type="std"):
    inner = torch.optim.AdamW(model.parameters(), lr=lr, eps=0.0, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank clamping on the narrow layers
        opt = gems.GemsOptimizer(inner, model=model, rank=rank, task_rank=0, update_proj_gap=gap, scale=scale,
                                 proj_type=proj_type, basis_signs="solver")  # galore-torch keeps svd's signs
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _max_rel_err(a, b):
    return max(float((p - q).detach().norm() / q.detach().norm()) for p, q in zip(a.parameters(), b.parameters()))


# m < n and m > n layers in every case; ranks chosen where the spectrum has no near-tie at the cut.
CASES = [
    dict(dims=(24, 40, 12), rank=4, gap=10, scale=0.5, seed=0),
    dict(dims=(40, 20, 30), rank=6, gap=8, scale=1.0, seed=1),
    dict(dims=(17, 33, 9), rank=3, gap=12, scale=0.25, seed=2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c["dims"])))
def test_matches_galore_adamw(case):
    steps = 30
    reference = _mlp(case["dims"], case["seed"])
    ours = copy.deepcopy(reference)
    batches = _batches(case["dims"], steps, case["seed"] + 100)
    kw = dict(rank=case["rank"], gap=case["gap"], scale=case["scale"], lr=1e-3)
    _train_galore(reference, batches, **kw)
    _train_gems(ours, batches, **kw)
    assert _max_rel_err(ours, reference) <= 1e-4


@pytest.mark.parametrize("wrong", [dict(scale=0.5), dict(gap=7), dict(proj_type="reverse_std")])
def test_a_wrong_setting_is_detected(wrong):
    """The comparison has teeth: a different scale, refresh step or side differs by ≥ 1e-2."""
    case = CASES[0]
    reference = _mlp(case["dims"], case["seed"])
    ours = copy.deepcopy(reference)
    batches = _batches(case["dims"], 30, case["seed"] + 100)
    base = dict(rank=case["rank"], gap=case["gap"], scale=1.0, lr=1e-3)
    _train_galore(reference, batches, **base)
    _train_gems(ours, batches, **{**base, **wrong})
    assert _max_rel_err(ours, reference) >= 1e-2
