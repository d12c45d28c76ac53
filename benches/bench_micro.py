"""Micro-measurements behind constants and comments in the package (one line each, side by side).

    python benches/bench_micro.py --threads 1      # CPU parts
    python benches/bench_micro.py --device cuda    # adds the CUDA small-SVD driver comparison

- finite check: max|x| vs the 2-norm on a 576×1536 fp32 gradient (gems.reductions.finite uses the 2-norm
  first);
- GEMS step: one GemsOptimizer(AdamW).step on a SmolLM2-shaped stack (6 layers of q/k/v/o + MLP shapes,
  2 tasks, rank 64 / task 32, no refresh), median of 5;
- dominant direction: how much of the energy in directions 2..r the refresh captures when σ₁ is spiked
  100× over an α = 0.5 spectrum (576×1536, rank 128), with the start block orthonormalised (the engine)
  and with unit-scaled columns instead (the variant that was reverted);
- CPU refresh breakdown (576×1536, rank 128, k = 160 columns, the real L15.down_proj gradient of
  bench_refresh.py): where a subspace_iter call's time goes (the two GEMMs, the QRs, the small SVD, the
  sketch) next to torch.linalg.svd, the same GEMMs on bf16 operands, and cheaper variants that were
  measured and not adopted: one GEMM (A·AᵀΨ from a hashed Ψ, σ² weighting; 160 and 192 columns), an
  fp64 Gram/eigh extraction instead of QR + SVD of R, and an LU-normalised start block (P·L of Y = P·L·U,
  as fbpca does between power iterations: cheaper than QR, but its condition number multiplies the power
  step's, and fp32 rounding then blurs the weaker directions);
- CUDA only: the small k×k SVD (k = 160) with each cuSOLVER driver, the 576×160 QR, and a whole
  compute_basis with CUDA_SMALL_SVD_DRIVER = None vs "gesvda" (time, energy, orthonormality); the same small
  steps on a stack of 30 (which calls are really batched) and compute_bases on 30 weights vs one; the CUDA
  vs torch backend drift with and without canonical task-basis signs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, synchronize  # noqa: E402

import gems  # noqa: E402
from gems import refresh, solvers  # noqa: E402


def ms(fn, device="cpu", n=20) -> float:
    for _ in range(3):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / n * 1e3


def finite_check() -> None:
    g = torch.randn(576, 1536)
    inf = ms(lambda: torch.linalg.vector_norm(g, ord=float("inf")))
    l2 = ms(lambda: torch.linalg.vector_norm(g, dtype=torch.float32))
    print(f"finite check 576x1536: max|x| {inf:.2f} ms, 2-norm {l2:.2f} ms ({inf / l2:.0f}x)")


def gems_step() -> None:
    torch.manual_seed(0)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    model = nn.ModuleList(nn.Linear(i, o, bias=False) for _ in range(6) for o, i in shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01), model=model,
                                 tasks=["a", "b"], rank=64, task_rank=32, update_proj_gap=1000, refresh="subspace_iter")

    def fill():  # task gradients straight into the stash: the step alone is timed
        opt._task_grads.clear()
        for t in ("a", "b"):
            for p in model.parameters():
                opt._task_grads.grads[t][id(p)] = torch.randn_like(p)
            opt._task_grads.count(t, 1.0, 4)
        opt._task_grads.calls = 1

    fill()
    opt.step()  # first bases
    times = []
    for _ in range(5):
        fill()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    print(f"GEMS step, SmolLM2-shaped stack (42 weights): {statistics.median(times) * 1e3:.0f} ms")


def dominant_direction() -> None:
    gen = torch.Generator().manual_seed(0)
    m, n, r = 576, 1536, 128
    u = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64)).Q
    s = (torch.arange(m, dtype=torch.float64) + 1) ** -0.5
    s[0] *= 100
    g = ((u * s) @ v.T).float()
    rest = g.double() - torch.outer(u[:, 0], u[:, 0]) @ g.double()
    exact = float(s[1:r].pow(2).sum())
    real_qr = torch.linalg.qr

    def unit_columns(y):  # the reverted variant: only the first call (the start block) is replaced
        unit_columns.calls += 1
        if unit_columns.calls == 1:
            q = y / y.abs().amax(dim=-2, keepdim=True)
            return torch.return_types.linalg_qr((q / torch.linalg.vector_norm(q, dim=-2, keepdim=True), None))
        return real_qr(y)

    out = []
    for label in ("orthonormal start (engine)", "unit-column start (reverted)"):
        if label.startswith("unit"):
            unit_columns.calls = 0
            torch.linalg.qr = unit_columns
        try:
            b = refresh.compute_basis(g, r, "left", method="subspace_iter", generator=torch.Generator().manual_seed(0))
        finally:
            torch.linalg.qr = real_qr
        out.append(f"{label} {float((b.double().T @ rest).pow(2).sum()) / exact:.1%}")
    print("energy of directions 2..r, sigma1 x100, alpha 0.5, 576x1536 r128: " + "; ".join(out))


def cpu_refresh_breakdown() -> None:
    from bench_refresh import energy, real_gradients

    g = real_gradients()["L15.down_proj"][0]
    r, k = 128, 160
    a = g.unsqueeze(0)
    q = torch.linalg.qr(torch.randn(576, k, generator=torch.Generator().manual_seed(0))).Q.unsqueeze(0)
    z = a.transpose(-2, -1) @ q
    y = a @ z
    rr = torch.linalg.qr(y).R
    ab, qb, zb = a.bfloat16(), q.bfloat16(), z.bfloat16()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    parts = {
        "torch.linalg.svd": ms(lambda: torch.linalg.svd(g, full_matrices=False), n=5),
        "compute_basis subspace_iter": ms(lambda: refresh.compute_basis(g, r, "left", method="subspace_iter",
                                                                         generator=gen())),
        "sketch A·Omega": ms(lambda: solvers._sketch(a, k, [gen()])),
        "QR 576x160": ms(lambda: torch.linalg.qr(y)),
        "GEMM A^T·Q": ms(lambda: a.transpose(-2, -1) @ q),
        "GEMM A·Z": ms(lambda: a @ z),
        "SVD of R 160x160": ms(lambda: torch.linalg.svd(rr)),
        "GEMM A^T·Q bf16": ms(lambda: ab.transpose(-2, -1) @ qb),
        "GEMM A·Z bf16": ms(lambda: ab @ zb),
    }
    print("refresh breakdown, L15.down_proj 576x1536 r128 (ms): "
          + "; ".join(f"{name} {t:.2f}" for name, t in parts.items()))

    exact = energy(g, torch.linalg.svd(g, full_matrices=False).U[:, :r], "left")

    def extract(y):  # the engine's extraction: QR of Y and the SVD of its R factor
        qy, ry = torch.linalg.qr(y)
        return qy[0] @ torch.linalg.svd(ry[0]).U[:, :r]

    def one_gemm(width=k):  # σ² weighting from one GEMM: Y = A·(AᵀΨ), Ψ a hashed sketch of A's rows
        return extract(a @ solvers._sketch(a.transpose(-2, -1), width, [gen()]))

    def power_step():  # the engine's arithmetic without its checks: sketch, QR, two GEMMs
        y0 = solvers._sketch(a, k, [gen()])
        return a @ (a.transpose(-2, -1) @ torch.linalg.qr(y0).Q)

    def qr_extraction():  # bare engine
        return extract(power_step())

    def lu_start():  # the start block's span from an LU factorisation, P·L, instead of its QR (≈ 0.6 ms less)
        y0 = solvers._sketch(a, k, [gen()])[0]
        lu, piv, _ = torch.linalg.lu_factor_ex(y0)
        low = lu.tril(-1) + torch.eye(*lu.shape)
        perm = list(range(low.shape[0]))
        for i, p in enumerate(piv.tolist()):  # LAPACK's row swaps, in order
            perm[i], perm[p - 1] = perm[p - 1], perm[i]
        start = torch.empty_like(low)
        start[perm] = low
        return extract(a @ (a.transpose(-2, -1) @ start))

    def gram_extraction():  # the same with an fp64 Gram matrix and eigh instead (needs a fallback when
        y64 = power_step()[0].double()  # λ_r/λ_1 nears fp64 precision, e.g. a dominant σ₁)
        lam, v = torch.linalg.eigh(y64.T @ y64)
        return (y64 @ (v[:, -r:] / lam[-r:].sqrt())).float()

    base = refresh.compute_basis(g, r, "left", method="subspace_iter", generator=gen())
    out = [f"engine {parts['compute_basis subspace_iter']:.2f} ms {energy(g, base, 'left') / exact:.4f}"]
    for label, fn in (("one GEMM", one_gemm), ("one GEMM, k = 192", lambda: one_gemm(192)),
                      ("bare engine, QR + SVD of R", qr_extraction),
                      ("bare engine, LU-normalised start", lu_start),
                      ("bare engine, fp64 Gram + eigh", gram_extraction)):
        out.append(f"{label} {ms(fn):.2f} ms {energy(g, fn(), 'left') / exact:.4f}")
    print("variants, L15.down_proj r128 (time, energy vs exact top-r): " + "; ".join(out))


def cuda_small_svd() -> None:
    dev = "cuda"
    r = torch.randn(160, 160, device=dev)
    y = torch.randn(576, 160, device=dev)
    parts = [f"qr 576x160 {ms(lambda: torch.linalg.qr(y), dev):.2f} ms"]
    for drv in (None, "gesvd", "gesvdj", "gesvda"):
        parts.append(f"svd 160 {drv or 'default'} {ms(lambda: torch.linalg.svd(r, driver=drv), dev):.2f} ms")
    print("; ".join(parts))
    from bench_refresh import energy, real_gradients

    g = real_gradients()["L15.down_proj"][0].to(dev)
    exact = energy(g, torch.linalg.svd(g, full_matrices=False).U[:, :128], "left")
    saved = solvers.CUDA_SMALL_SVD_DRIVER
    try:
        for drv in (None, "gesvda"):
            solvers.CUDA_SMALL_SVD_DRIVER = drv
            f = lambda: refresh.compute_basis(g, 128, "left", method="subspace_iter",  # noqa: E731
                                              generator=torch.Generator().manual_seed(0))
            b = f()
            orth = float((b.T @ b - torch.eye(128, device=dev)).abs().max())
            print(f"compute_basis L15.down_proj r128, small SVD driver {drv or 'default'}: {ms(f, dev):.2f} ms, "
                  f"energy {energy(g, b, 'left') / exact:.4f}, orthonormal to {orth:.1e}")
    finally:
        solvers.CUDA_SMALL_SVD_DRIVER = saved


def cuda_batched(batch: int = 30, dev: str = "cuda") -> None:
    """Per-call cost of the refresh's small dense steps on a stack of ``batch`` same-shape weights (576×1536,
    rank 128, k = 160) against one weight: which cuSOLVER/cuBLAS calls are really batched."""
    gen = torch.Generator(device=dev).manual_seed(0)
    for b in (1, batch):
        y = torch.randn(b, 576, 160, device=dev, generator=gen)
        r = torch.randn(b, 160, 160, device=dev, generator=gen)
        gram = (y.transpose(-2, -1) @ y).double()
        chol = torch.linalg.cholesky(gram)
        sym = r @ r.transpose(-2, -1)
        parts = [
            f"qr 576x160 {ms(lambda: torch.linalg.qr(y), dev):.2f}",
            f"qr 160x160 {ms(lambda: torch.linalg.qr(r), dev):.2f}",
            f"gram fp64 {ms(lambda: y.transpose(-2, -1).double() @ y.double(), dev):.2f}",
            f"cholesky_ex fp64 {ms(lambda: torch.linalg.cholesky_ex(gram), dev):.2f}",
            f"cholesky_ex fp32 {ms(lambda: torch.linalg.cholesky_ex(gram.float()), dev):.2f}",
            f"solve_triangular 576x160 {ms(lambda: torch.linalg.solve_triangular(chol.float().transpose(-2, -1), y, upper=True, left=False), dev):.2f}",
            f"inv_ex tri fp64 {ms(lambda: torch.linalg.solve_triangular(chol, torch.eye(160, device=dev, dtype=torch.float64).expand(b, 160, 160), upper=False), dev):.2f}",
            f"svd gesvda {ms(lambda: torch.linalg.svd(r, driver='gesvda'), dev):.2f}",
            f"svd default {ms(lambda: torch.linalg.svd(r), dev):.2f}",
            f"svd gesvdj {ms(lambda: torch.linalg.svd(r, driver='gesvdj'), dev):.2f}",
            f"eigh fp32 {ms(lambda: torch.linalg.eigh(sym), dev):.2f}",
            f"eigh fp64 {ms(lambda: torch.linalg.eigh(sym.double()), dev):.2f}",
        ]
        print(f"batch {b} (ms per call): " + "; ".join(parts))
    mats = [torch.randn(576, 1536, device=dev, generator=gen) for _ in range(batch)]
    stack = torch.stack(mats)
    one = ms(lambda: refresh.compute_basis(mats[0], 128, "left", method="subspace_iter"), dev, n=10)
    many = ms(lambda: refresh.compute_bases(mats, 128, "left", method="subspace_iter"), dev, n=3)
    svd1 = ms(lambda: torch.linalg.svd(mats[0], full_matrices=False), dev, n=5)
    svdb = ms(lambda: torch.linalg.svd(stack, full_matrices=False), dev, n=2)
    print(f"576x1536 r128: compute_basis {one:.2f} ms; compute_bases x{batch} {many:.2f} ms ({many / batch:.2f} per matrix); "
          f"svd {svd1:.2f} ms; batched svd x{batch} {svdb:.2f} ms ({svdb / batch:.2f} per matrix)")


def cuda_sign_stability() -> None:
    """CUDA backend vs torch backend on a 3-layer model, 10 steps, refresh every 4: max weight difference after
    each step with canonical task-basis signs (the engine) and with the solver's signs (docs/design_notes.md
    §10). Needs the CUDA backend (gems._C or a just-in-time build)."""
    from gems import refresh as rf

    def run(backend):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 19), nn.Tanh(), nn.Linear(19, 6)).cuda()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = gems.GemsOptimizer(inner, model=model, tasks=["search", "rec"], rank=8, task_rank=4,
                                     update_proj_gap=4, backend=backend)
        g = torch.Generator().manual_seed(20)
        wa, wb = torch.randn(24, 6, generator=g), torch.randn(24, 6, generator=g)
        out = []
        for _ in range(10):
            xa, xb = torch.randn(16, 24, generator=g), torch.randn(12, 24, generator=g)
            batch = {"search": (xa, torch.tanh(xa @ wa)), "rec": (xb, torch.tanh(xb @ wb))}
            losses = {t: nn.functional.mse_loss(model(x.cuda()), y.cuda()) for t, (x, y) in batch.items()}
            opt.backward(losses, num_samples={"search": 16, "rec": 12})
            opt.step()
            opt.zero_grad()
            out.append([p.detach().clone() for p in model.parameters()])
        return out

    real = rf.canonical_signs
    try:
        for label, fn in (("canonical task-basis signs", real), ("solver signs", lambda q: q)):
            rf.canonical_signs = fn
            a, b = run("torch"), run("cuda")
            diffs = [max(float((x - y).abs().max()) for x, y in zip(sa, sb)) for sa, sb in zip(a, b)]
            print(f"cuda vs torch backend, {label}: max |ΔW| per step " + " ".join(f"{d:.1e}" for d in diffs))
    finally:
        rf.canonical_signs = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cuda-only", action="store_true", help="only the CUDA parts")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# machine: {machine_description(args.device)}")
    if not args.cuda_only:
        finite_check()
        gems_step()
        dominant_direction()
        cpu_refresh_breakdown()
    if torch.device(args.device).type == "cuda":
        cuda_small_svd()
        cuda_batched()
        cuda_sign_stability()


if __name__ == "__main__":
    main()
