"""Tables, confidence intervals, the verdict and the pictures of the search + recommendation benchmark.

Everything here reads the report dict of :func:`gems.recipes.unified_sr.run` and nothing else, so a
report reloaded from its JSON gives the same tables."""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from gems.recipes import evaluate as E
from gems.recipes import stats as S

__all__ = ["summarise", "write_outputs", "per_user", "pareto_front"]

HEADLINE = ("rec/ndcg@10", "rec/hr@10", "search/ndcg@10", "search/hr@10")
SAMPLED = ("rec/sampled/ndcg@10", "search/sampled/ndcg@10")
BASELINE_ABOUT = {"popularity": "most interacted items of the training split",
                  "transition": "next-item counts from the last 3 history items (+ popularity tie-break)",
                  "factors": "low-rank PPMI factors of the transition counts (--collab-dim; what the item tokens carry) summed over the last 3 history items",
                  "lexical": "TF-IDF match of the query to title, genres, year (search only)",
                  "base": "the starting LLM (item tokens added, no training) scored through the starting item head, "
                          "i.e. its tied item logits plus the popularity prior"}


def per_user(ranks: dict[str, dict[str, list[int]]], metric: str) -> list[float]:
    """Per-example values of ``metric`` (``"rec/ndcg@10"``, ``"search/sampled/hr@10"``) from stored ranks."""
    task, *rest = metric.split("/")
    kind = "sampled" if rest[0] == "sampled" else "full"
    name, k = rest[-1].split("@")
    r = ranks[task][kind]
    vals = S.ndcg_at(r, int(k)) if name == "ndcg" else S.hr_at(r, int(k))
    return [float(v) for v in vals]


