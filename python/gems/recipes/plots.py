"""PNG plots of the unified search + recommendation recipe (matplotlib, Agg backend, no display needed)."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["plot_validation", "plot_conflict", "plot_pareto"]


def _plt():
    from gems.resources import require

    matplotlib = require("matplotlib", "the recipe's plots (gems.recipes.plots)")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def plot_validation(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str, *,
                    metric: str = "ndcg@10", tasks: Sequence[str] = ("rec", "search"), title: str = "") -> str:
    """One panel per task: validation ``metric`` over training steps, one line per method.

    ``curves[method]`` is a list of ``{"step": int, "<task>/<metric>": float, ...}`` records."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, recs in curves.items():
            pts = [(r["step"], r[f"{task}/{metric}"]) for r in recs if f"{task}/{metric}" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, label=method)
        ax.set_title(f"{task}: validation {metric.upper()}")
        ax.set_xlabel("step")
        ax.set_ylabel(metric.upper())
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path, title)


def plot_conflict(history: Sequence[Mapping[str, Any]], path: str, *, pair: str = "search-rec", title: str = "") -> str:
    """GEMS gradient-conflict diagnostics over training.

    ``history`` is a list of ``{"step": int, "diag": {flat opt.diagnostics() dict}}``. Left: heat map of
    the cosine between the two tasks' gradients per targeted layer (rows, in model order) and step
    (columns); right: its mean over layers and the mean conflict ratio (share of opposite-sign entries)."""
    plt = _plt()
    import numpy as np

    suffix = f"/cos/{pair}"
    if not any(k.endswith(suffix) for rec in history for k in rec["diag"]):
        suffix = f"/cos_shared/{pair}"  # coordinates only (the one-backward default): cosine in the shared subspace
    layers: list[str] = []
    for rec in history:
        for k in rec["diag"]:
            if k.endswith(suffix):
                name = k[: -len(suffix)]
                if name not in layers:
                    layers.append(name)
    layers.sort(key=_natural)  # model order: layers.2 before layers.10
    steps = [rec["step"] for rec in history]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    if layers and steps:
        grid = np.full((len(layers), len(steps)), np.nan)
        for j, rec in enumerate(history):
            for i, name in enumerate(layers):
                v = rec["diag"].get(name + suffix)
                if v is not None:
                    grid[i, j] = v
        lim = max(float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0, 1e-3)
        im = ax0.imshow(grid, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
        ax0.set_xticks(range(len(steps)))
        ax0.set_xticklabels([str(s) for s in steps], fontsize=7)
        every = max(1, len(layers) // 14)
        ax0.set_yticks(range(0, len(layers), every))
        ax0.set_yticklabels([layers[i] for i in range(0, len(layers), every)], fontsize=6)
        fig.colorbar(im, ax=ax0, label=f"cos({pair.replace('-', ', ')})" + (" in B_sh" if "shared" in suffix else ""))
        mean_cos = np.nanmean(grid, axis=0)
        conf = [np.nanmean([v for k, v in rec["diag"].items() if k.endswith("/conflict")] or [np.nan])
                for rec in history]
        ax1.plot(steps, mean_cos, marker="o", label="mean cos over layers")
        ax1.plot(steps, conf, marker="s", label="mean conflict ratio")
        ax1.axhline(0.0, color="gray", lw=0.8)
        ax1.legend(fontsize=8)
    ax0.set_title(f"per-layer gradient cosine ({pair})", fontsize=9)
    ax0.set_xlabel("step")
    ax1.set_title("summary over layers", fontsize=9)
    ax1.set_xlabel("step")
    ax1.grid(alpha=0.3)
    return _save(fig, path, title)


def plot_pareto(grid: Mapping[str, Sequence[Mapping[str, Any]]], chosen: Mapping[str, float], ppl_before: float,
                baselines: Mapping[str, Mapping[str, float]], path: str, *, tasks: Sequence[str] = ("rec", "search"),
                title: str = "") -> str:
    """One panel per task: validation NDCG@10 against the perplexity increase of every grid point (seed 0),
    a line per method through its grid, the chosen point circled; non-LLM baselines as horizontal lines
    (they do not touch the model, so their retention loss is zero)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key = f"{task}/ndcg@10"
        for method, recs in grid.items():
            pts = sorted((r["retention"]["ppl"] - ppl_before, r["val"][key], r["lr"]) for r in recs)
            xs, ys, _ = zip(*pts)
            line, = ax.plot(xs, ys, marker="o", ms=4, lw=1, label=method)
            for x, y, lr in pts:
                ax.annotate(f"{lr:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
                if lr == chosen.get(method):
                    ax.plot([x], [y], marker="o", ms=11, mfc="none", mec=line.get_color(), mew=2)
        for name, m in baselines.items():
            if key in m:
                ax.axhline(m[key], ls="--", lw=0.8, color="gray")
                ax.annotate(name, (0, m[key]), fontsize=7, color="gray", xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_title(f"{task}: validation NDCG@10 vs retention loss")
        ax.set_xlabel("perplexity increase on held-out text (symlog)")
        ax.set_ylabel("NDCG@10 (validation)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path, title)


def _save(fig, path: str, title: str | None) -> str:
    """Title, layout, write the PNG (creating its folder) and free the figure."""
    plt = _plt()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
