"""Back-projection of every subspace as one GEMM with the weight update as epilogue, K weights per launch.

For weight k (docs/kernel_contract.md):
    Δ_k = [c_0 B_k0, c_1 B_k1, …] · [δ_k0; δ_k1; …]          (side "left": bases m×r_s, δ r_s×n)
        = [δ_k0, δ_k1, …] · [c_0 B_k0, c_1 B_k1, …]ᵀ         (side "right": δ m×r_s, bases n×r_s)
    W_k ← W_k·(1 − lr·wd) + lr·wd·P_k + Δ_k                  (written once, in W's dtype)

The reduction dimension of the GEMM is the concatenation of all subspaces (Σ r_s); the program walks the
subspaces in order through pointer tables (no concatenated copy of the bases or δ is ever made), scaling
each basis/δ tile by its coefficient c_s before the dot. W is read and written once per tile, in fp32
registers: decay first (torch AdamW's order), then + Δ, then one rounding to W's dtype.

Null-space-aware decay (``decay_bases``): D(W) = W − P(W) with the protected part
P = W Q Qᵀ ("right") or Q Qᵀ W ("left"), so W − lr·wd·D(W) = W(1 − lr·wd) + lr·wd·P. P is low rank: torch
computes U_k = project(W_k, Q_k, decay_side) (fp32, q×n or m×q — one extra read of W_k and a thin GEMM)
before the launch, and the kernel adds lr·wd·project_back(U_k, Q_k) as one more segment of the same GEMM
(its own orientation ``decay_side``; q may differ per weight, None/0 columns = plain decay). P (m×n) is
never materialised.

Precision: the dot operands (fp32 bases, fp32 δ) are cast to W's dtype when W is bf16/fp16 (tensor
cores, fp32 accumulation; the same rounding a working-precision torch implementation makes) and use
3xTF32 on GPU when W is fp32. Block sizes: fixed heuristic, NOT measured (no GPU where this was written).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gems import contract

from . import _utils as U
from .project_adam import _INTERP_MAX_BLOCK

# GPU tile (not measured): 128×128 of W (16-bit) / 64×128 (fp32, 3 dots per 3xTF32 step), chunks of 32 of
# the concatenated rank, 8 warps; GROUP_M = 8 row tiles swept together so bases/δ strips stay in L2.
_GPU_BLOCK_M = {torch.float32: 64, torch.float16: 128, torch.bfloat16: 128}
_GPU_BLOCK_N = 128
_GPU_BLOCK_K = 32
_GPU_NUM_WARPS = 8
_GPU_NUM_STAGES = 3
_GROUP_M = 8


@triton.jit
def _back_project_update_kernel(
    w_tab,  # int64 [K]: address of W_k (m×n, W dtype), updated in place
    b_tab,  # int64 [K, S]: B_ks (d×r_s fp32)
    d_tab,  # int64 [K, S]: δ_ks (coordinates fp32)
    q_tab,  # int64 [K]: Q_k (d'×q_k fp32), protected directions for the decay
    u_tab,  # int64 [K]: U_k = project(W_k, Q_k, decay_side) (fp32)
    r_tab,  # int32 [S] ranks r_s | [K] q_k
    c_tab,  # fp32 [S]: coefficients c_s
    W0,  # the first weight: only its element type is used
    M, N, S,
    decay_mul,  # 1 − lr·wd (exactly 1.0 when there is no decay)
    decay_coef,  # lr·wd, coefficient of the protected part P
    LEFT: tl.constexpr,
    HAS_DECAY_BASIS: tl.constexpr,
    DECAY_LEFT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    k = tl.program_id(1)
    # grouped ordering: GROUP_M row tiles share their column tiles' δ/basis strips in L2
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    DOT_T = W0.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, S):
        r = tl.load(r_tab + s)
        c = tl.load(c_tab + s)
        b_ptr = tl.load(b_tab + k * S + s).to(tl.pointer_type(tl.float32))
        d_ptr = tl.load(d_tab + k * S + s).to(tl.pointer_type(tl.float32))
        for j0 in range(0, r, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            mask_j = offs_j < r
            if LEFT:
                # (c·B)[m, j] · δ[j, n]
                a = tl.load(b_ptr + offs_m[:, None] * r + offs_j[None, :],
                            mask=mask_m[:, None] & mask_j[None, :], other=0.0)
                bo = tl.load(d_ptr + offs_j[:, None] * N + offs_n[None, :],
                             mask=mask_j[:, None] & mask_n[None, :], other=0.0)
            else:
                # δ[m, j] · (c·B)ᵀ[j, n]   (B is n×r row-major)
                a = tl.load(d_ptr + offs_m[:, None] * r + offs_j[None, :],
                            mask=mask_m[:, None] & mask_j[None, :], other=0.0)
                bo = tl.load(b_ptr + offs_n[None, :] * r + offs_j[:, None],
                             mask=mask_j[:, None] & mask_n[None, :], other=0.0)
            a = a * c
            acc = tl.dot(a.to(DOT_T), bo.to(DOT_T), acc, input_precision=DOT_PREC)

    if HAS_DECAY_BASIS:
        q = tl.load(r_tab + S + k)
        q_ptr = tl.load(q_tab + k).to(tl.pointer_type(tl.float32))
        u_ptr = tl.load(u_tab + k).to(tl.pointer_type(tl.float32))
        for j0 in range(0, q, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            mask_j = offs_j < q
            if DECAY_LEFT:
                # P = Q (m×q) · U (q×n), U = Qᵀ W
                a = tl.load(q_ptr + offs_m[:, None] * q + offs_j[None, :],
                            mask=mask_m[:, None] & mask_j[None, :], other=0.0)
                bo = tl.load(u_ptr + offs_j[:, None] * N + offs_n[None, :],
                             mask=mask_j[:, None] & mask_n[None, :], other=0.0)
            else:
                # P = U (m×q) · Qᵀ (q×n), U = W Q, Q n×q
                a = tl.load(u_ptr + offs_m[:, None] * q + offs_j[None, :],
                            mask=mask_m[:, None] & mask_j[None, :], other=0.0)
                bo = tl.load(q_ptr + offs_n[None, :] * q + offs_j[:, None],
                             mask=mask_j[:, None] & mask_n[None, :], other=0.0)
            a = a * decay_coef
            acc = tl.dot(a.to(DOT_T), bo.to(DOT_T), acc, input_precision=DOT_PREC)

    # ---- epilogue: W ← W·(1 − lr·wd) + (lr·wd·P + Δ), one rounding to W's dtype ----
    w_ptr = tl.load(w_tab + k).to(tl.pointer_type(DOT_T))
    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = w * decay_mul
    w = w + acc
    tl.store(w_ptr + offs, w.to(DOT_T), mask=mask)


def back_project_update(
    weights: Sequence[torch.Tensor],
    bases: Sequence[Sequence[torch.Tensor]],
    coeffs: Sequence[float],
    deltas: Sequence[Sequence[torch.Tensor]],
    *,
    side: str,
    lr: float,
    weight_decay: float,
    decay_bases: Sequence[torch.Tensor | None] | None = None,
    decay_side: str = "right",
) -> None:
    """W_k ← decay(W_k) + Σ_s coeff_s·project_back(δ_ks, B_ks, side) for K same-shape weights, in place,
    in one launch. See docs/kernel_contract.md and gems.reference (project_back, apply_update)."""
    c = contract.back_project_update_args(weights, bases, coeffs, deltas, side=side, lr=lr, weight_decay=weight_decay,
                                          decay_bases=decay_bases, decay_side=decay_side,
                                          device_rule=U.check_device, memo=U.CHECKED)
    K, S = c.K, c.S
    if K == 0:
        return
    ws, bases, deltas, qs = c.lists
    cs, lr, wd, decay_side = c.scalars
    M, N, dtype, device = c.M, c.N, c.dtype, c.device
    U.check_int32_extent(M * N, "a weight")
    ranks = c.ranks

    flat = U.flatten
    # weights and bases are the same tensors at every step between two refreshes: checked once (U.CHECKED)
    writeback = []
    if c.known is None:
        writeback = U.contiguous_rows([ws])
        copied = U.contiguous_rows(bases)
        w_tab, b_tab = U.ptr_table(ws, device), U.ptr_table(flat(bases), device)
        if not copied and not writeback:  # tables of temporary copies must not outlive this call
            c.remember((w_tab, b_tab))
    else:
        w_tab, b_tab = c.known
    for row in deltas:
        for s, d in enumerate(row):
            row[s] = d.contiguous()

    decays = lr != 0.0 and wd != 0.0
    decay_mul = 1.0 - lr * wd if decays else 1.0
    decay_coef = lr * wd if decays else 0.0
    us, qranks = [], []
    has_decay_basis = decays and any(q is not None and q.shape[1] > 0 for q in qs)
    if has_decay_basis:
        for k in range(K):
            qb = qs[k]
            if qb is None or qb.shape[1] == 0:
                qs[k] = ws[k]  # never dereferenced: q_k = 0
                us.append(ws[k])
                qranks.append(0)
                continue
            q32 = qb.to(torch.float32).contiguous()
            w32 = ws[k].float()
            u = (q32.T @ w32) if decay_side == "left" else (w32 @ q32)
            qs[k] = q32
            us.append(u.contiguous())
            qranks.append(int(q32.shape[1]))
    else:
        qs, us, qranks = list(ws), list(ws), [0] * K

    if U.INTERPRET:
        block_m = U.clamp_block(M, 16, _INTERP_MAX_BLOCK)
        block_n = U.clamp_block(N, 16, _INTERP_MAX_BLOCK)
        block_k = U.clamp_block(max(ranks + qranks + [1]), 16, _INTERP_MAX_BLOCK)
        launch_opts = {}
    else:
        block_m, block_n, block_k = _GPU_BLOCK_M[dtype], _GPU_BLOCK_N, _GPU_BLOCK_K
        launch_opts = {"num_warps": _GPU_NUM_WARPS, "num_stages": _GPU_NUM_STAGES}

    d_tab = U.ptr_table(flat(deltas), device)
    q_tab = U.ptr_table(qs, device)
    u_tab = U.ptr_table(us, device)
    r_tab = U.int_table(ranks + qranks, device)
    c_tab = U.float_table(cs, device)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), K)
    _back_project_update_kernel[grid](
        w_tab, b_tab, d_tab, q_tab, u_tab, r_tab, c_tab, ws[0],
        M, N, S, decay_mul, decay_coef,
        LEFT=side == "left", HAS_DECAY_BASIS=has_decay_basis, DECAY_LEFT=decay_side == "left",
        DOT_PREC=U.dot_precision(dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=_GROUP_M, **launch_opts,
    )
    for orig, copy in writeback:
        orig.copy_(copy)