def _mean_ranks_metric(recs: Sequence[dict[str, Any]], metric: str) -> list[float]:
    return S.per_user_mean([per_user(r["test_ranks"], metric) for r in recs])


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names not dominated: no other point has a score >= and a retention loss <=, one of them strictly.
    ``points[name] = (score, loss)``."""
    front = set()
    for n, (s, l) in points.items():
        dominated = any((s2 >= s and l2 <= l) and (s2 > s or l2 < l) for m, (s2, l2) in points.items() if m != n)
        if not dominated:
            front.add(n)
    return front


def _fmt(mean: float, std: float | None = None, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    s = f"{mean:.{digits}f}" if abs(mean) < 1000 else f"{mean:.0f}"
    return s if std is None else s + f" ± {std:.{digits}f}"


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    ppl0 = report["base"]["retention"]["ppl"]
    cloze0 = report["base"]["retention"].get("cloze")
    rows: list[dict[str, Any]] = []
    for name, ranks in report["baselines"].items():
        m = E.rank_metrics(ranks)
        rows.append({"method": name, "kind": "baseline", "n_seeds": 1, **{k: (m.get(k), None) for k in HEADLINE + SAMPLED},
                     "ppl_after": (ppl0, None), "ppl_increase": (0.0, None), "cloze": (_acc(cloze0), None)})
    m = E.rank_metrics(report["base"]["test_ranks"])
    rows.append({"method": "base", "kind": "baseline", "n_seeds": 1, **{k: (m.get(k), None) for k in HEADLINE + SAMPLED},
                 "ppl_after": (ppl0, None), "ppl_increase": (0.0, None), "cloze": (_acc(cloze0), None)})
    for name, recs in report["finals"].items():
        ms = [E.rank_metrics(r["test_ranks"]) for r in recs]
        row = {"method": name, "kind": "llm", "n_seeds": len(recs), "lr": recs[0]["lr"]}
        for k in HEADLINE + SAMPLED:
            row[k] = S.mean_std([x[k] for x in ms])
        ppl = [r["retention"]["ppl"] for r in recs]
        row["ppl_after"] = S.mean_std(ppl)
        row["ppl_increase"] = S.mean_std([p - ppl0 for p in ppl])
        cl = [_acc(r["retention"].get("cloze")) for r in recs]
        row["cloze"] = S.mean_std(cl) if all(c is not None for c in cl) else (None, None)
        row["train_s"] = S.mean_std([r["train_s"] for r in recs])
        row["tokens"] = recs[0]["tokens"]
        row["tok_s"] = S.mean_std([r["tokens"] / max(r["train_s"], 1e-9) for r in recs])
        row["state_mib"] = recs[0]["state_mib"]
        rows.append(row)
    cis = _intervals(report)
    verdict = _verdict(report, rows, cis)
    return {"rows": rows, "ci": cis, "verdict": verdict, "table_md": table_md(rows), "ppl_before": ppl0}


def _acc(hits: Sequence[bool] | None) -> float | None:
    return None if not hits else sum(bool(h) for h in hits) / len(hits)


def _intervals(report: dict[str, Any], ref: str = "gems") -> list[dict[str, Any]]:
    finals = report["finals"]
    if ref not in finals:
        return []
    out = []
    others: dict[str, Any] = {n: [r] for n, r in (("base", report["base"]),)}
    others.update({n: [{"test_ranks": r}] for n, r in report["baselines"].items()})
    others.update({n: recs for n, recs in finals.items() if n != ref})
    for metric in HEADLINE:
        task = metric.split("/")[0]
        a = _mean_ranks_metric(finals[ref], metric)
        for name, recs in others.items():
            if task not in recs[0]["test_ranks"]:
                continue
            b = _mean_ranks_metric(recs, metric)
            ci = S.paired_bootstrap(a, b, n_boot=2000, seed=0)
            out.append({"metric": metric, "vs": name, **ci})
    return out


def _verdict(report: dict[str, Any], rows: list[dict[str, Any]], cis: list[dict[str, Any]]) -> list[str]:
    lines = []
    llm = [r for r in rows if r["kind"] == "llm"]
    by = {r["method"]: r for r in rows}
    if not llm:
        return ["no LLM method was run"]
    for task in ("rec", "search"):
        key = f"{task}/ndcg@10"
        best = max(llm, key=lambda r: r[key][0])
        refs = [n for n in (("popularity", "transition", "factors") if task == "rec" else ("popularity", "lexical")) if n in by]
        comp = ", ".join(f"{n} {by[n][key][0]:.4f}" for n in refs)
        above = [n for n in refs if best[key][0] > by[n][key][0]]
        lines.append(f"{task}: the best LLM method is {best['method']} (NDCG@10 {best[key][0]:.4f}); {comp}; "
                     f"mean above {', '.join(above) if above else 'none of them'}.")
        # a mean above a baseline is not a win: GEMS' paired interval against each one says whether it is
        for c in cis:
            if c["metric"] == key and c["vs"] in refs:
                lines.append(f"{key}: GEMS − {c['vs']} = {c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] → "
                             f"{_significance(c)} at 95 %.")
        pts = {r["method"]: (r[key][0], r["ppl_increase"][0]) for r in llm}
        front = pareto_front(pts)
        if "gems" in pts:
            where = "on" if "gems" in front else "not on"
            lines.append(f"{task}: GEMS is {where} the Pareto frontier of (NDCG@10, perplexity increase) over the "
                         f"LLM methods; frontier: {', '.join(sorted(front))}.")
    if cis:
        for c in cis:
            if c["vs"] in by and by[c["vs"]]["kind"] == "llm" and c["metric"].endswith("ndcg@10"):
                lines.append(f"{c['metric']}: GEMS − {c['vs']} = {c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}] "
                             f"→ {_significance(c)} at 95 %.")
    return lines


def _significance(c: dict[str, Any]) -> str:
    return "better" if c["lo"] > 0 else "worse" if c["hi"] < 0 else "not distinguishable"


COLS = ("method", "lr", "rec/ndcg@10", "rec/hr@10", "search/ndcg@10", "search/hr@10", "rec/sampled/ndcg@10",
        "search/sampled/ndcg@10", "ppl_after", "ppl_increase", "cloze", "train_s", "tok_s", "tokens", "state_mib")


def table_md(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        cells = []
        for c in COLS:
            v = r.get(c)
            if c == "method":
                cells.append(r["method"])
            elif c == "lr":
                cells.append(f"{v:g}" if v else "–")
            elif isinstance(v, tuple):
                mean, std = v
                cells.append(_fmt(mean, std if r.get("n_seeds", 1) > 1 else None, 2 if c in ("ppl_after", "ppl_increase", "train_s") else 0 if c == "tok_s" else 4))
            elif v is None:
                cells.append("–")
            else:
                cells.append(_fmt(float(v), None, 1) if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ci_md(cis: list[dict[str, Any]]) -> str:
    lines = ["| metric | GEMS − | diff | 95 % CI | P(diff ≤ 0) |", "|---|---|---|---|---|"]
    for c in cis:
        lines.append(f"| {c['metric']} | {c['vs']} | {c['diff']:+.4f} | [{c['lo']:+.4f}, {c['hi']:+.4f}] | "
                     f"{c['p_le_0']:.3f} |")
    return "\n".join(lines)


def _grid_md(report: dict[str, Any]) -> str:
    ppl0 = report["base"]["retention"]["ppl"]
    lines = ["| method | lr | val rec NDCG@10 | val search NDCG@10 | selection score | ppl increase | chosen |",
             "|---|---|---|---|---|---|---|"]
    for m, recs in report["grid"].items():
        for r in recs:
            lines.append(f"| {m} | {r['lr']:g} | {r['val']['rec/ndcg@10']:.4f} | {r['val']['search/ndcg@10']:.4f} | "
                         f"{r['select']:.4f} | {r['retention']['ppl'] - ppl0:+.2f} | "
                         f"{'**yes**' if r['lr'] == report['chosen_lr'][m] else ''} |")
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], cfg: Any) -> dict[str, str]:
    os.makedirs(cfg.out, exist_ok=True)
    stem = os.path.join(cfg.out, cfg.tag)
    paths = {"csv": stem + ".csv", "json": stem + ".json", "md": stem + ".md"}
    summ = report["summary"]
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        head = ["method", "n_seeds", "lr"] + [f"{c}{s}" for c in COLS[2:] for s in ("", "_std")]
        w.writerow(head)
        for r in summ["rows"]:
            line = [r["method"], r.get("n_seeds", 1), r.get("lr", "")]
            for c in COLS[2:]:
                v = r.get(c)
                mean, std = v if isinstance(v, tuple) else (v, None)
                line += ["" if mean is None else f"{mean:.6g}", "" if std is None else f"{std:.6g}"]
            w.writerow(line)
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=float)
    os.replace(tmp, paths["json"])
    if cfg.plots:
        from gems.recipes.plots import plot_conflict, plot_pareto, plot_validation

        ppl0 = summ["ppl_before"]
        paths["pareto_png"] = plot_pareto(report["grid"], report["chosen_lr"], ppl0, report["baselines_val"],
                                          stem + "_pareto.png", title=report["command"])
        curves = {m: [{"step": 0, **report["base"]["val"]}] + next(r for r in recs if r["lr"] == report["chosen_lr"][m])["curve"]
                  for m, recs in report["grid"].items()}
        paths["val_png"] = plot_validation(curves, stem + "_val_ndcg.png", title="validation, chosen lr, seed 0")
        diag = [r for r in report["finals"].get("gems", [])[:1] if r.get("diagnostics")]
        if diag:
            paths["conflict_png"] = plot_conflict(diag[0]["diagnostics"], stem + "_gems_conflict.png",
                                                  title="GEMS: cosine between search and rec gradients")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(_markdown(report, cfg, paths))
    return paths


def _markdown(report: dict[str, Any], cfg: Any, paths: dict[str, str]) -> str:
    m, d, summ = report["machine"], report["data"], report["summary"]
    c = report["config"]
    lines = [
        "# Search + recommendation fine-tuning: GEMS against tuned baselines",
        "",
        f"Command: `{report['command']}` (total {report['total_s'] / 60:.1f} min)  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, device "
        f"{m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}.  ",
        f"Data: {d['source']}, {d['users']} users, {d['items']} items (the whole catalogue is ranked, the user's "
        f"history masked); training: {d['rec_transitions']} recommendation transitions in {d['rec_windows']} windows, "
        f"{d['search_examples']} search examples (queries generated from the target's metadata: no real query log "
        f"ships offline); test {d['test_users']} users, validation {d['val_users']} users; prompt tokens "
        f"rec {d['rec_prompt_tokens_mean']}, search {d['search_prompt_tokens_mean']}.  ",
        f"Budget (every method): {c['steps']} steps of {c['rec_batch']} recommendation windows + {c['search_batch']} "
        f"search examples (single-task: the whole batch from its task), cosine schedule, warm-up {c['warmup']}; item "
        f"rows lr {c['item_lr']}; rank {c['rank']} + {c['task_rank']}/task (GaLore: the sum), gap {c['gap']}, "
        f"LoRA r {c['lora_r']}; lr chosen per method on validation NDCG@10 from its grid at seed 0; final seeds "
        f"{c['seeds']}.  ",
    ]
    if report["nullspace"]:
        ns = report["nullspace"]
        lines.append(f"Null space (gems, galore_ns): input side, {c['ns_mode']} threshold {c['ns_threshold']}, "
                     f"{c['calib_texts']} calibration texts; {ns['modules']} modules, "
                     f"{100 * ns['protected_fraction']:.1f}% of input directions protected, {ns['mib']:.0f} MiB.  ")
    lines += [f"Retention: perplexity on {c['ppl_texts']} held-out general texts (before {summ['ppl_before']:.3f}) and "
              f"a {c['cloze_items']}-item multiple-choice cloze probe from the same split.", "",
              "## Test (mean ± std over seeds)", "", summ["table_md"], "",
              "`tokens`: training tokens seen, `tok_s` per second of training; `train_s`: optimizer-step wall time (forward, backward, step); "
              "`state_mib`: optimizer state (+ GEMS bases). Baselines: "
              + "; ".join(f"`{k}`: {v}" for k, v in BASELINE_ABOUT.items()) + ".", ""]
    if summ["ci"]:
        lines += ["## GEMS − each method: paired bootstrap over users (per-user metric averaged over seeds)", "",
                  _ci_md(summ["ci"]), ""]
    lines += ["## Verdict", ""] + [f"- {v}" for v in summ["verdict"]] + [""]
    lines += ["## Validation grid (seed 0)", "", _grid_md(report), ""]
    for key in ("pareto_png", "val_png", "conflict_png"):
        if key in paths:
            lines.append(f"![{key}]({os.path.basename(paths[key])})")
    return "\n".join(lines) + "\n"
