"""Cheap, opt-in diagnostics of multi-task training: pure functions on tensors that return python floats.

Every reduction runs in fp64 (inputs are cast), so values are comparable across backends and dtypes.
Bases follow :mod:`gems.reference`: ``"left"`` (m×r, coordinates Bᵀ·G) or ``"right"`` (n×r, G·B).
Key names produced here (and by :func:`flatten_diagnostics`):

- ``cos/<a>-<b>``: cosine between the gradients of tasks a and b (flattened);
- ``conflict``: :func:`conflict_ratio`;
- ``energy/<subspace>``: :func:`captured_energy` of a subspace (``shared`` or a task name);
- ``angle/<s>-<t>``: smallest principal angle between two subspaces, in degrees;
- ``leakage``: :func:`gems.nullspace.leakage` of the applied update;
- ``gate/<task>`` (top level, from :func:`flatten_diagnostics`).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gems import nullspace as nsp
from gems import reference

__all__ = [
    "gradient_cosines",
    "conflict_ratio",
    "captured_energy",
    "principal_angles",
    "layer_diagnostics",
    "flatten_diagnostics",
]


def _flat64(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).to(torch.float64)


def gradient_cosines(task_grads: Mapping[str, Tensor]) -> dict[tuple[str, str], float]:
    """Cosine similarity of every pair of task gradients, keyed ``(a, b)`` in the dict's task order
    (a before b). A pair where either gradient is zero gets 0.0 (no signal, hence no conflict)."""
    names = list(task_grads)
    flat = {n: _flat64(task_grads[n]) for n in names}
    norms = {n: float(torch.linalg.norm(v)) for n, v in flat.items()}
    out: dict[tuple[str, str], float] = {}
    for a, b in itertools.combinations(names, 2):
        if flat[a].shape != flat[b].shape:
            raise ValueError(f"gradients of {a!r} and {b!r} differ in size: {flat[a].numel()} vs {flat[b].numel()}")
        den = norms[a] * norms[b]
        out[(a, b)] = float(torch.dot(flat[a], flat[b])) / den if den > 0 else 0.0
    return out


def conflict_ratio(task_grads: Mapping[str, Tensor]) -> float:
    """Share of elements where two task gradients have strictly opposite signs (an element where either
    is zero does not conflict). With more than two tasks: the mean of that share over all task pairs, so
    the number means the same thing whatever the number of tasks (the sign of each pair's cosine is in
    :func:`gradient_cosines`). 0.0 with fewer than two tasks."""
    names = list(task_grads)
    if len(names) < 2:
        return 0.0
    signs = {n: torch.sign(task_grads[n].detach().reshape(-1)) for n in names}
    shares = []
    for a, b in itertools.combinations(names, 2):
        if signs[a].shape != signs[b].shape:
            raise ValueError(f"gradients of {a!r} and {b!r} differ in size")
        numel = signs[a].numel()
        shares.append(float((signs[a] * signs[b] < 0).sum()) / numel if numel else 0.0)
    return sum(shares) / len(shares)


def captured_energy(grad: Tensor, basis: Tensor, side: str) -> float:
    """‖BᵀG‖²/‖G‖² (``side="left"``) or ‖G·B‖²/‖G‖² (``"right"``): the share of the gradient's energy the
    subspace sees, in [0, 1] for an orthonormal basis (a null-space-folded basis is not orthonormal;
    the value is then the energy of the coordinates, at most 1). 0.0 for a zero gradient."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    g = grad.detach().to(torch.float64)
    total = float(torch.linalg.norm(g)) ** 2
    if total == 0.0 or basis.shape[-1] == 0:
        return 0.0
    b = basis.detach().to(device=g.device, dtype=torch.float64)
    coords = b.T @ g if side == "left" else g @ b
    return float(torch.linalg.norm(coords)) ** 2 / total


def principal_angles(basis_a: Tensor, basis_b: Tensor) -> Tensor:
    """Principal angles between span(basis_a) and span(basis_b), in **degrees**, ascending, fp64, of
    length min(k_a, k_b).

    The columns are re-orthonormalised (QR) first, so any full-column-rank bases work. Small angles come
    from the sines (singular values of (I − Q_a Q_aᵀ) Q_b) and large ones from the cosines, as in
    Björck & Golub, so both 0° and 90° are accurate to rounding."""
    if basis_a.dim() != 2 or basis_b.dim() != 2 or basis_a.shape[0] != basis_b.shape[0]:
        raise ValueError(f"bases must be d×k matrices of the same d, got {tuple(basis_a.shape)} and "
                         f"{tuple(basis_b.shape)}")
    qa = torch.linalg.qr(basis_a.detach().to(torch.float64))[0]
    qb = torch.linalg.qr(basis_b.detach().to(device=qa.device, dtype=torch.float64))[0]
    if qa.shape[1] < qb.shape[1]:
        qa, qb = qb, qa  # qa spans the larger space: then qb's residual has the sines of all angles
    k = qb.shape[1]
    if k == 0:
        return torch.zeros(0, dtype=torch.float64)
    cos = torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)  # descending → angles ascending
    sin = torch.linalg.svdvals(qb - qa @ (qa.T @ qb)).clamp(0.0, 1.0).flip(0)  # ascending
    theta = torch.where(cos * cos < 0.5, torch.arccos(cos), torch.arcsin(sin))
    return torch.rad2deg(theta).cpu()


