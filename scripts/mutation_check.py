"""Break the multi-task update on purpose and report which default-run test catches each break.

Each mutation is applied to a temporary copy of the working tree; the default test run (the README's
selection, stopping at the first failure; the reference and defect tests run first) must fail. Prints a markdown
table; exits 1 if a mutation survives. Not part of CI (one run per mutation; minutes in all):

    python scripts/mutation_check.py [--only NAME ...]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPT, SUB, DIST, TASKS, REF = ("python/gems/optimizer.py", "python/gems/subspaces.py", "python/gems/distributed.py",
                              "python/gems/tasks.py", "python/gems/reference.py")
SPLIT = "python/gems/split_backward.py"
STEP, COLLECT, FUSED, GROUPED, SCHED, CKPT = ("python/gems/step.py", "python/gems/collect.py", "python/gems/fused.py",
                                              "python/gems/grouped.py", "python/gems/schedule.py",
                                              "python/gems/checkpoint.py")

# name -> [(file, old, new)]: every `old` must occur in the file
MUTATIONS: dict[str, list[tuple[str, str, str]]] = {
    "gates swapped where applied": [
        (FUSED, "[scale] + [scale * g for g in gates]", "[scale] + [scale * g for g in gates[::-1]]")],
    "gate inputs: squared norms": [(COLLECT, "[math.sqrt(s) for s in sq]", "[s for s in sq]")],
    "gate inputs: loss share dropped": [
        (COLLECT, "stash.mean_losses(), [math.sqrt", "[1.0] * len(cfg.tasks), [math.sqrt")],
    "gate weights 0.4/0.4/0.2 changed": [(REF, "0.4 * a + 0.4 * b + 0.2 * c", "0.2 * a + 0.4 * b + 0.4 * c")],
    "negative gates allowed again": [(REF, " or any(float(v) < 0 for v in values)", "")],
    "residual basis from G_t": [
        (SUB, "grads = [reference.remove_component(g, news[i][SHARED], jobs[i].w.side) for i, g in zip(todo, grads)]",
         "grads = [g for i, g in zip(todo, grads)]")],
    "DDP averages ranks unweighted": [
        (DIST, "(held.float() * n_local).flatten()", "held.float().flatten()"),
        (DIST, "flat.div_(n_total)", "flat.div_(dist.get_world_size())")],
    "DDP steps parameters without gradient": [(DIST, "            if not here:\n                continue\n", "")],
    "DDP clips by each rank's own norm": [
        (COLLECT, "    synchronise(opt)\n    weights = stash.shared_weights()\n    total = 0.0",
         "    stash.finalise()\n    weights = stash.shared_weights()\n    total = 0.0")],
    "shared coordinates mixed uniformly": [
        (COLLECT, "    weights = stash.shared_weights()\n    per_weight = {",
         "    weights = [1.0 / len(tasks)] * len(tasks)\n    per_weight = {")],
    "plain parameters mixed with swapped weights": [
        (COLLECT, "shared_gradients(plain_grads, weights)", "shared_gradients(plain_grads, weights[::-1])")],
    "accumulation sums calls (no sample-weighted mean)": [(TASKS, "coef = self.base[t] / n", "coef = 1.0")],
    "rotate is the identity": [
        (SUB, "rot = self.bases[s].T @ old[s]", "rot = torch.eye(self.bases[s].shape[1], device=old[s].device)")],
    "rotate second moments by R, not R∘R": [
        (SUB, "second_order=key in SECOND_ORDER_STATE)", "second_order=False)")],
    "scale ignored on the shared subspace": [
        (FUSED, "[scale] + [scale * g", "[1.0] + [scale * g")],
    "update sign flipped (per-weight torch write)": [
        (STEP, "bases = torch.cat([w.work_bases[s] * c for s, c in zip(subs, coeffs)], dim=1)",
         "bases = torch.cat([w.work_bases[s] * -c for s, c in zip(subs, coeffs)], dim=1)")],
    "weight decay dropped (per-weight torch write)": [(STEP, "beta = 1.0 - lr * wd", "beta = 1.0")],
    # the torch step over stacked shape groups (gems.grouped) and the fused step's cached plan (gems.fused)
    "grouped: weight decay dropped": [(GROUPED, "beta = 1.0 - lr * wd", "beta = 1.0")],
    "grouped: update sign flipped (left side)": [
        (GROUPED, "w.param.addmm_(group.bases[g], coords[g], beta=beta)",
         "w.param.addmm_(group.bases[g], coords[g], beta=beta, alpha=-1)")],
    "grouped: coefficients of the wrong subspaces": [
        (GROUPED, "for s, c in zip(group.subs, coeffs)", "for s, c in zip(group.subs, coeffs[::-1])")],
    "grouped: shared coordinates unweighted": [
        (GROUPED, "shared.add_(group.part(stacked, 0, r_sh), alpha=wt)", "shared.add_(group.part(stacked, 0, r_sh))")],
    "grouped: batched projection onto the shared basis only": [
        (GROUPED, "spans = [(0, r_sh)] + ([group.spans[t]] if t in group.spans else [])",
         "spans = [(0, r_sh)] + ([(0, group.spans[t][1] - group.spans[t][0])] if t in group.spans else [])")],
    "grouped: plan not rebuilt after a refresh": [
        (SCHED, "        opt._plan_epoch += 1", "        pass")],
    "fused: plan not rebuilt after a load": [(CKPT, "    opt._plan_epoch += 1", "    pass")],
    "load: scheduler writes the replaced group dicts": [(CKPT, "    _relink_groups(opt)\n    _install(", "    _install(")],
    "DCP template: created step counters kept": [
        (CKPT, 'st["step"] = st["step"].zero_() if isinstance(st["step"], Tensor) else type(st["step"])(0)', "pass")],
    "torch layout: coordinate states swapped": [
        (CKPT, '"coords": coords[id(w.param)]}',
         '"coords": dict(zip(coords[id(w.param)], reversed(list(coords[id(w.param)].values()))))}')],
    "fused: counters edited by hand not noticed": [(FUSED, "    return torch.equal(buf, plan.expected)", "    return True")],
    "fused: moments replaced by hand not noticed": [
        (FUSED, 'if any(st["exp_avg"] is not m or st["exp_avg_sq"] is not v', 'if False and any(st["exp_avg"] is not m')],
    "null space not folded into the bases": [
        (SUB, "folded = nsp.fold_into_basis(b, q, self.side, self.protect_side) if q is not None else b",
         "folded = b")],
    "projected-side null space skipped": [
        (STEP, "ds = {s: nsp.project_update(d, w.delta_projector, w.protect_side) for s, d in ds.items()}",
         "ds = ds")],
    "solver signs by default": [(SUB, 'if method == "svd" and basis_signs == "canonical":', "if False:")],
    # the one-backward form (split_backward.py) against the per-task-backward form
    "one backward: task scale N/N_t dropped": [(SPLIT, "scales = {k: total / counts[k] for k in present}",
                                                 "scales = {k: 1.0 for k in present}")],
    "one backward: Gram norm from X only": [(SPLIT, "sq = ((dyf @ dyf.T) * (xf @ xf.T))", "sq = ((xf @ xf.T) * (xf @ xf.T))")],
    "one backward: contiguous rows off by one": [(SPLIT, "out.append(slice(r[0], r[-1] + 1))",
                                                   "out.append(slice(r[0], r[-1]))")],
    "one backward: mixed gradient unweighted over micro-batches": [
        (SPLIT, "alpha_mix = stash.weight_of_mixed(total)", "alpha_mix = 1.0; stash.weight_of_mixed(total)")],
    "one backward: coordinates unweighted over micro-batches": [
        (SPLIT, "stash.add_projected(tasks[k], key, coords, sq, alphas[k])", "stash.add_projected(tasks[k], key, coords, sq, 1.0)")],
    "one backward: embedding coordinates scattered to the wrong rows": [
        (SPLIT, "coords.index_add_(0, self.ids, dyf @ basis)", "coords.index_add_(0, self.ids.flip(0), dyf @ basis)")],
    "one backward: embedding padding row gets a gradient": [
        (SPLIT, "dy = dy.masked_fill((ids == ctx.padding_idx).unsqueeze(-1), 0)", "dy = dy")],
    "one backward: row weights ignored": [(SPLIT, "mean = (losses * (weights / total)).sum()", "mean = losses.mean()")],
    "one backward: DDP mixed gradient unweighted": [
        (DIST, "flat = torch.cat([(stash.mixed[id(p)].float() * n_local).flatten()",
         "flat = torch.cat([(stash.mixed[id(p)].float() * 1.0).flatten()")],
}
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu"]
# the reference and defect tests first (seconds); the rest of the default run only for what they miss
STAGES = [["tests/test_reference_step.py", "tests/test_defects.py"], ["tests"]]


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__")
    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def run_one(name: str, edits: list[tuple[str, str, str]]) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix="gems-mut-") as tmp:
        tmp = Path(tmp)
        _copy_tree(tmp)
        for rel, old, new in edits:
            path = tmp / rel
            text = path.read_text()
            if old not in text:
                raise SystemExit(f"mutation {name!r}: pattern not found in {rel}: {old!r} (update this script)")
            path.write_text(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=f"{tmp / 'python'}{os.pathsep}{tmp}")
        start = time.time()
        for stage in STAGES:
            proc = subprocess.run(PYTEST + stage, cwd=tmp, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                break
        took = time.time() - start
    if proc.returncode == 0:
        return "**survived**", took
    failed = re.search(r"^FAILED (\S+)", proc.stdout, re.M) or re.search(r"^ERROR (\S+)", proc.stdout, re.M)
    return (failed.group(1) if failed else f"exit {proc.returncode}"), took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="names (substrings) of the mutations to run")
    args = ap.parse_args()
    names = [n for n in MUTATIONS if not args.only or any(o in n for o in args.only)]
    print("| mutation | first failing test | seconds |\n|---|---|---|")
    survived = 0
    for name in names:
        caught, took = run_one(name, MUTATIONS[name])
        survived += caught == "**survived**"
        print(f"| {name} | `{caught}` | {took:.0f} |", flush=True)
    print(f"\n{len(names) - survived} of {len(names)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
