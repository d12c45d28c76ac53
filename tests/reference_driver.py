"""Drives GemsOptimizer and the fp64 ground truth (gems.reference.gems_step) over the same data.

Three tasks with unequal sample counts, weights with m > n and m < n, a plain (non-targeted) gain vector,
refreshes every 3 steps: inputs on which a wrong sign, side, scale, gate, mixing weight or basis changes
the result. The reference computes its own gradients at its own (fp64) weights, so every execution path is
compared with one trajectory that shares none of its code beyond the readable functions of gems.reference."""
import warnings

import torch
from torch import nn
from torch.func import functional_call

import gems
from gems import reference

TASKS = ["a", "b", "c"]
STEPS = 7
GAP = 3
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.99), 1e-6, 0.05
RANK, TASK_RANK, SCALE = 3, 2, 0.7


class Net(nn.Module):
    """l1: 13×7 (m > n, basis on the right), l2: 6×13 (m < n, basis on the left), a gain outside GEMS."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(7, 13, bias=False)
        self.l2 = nn.Linear(13, 6, bias=False)
        self.gain = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return self.gain * self.l2(torch.tanh(self.l1(x)))


WEIGHTS = {"l1": "l1.weight", "l2": "l2.weight"}


def make_model(seed=0):
    torch.manual_seed(seed)
    return Net()


def make_data(steps=STEPS, counts=({"a": 3, "b": 7, "c": 12},), seed=1):
    """steps × calls of {task: (x, y)}; ``counts`` gives each call's samples per task (cycled)."""
    g = torch.Generator().manual_seed(seed)
    targets = {t: torch.randn(7, 6, generator=g) for t in TASKS}
    data = []
    for _ in range(steps):
        calls = []
        for c in counts:
            call = {}
            for i, t in enumerate(TASKS):
                x = torch.randn(c[t], 7, generator=g)
                call[t] = (x, torch.tanh(x @ targets[t]) + 0.3 * i)  # unequal losses, for the gates
            calls.append(call)
        data.append(calls)
    return data


def losses_of(model_or_params, call, model=None):
    out = {}
    for t, (x, y) in call.items():
        pred = model_or_params(x) if model is None else functional_call(model, model_or_params, (x.double(),))
        out[t] = nn.functional.mse_loss(pred, y.to(pred.dtype))
    return out


def nullspace_bases(side, k=2, seed=5):
    """Orthonormal protected bases of the two weights on ``side`` ("input": d_in×k, "output": d_out×k)."""
    g = torch.Generator().manual_seed(seed)
    dims = {"l1": 7, "l2": 13} if side == "input" else {"l1": 13, "l2": 6}
    return {m: torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q.float() for m, d in dims.items()}


def run_gems(data, *, seed=0, calls_samples=None, **kw):
    """Train with GemsOptimizer; returns the final parameters (fp32) and the optimizer."""
    model = make_model(seed)
    inner = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    kw.setdefault("rank", RANK)
    kw.setdefault("task_rank", TASK_RANK)
    kw.setdefault("scale", SCALE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(inner, model=model, tasks=TASKS, update_proj_gap=GAP, **kw)
    for calls in data:
        for call in calls:
            opt.backward(losses_of(model, call), num_samples={t: x.shape[0] for t, (x, _) in call.items()})
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.named_parameters()}, opt


def run_reference(data, *, seed=0, gating="heuristic", task_basis="residual", state_transfer="keep",
                  nullspace=None, nullspace_side="input", nullspace_mode="update", nullspace_weight_decay="project",
                  scale=SCALE, rank=RANK, task_rank=TASK_RANK):
    """The same training with gems.reference.gems_step in fp64; the gain takes torch AdamW on the shared
    gradient. Each task's gradient is the sample-weighted mean over the step's calls."""
    model = make_model(seed)
    params = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    states = {m: reference.initial_state() for m in WEIGHTS}
    gain = params["gain"]
    gain_opt = torch.optim.AdamW([gain], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    model = model.double()
    for calls in data:
        grads = {t: {k: torch.zeros_like(v) for k, v in params.items()} for t in TASKS}
        n = {t: 0.0 for t in TASKS}
        loss_sum = {t: 0.0 for t in TASKS}
        for call in calls:
            live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            for t, loss in losses_of(live, call, model=model).items():
                count = call[t][0].shape[0]
                for k, g in zip(live, torch.autograd.grad(loss, list(live.values()))):
                    grads[t][k] += count * g
                n[t] += count
                loss_sum[t] += count * float(loss.detach())
        for t in TASKS:
            for k in grads[t]:
                grads[t][k] /= n[t]
        total = sum(n.values())
        norms = [sum(float(grads[t][WEIGHTS[m]].square().sum()) for m in WEIGHTS) ** 0.5 for t in TASKS]
        fixed = [gating[t] for t in TASKS] if isinstance(gating, dict) else gating
        g = dict(zip(TASKS, reference.gates(fixed, [loss_sum[t] / n[t] for t in TASKS], norms, [n[t] for t in TASKS])))
        for m, key in WEIGHTS.items():
            q = None if nullspace is None else nullspace[m].double()
            cfg = reference.StepConfig(side=reference.side_for(params[key].shape, "std"), rank=rank,
                                       task_rank=task_rank, update_proj_gap=GAP, lr=LR, betas=BETAS, eps=EPS,
                                       weight_decay=WD, scale=scale, task_basis=task_basis,
                                       state_transfer=state_transfer, nullspace=q, protect_side=nullspace_side,
                                       nullspace_mode=nullspace_mode, nullspace_weight_decay=nullspace_weight_decay)
            params[key], states[m] = reference.gems_step(params[key], {t: grads[t][key] for t in TASKS}, n,
                                                         states[m], cfg, task_gates=g)
        gain.grad = sum((n[t] / total) * grads[t]["gain"] for t in TASKS)
        gain_opt.step()
    return {k: v.detach() for k, v in params.items()}, states


def assert_matches(got, want, rtol=2e-4, atol=2e-6):
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