def layer_diagnostics(
    task_grads: Mapping[str, Tensor],
    *,
    bases: Mapping[str, Tensor] | None = None,
    side: str | None = None,
    shared_grad: Tensor | None = None,
    update: Tensor | None = None,
    nullspace_basis: Tensor | None = None,
    protect_side: str | None = None,
) -> dict[str, float]:
    """All per-layer scalars for one weight, with the key names of this module's docstring.

    ``bases`` maps a subspace name (``"shared"`` or a task name) to its basis on ``side``; the energy of
    ``"shared"`` is measured on ``shared_grad`` (default: the mean of the task gradients) and that of a task
    on its own gradient. ``angle/shared-<task>`` is the smallest principal angle (degrees) between the
    shared and each task subspace. ``leakage`` is reported when ``update`` and ``nullspace_basis`` are given.
    """
    out: dict[str, float] = {}
    for (a, b), c in gradient_cosines(task_grads).items():
        out[f"cos/{a}-{b}"] = c
    if len(task_grads) >= 2:
        out["conflict"] = conflict_ratio(task_grads)
    if bases:
        if side is None:
            raise ValueError("side is needed with bases")
        if shared_grad is None and task_grads:
            shared_grad = sum(g.detach().to(torch.float64) for g in task_grads.values()) / len(task_grads)
        for name, basis in bases.items():
            grad = shared_grad if name == "shared" else task_grads.get(name)
            if grad is not None:
                out[f"energy/{name}"] = captured_energy(grad, basis, side)
        if "shared" in bases:
            for name, basis in bases.items():
                if name != "shared" and basis.shape[1] and bases["shared"].shape[1]:
                    out[f"angle/shared-{name}"] = float(principal_angles(bases["shared"], basis)[0])
    if update is not None and nullspace_basis is not None:
        from gems.nullspace import leakage

        out["leakage"] = leakage(update, nullspace_basis, protect_side or "input")
    return out


def _key(part: Any) -> str:
    if isinstance(part, tuple):
        return "-".join(str(p) for p in part)
    return str(part)


def _to_float(value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"diagnostic values must be scalars, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().reshape(()).item())
    return float(value)


def _walk(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _walk(f"{prefix}/{_key(k)}" if prefix else _key(k), v, out)
    else:
        out[prefix] = _to_float(value)


def flatten_diagnostics(
    per_layer: Mapping[str, Mapping[str, Any]],
    gates: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """One flat ``{key: float}`` dict for any logger, keys sorted: ``"<layer>/<metric>"`` for every
    per-layer value (nested dicts are joined with ``/``, tuple keys such as ``("search", "rec")`` with
    ``-``: ``"layer.0.q_proj/cos/search-rec"``), plus ``"gate/<task>"``. Values (python numbers, bools or
    one-element tensors) become python floats; NaN/inf are kept as they are."""
    out: dict[str, float] = {}
    for layer, metrics in per_layer.items():
        _walk(_key(layer), metrics, out)
    for task, g in (gates or {}).items():
        out[f"gate/{_key(task)}"] = _to_float(g)
    return {k: out[k] for k in sorted(out)}


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when none): a helper to summarise one key over layers."""
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


# ------------------------------------------------------------------------------------------ an optimizer's
def optimizer_diagnostics(opt: Any) -> dict[str, float]:
    """GemsOptimizer.diagnostics (see there): every targeted weight's layer diagnostics from the stash."""
    per_layer: dict[str, dict[str, float]] = {}
    stash, tasks = opt._task_grads, opt.config.tasks
    for w in opt._subspaces:
        grads = {} if stash.empty else {t: stash.grads[t][id(w.param)] for t in tasks
                                         if id(w.param) in stash.grads[t]}
        bases = {s: w.bases[s] for s in w.subspaces() if w.bases[s] is not None}
        shared = (reference.shared_gradient(list(grads.values()), stash.shared_weights())
                  if len(grads) == len(tasks) and grads else None)
        entry = layer_diagnostics(grads, bases=bases or None, side=w.side, shared_grad=shared) \
            if (grads or bases) else {}
        coords = {t: stash.coords[t][id(w.param)] for t in tasks if id(w.param) in stash.coords[t]}
        if len(coords) >= 2:  # stash="projected": the tasks compared inside the shared subspace
            entry["cos_shared"] = gradient_cosines({t: w.split_coords(c)[0] for t, c in coords.items()})
        entry.update(opt._update_stats.get(w.name, {}))
        if entry:
            per_layer[w.name.removesuffix(".weight")] = entry
    return flatten_diagnostics(per_layer, opt.last_gates)


def record_update_stats(opt: Any, w: Any, ds: Mapping[str, Tensor], coeffs: Sequence[float]) -> None:
    """Leakage of the update that is applied, and the share of the raw update that the null-space
    projection removed (raw: the same δ mapped back through the unprojected bases)."""
    subs = w.subspaces()
    applied = sum(c * reference.project_back(ds[s], w.work_bases[s], w.side) for s, c in zip(subs, coeffs))
    raw = sum(c * reference.project_back(ds[s], w.bases[s], w.side) for s, c in zip(subs, coeffs))
    stats = {}
    if w.protected is not None:
        stats["leakage"] = nsp.leakage(applied, w.protected, w.protect_side)
        norm = float(raw.norm())
        stats["nullspace_removed"] = float((raw - applied).norm()) / norm if norm > 0 else 0.0
    opt._update_stats[w.name] = stats
