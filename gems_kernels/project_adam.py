"""Fused projection + subspace Adam for K same-shape weights in one launch (docs/kernel_contract.md).

For weight k, with task gradients G_k1..G_kT and bases B_k0 (shared), B_k1..B_kT (tasks):
    R_k0 = Σ_t w_t · project(G_kt, B_k0)      (the shared gradient is never materialised)
    R_ks = project(G_k,s-1, B_ks)             (s ≥ 1)
    δ_ks = adam_delta(R_ks, m_ks, v_ks, …)    (moments updated in place, fp32)

How it maps onto one launch. The coordinates of all subspaces of a weight are stacked row-wise
("combined rows": shared rows first, then each task's), and the whole thing is ONE block-sparse GEMM

    [R_0; R_1; …; R_T] = [[w_1 B_0ᵀ, …, w_T B_0ᵀ]; diag(B_1ᵀ, …, B_Tᵀ)] · [G_1; …; G_T]     (side "left")

i.e. per task the concatenated basis [B_0, B_t]ᵀ against G_t, with the shared rows summed over tasks in
registers. ("right" is the transpose: G_t·[B_0, B_t], coordinates m×r.) The grid is
(row tile of the combined rows, tile of the free dimension, weight k): the row-tile index varies fastest,
so the programs that read the same strip of G_t (all row tiles of [B_0, B_t]) run together and share it
through L2 — each gradient comes from HBM about once. Row tiles never straddle two subspaces (a small
int32 tile table says which subspace and which first row each tile has), so a tile knows whether it sums
over all tasks with weights w_t (shared) or reads one task's gradient. Adam runs in the epilogue on the
fp32 accumulator: the projected gradient is never written to memory.

Precision: gradients are read in their dtype (fp32/bf16/fp16); basis tiles are cast to it and tl.dot
accumulates in fp32 (fp32 gradients use 3xTF32 on GPU, see _utils.FP32_DOT_PRECISION). Adam follows
torch's ``_single_tensor_adam`` order of operations with round-to-nearest sqrt and division.

No autotune: the kernel updates moments in place through pointer tables, which autotune's repeated
benchmark launches would corrupt (``restore_value`` only sees tensor arguments). Block sizes below are
a fixed heuristic, NOT measured (written without access to a GPU); benches/gpu_check.sh times them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gems import contract
from gems import reference as R

from . import _utils as U

# GPU tile (not measured, see module doc): 64 combined rows × 128 columns of the free dimension, fp32
# accumulator of 32 registers/thread at 8 warps; reduction chunk 32 (fp32) / 64 (16-bit) elements = 128 B
# rows per load.
_GPU_BLOCK_R = 64
_GPU_BLOCK_C = 128
_GPU_BLOCK_D = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}
_GPU_NUM_WARPS = 8
_GPU_NUM_STAGES = 3
# Interpreter: each program is a few numpy ops, so fewer, larger tiles run fastest; capped at 64.
_INTERP_MAX_BLOCK = 64


@triton.jit
def _project_adam_kernel(
    g_tab,  # int64 [K, T]: address of G_kt (m×n, gradient dtype)
    b_tab,  # int64 [K, S]: address of B_ks (d×r_s, fp32)
    m_tab,  # int64 [K, S]: exp_avg (coordinates, fp32), updated in place
    v_tab,  # int64 [K, S]: exp_avg_sq
    o_tab,  # int64 [K, S]: δ output
    meta,  # int32: [S] ranks r_s | [NT] subspace of each row tile | [NT] first row of each tile
    w_tab,  # fp32 [T]: shared weights w_t
    G0,  # the first gradient: only its element type is used
    M, N, T, S, NT,
    lerp_w, beta2, one_minus_beta2, bc2_sqrt, neg_step_size, eps,
    LEFT: tl.constexpr,
    LERP_HI: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_c = tl.program_id(1)
    k = tl.program_id(2)

    s = tl.load(meta + S + tile)
    i0 = tl.load(meta + S + NT + tile)
    r = tl.load(meta + s)
    # shared tile (s = 0): all tasks, weighted; task tile s: only task s-1, weight 1
    t_lo = tl.where(s == 0, 0, s - 1)
    t_hi = tl.where(s == 0, T, s)

    if LEFT:
        D = M  # contraction over rows of G
        C = N
    else:
        D = N
        C = M

    offs_i = i0 + tl.arange(0, BLOCK_R)  # row of the subspace's coordinates (rank index)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # free dimension (n for left, m for right)
    mask_i = offs_i < r
    mask_c = offs_c < C

    b_ptr = tl.load(b_tab + k * S + s).to(tl.pointer_type(tl.float32))

    if LEFT:
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)

    for t in range(t_lo, t_hi):
        g_ptr = tl.load(g_tab + k * T + t).to(tl.pointer_type(G0.dtype.element_ty))
        w = tl.where(s == 0, tl.load(w_tab + t), 1.0)
        if LEFT:
            part = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        else:
            part = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            if LEFT:
                # Bᵀ tile [R, D] (B is d×r row-major) and G tile [D, C]
                bt = tl.load(b_ptr + offs_d[None, :] * r + offs_i[:, None],
                             mask=mask_i[:, None] & mask_d[None, :], other=0.0)
                g = tl.load(g_ptr + offs_d[:, None] * N + offs_c[None, :],
                            mask=mask_d[:, None] & mask_c[None, :], other=0.0)
                part = tl.dot(bt.to(g.dtype), g, part, input_precision=DOT_PREC)
            else:
                # G tile [C, D] (rows of G) and B tile [D, R]
                g = tl.load(g_ptr + offs_c[:, None] * N + offs_d[None, :],
                            mask=mask_c[:, None] & mask_d[None, :], other=0.0)
                b = tl.load(b_ptr + offs_d[:, None] * r + offs_i[None, :],
                            mask=mask_d[:, None] & mask_i[None, :], other=0.0)
                part = tl.dot(g, b.to(g.dtype), part, input_precision=DOT_PREC)
        acc += w * part

    # ---- epilogue: Adam on the projected gradient tile (torch _single_tensor_adam order) ----
    if LEFT:
        offs = offs_i[:, None] * C + offs_c[None, :]  # coordinates r×n, row-major
        mask = mask_i[:, None] & mask_c[None, :]
    else:
        offs = offs_c[:, None] * r + offs_i[None, :]  # coordinates m×r, row-major
        mask = mask_c[:, None] & mask_i[None, :]
    m_ptr = tl.load(m_tab + k * S + s).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(v_tab + k * S + s).to(tl.pointer_type(tl.float32))
    o_ptr = tl.load(o_tab + k * S + s).to(tl.pointer_type(tl.float32))
    exp_avg = tl.load(m_ptr + offs, mask=mask, other=0.0)
    exp_avg_sq = tl.load(v_ptr + offs, mask=mask, other=0.0)
    # exp_avg.lerp_(grad, 1 - beta1): torch's two-branch lerp
    if LERP_HI:
        exp_avg = acc - (acc - exp_avg) * (1.0 - lerp_w)
    else:
        exp_avg = exp_avg + lerp_w * (acc - exp_avg)
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg_sq = exp_avg_sq * beta2
    exp_avg_sq = exp_avg_sq + (one_minus_beta2 * acc) * acc
    # denom = exp_avg_sq.sqrt() / sqrt(bc2) + eps ; δ = -step_size · exp_avg / denom
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), tl.zeros_like(exp_avg_sq) + bc2_sqrt) + eps
    delta = neg_step_size * tl.div_rn(exp_avg, denom)
    tl.store(m_ptr + offs, exp_avg, mask=mask)
    tl.store(v_ptr + offs, exp_avg_sq, mask=mask)
    tl.store(o_ptr + offs, delta, mask=mask)


def _row_tiles(ranks: Sequence[int], block_r: int) -> tuple[list[int], list[int]]:
    """Row tiles of the combined coordinates: (subspace, first row) for each; none for a rank-0 subspace."""
    tile_s, tile_i0 = [], []
    for s, r in enumerate(ranks):
        for i0 in range(0, r, block_r):
            tile_s.append(s)
            tile_i0.append(i0)
    return tile_s, tile_i0


def project_adam(
    task_grads: Sequence[Sequence[torch.Tensor]],
    shared_weights: Sequence[float],
    bases: Sequence[Sequence[torch.Tensor]],
    exp_avgs: Sequence[Sequence[torch.Tensor]],
    exp_avg_sqs: Sequence[Sequence[torch.Tensor]],
    *,
    side: str,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[list[torch.Tensor]]:
    """Project every task gradient onto the shared and its task basis and take one Adam step in each
    subspace, for K same-shape weights in one launch. Returns δ as list[K] of list[S] fp32 tensors
    (contiguous views, one buffer per subspace); ``exp_avgs``/``exp_avg_sqs`` are updated in place.

    See docs/kernel_contract.md and gems.reference (project, shared_gradient, adam_delta)."""
    c = contract.project_adam_args(task_grads, shared_weights, bases, exp_avgs, exp_avg_sqs, side=side, step=step,
                                   lr=lr, beta1=beta1, beta2=beta2, eps=eps, device_rule=U.check_device,
                                   memo=U.CHECKED)
    K, S, T = c.K, c.S, c.T
    if K == 0:
        return []
    grads, bases, exp_avgs, exp_avg_sqs = c.lists
    weights, step_i, lr, beta1, beta2, eps = c.scalars
    M, N, dtype, device = c.M, c.N, c.dtype, c.device
    U.check_int32_extent(M * N, "a gradient")
    for row in grads:
        for t, g in enumerate(row):
            row[t] = g.contiguous()

    D = R.side_dim((M, N), side)
    flat = U.flatten
    # bases and moments are the same tensors at every step between two refreshes: checked once (U.CHECKED)
    writeback = []  # (original, contiguous copy) pairs for in-place outputs that were not contiguous
    ranks, coord = c.ranks, c.coord
    if c.known is None:
        copied = U.contiguous_rows(bases)
        writeback = U.contiguous_rows(exp_avgs) + U.contiguous_rows(exp_avg_sqs)
        tables = (U.ptr_table(flat(bases), device), U.ptr_table(flat(exp_avgs), device),
                  U.ptr_table(flat(exp_avg_sqs), device))
        if not copied and not writeback:  # tables of temporary copies must not outlive this call
            c.remember(tables)
    else:
        tables = c.known

    # δ: one buffer per subspace, δ_ks its k-th contiguous (row-major) slice; one unbind per subspace instead of
    # K·S slicing ops (the step is host-bound at small shapes: `python benches/bench_overhead.py`)
    per_sub = [torch.empty((K, *coord[s]), dtype=torch.float32, device=device).unbind(0) for s in range(S)]
    deltas = [[per_sub[s][k] for s in range(S)] for k in range(K)]

    C = N if side == "left" else M
    if U.INTERPRET:
        block_r = U.clamp_block(max(ranks), 16, _INTERP_MAX_BLOCK)
        block_c = U.clamp_block(C, 16, _INTERP_MAX_BLOCK)
        block_d = U.clamp_block(D, 16, _INTERP_MAX_BLOCK)
        launch_opts = {}
    else:
        block_r = U.clamp_block(max(ranks), 16, _GPU_BLOCK_R)
        block_c = _GPU_BLOCK_C
        block_d = _GPU_BLOCK_D[dtype]
        launch_opts = {"num_warps": _GPU_NUM_WARPS, "num_stages": _GPU_NUM_STAGES}
    tile_s, tile_i0 = _row_tiles(ranks, block_r)
    NT = len(tile_s)
    if NT > 0:
        g_tab = U.ptr_table(flat(grads), device)
        b_tab, m_tab, v_tab = tables
        o_tab = U.ptr_table(flat(deltas), device)
        meta = U.int_table(ranks + tile_s + tile_i0, device)
        w_tab = U.float_table(weights, device)
        lerp_w = 1.0 - beta1
        bc1 = 1.0 - beta1 ** step_i
        bc2 = 1.0 - beta2 ** step_i
        step_size = lr / bc1
        grid = (NT, triton.cdiv(C, block_c), K)
        _project_adam_kernel[grid](
            g_tab, b_tab, m_tab, v_tab, o_tab, meta, w_tab, grads[0][0],
            M, N, T, S, NT,
            lerp_w, beta2, 1.0 - beta2, math.sqrt(bc2), -step_size, eps,
            LEFT=side == "left", LERP_HI=lerp_w >= 0.5, DOT_PREC=U.dot_precision(dtype),
            BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d, **launch_opts,
        )
    for orig, copy in writeback:
        orig.copy_(copy)
    return deltas
