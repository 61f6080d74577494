"""Triton kernels: group-limited top-k selection, a grouped GEMM with the row gather fused into its loads and
the gated activation / routing-weight scale / row scatter in its epilogue, and the grouped weight-gradient GEMM.

Legend: T tokens, E experts, K top-k, R rows sorted by expert, BM/BN/BK tile sizes.

Every kernel reads its work from device tensors (per-block expert ids, row ranges, per-expert offsets), so no
launch needs a host sync and a launch's grid depends on shapes only: CUDA-graph capturable at fixed shapes.
Empty experts own no blocks (dX path) or write zero weight gradients (dW path).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _activation(g, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return g * tl.sigmoid(g)
    # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))


@triton.jit
def select_experts_kernel(choice_ptr, ids_ptr, E, stride_t, experts_per_group,
                          K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                          GROUP_TOP2: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr):
    """One token per program: keep the TOPK_GROUP best groups (score: max, or sum of the top 2), then the K
    best experts among them, best first."""
    t = tl.program_id(0)
    es = tl.arange(0, BLOCK_E)
    c = tl.load(choice_ptr + t * stride_t + es, mask=es < E, other=float("-inf")).to(tl.float32)
    if N_GROUP > 1:
        gs = tl.arange(0, BLOCK_G)
        in_group = ((es // experts_per_group)[None, :] == gs[:, None]) & (es < E)[None, :]
        vals = tl.where(in_group, c[None, :], float("-inf"))
        score = tl.max(vals, axis=1)
        if GROUP_TOP2:
            first = tl.argmax(vals, axis=1)
            score += tl.max(tl.where(es[None, :] == first[:, None], float("-inf"), vals), axis=1)
        score = tl.where(gs < N_GROUP, score, float("-inf"))
        keep_g = gs < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(score, axis=0)
            keep_g = keep_g | (gs == best)
            score = tl.where(gs == best, float("-inf"), score)
        keep_e = tl.max(tl.where(in_group & keep_g[:, None], 1, 0), axis=0) > 0
        c = tl.where(keep_e, c, float("-inf"))
    for k in tl.static_range(K):
        best = tl.argmax(c, axis=0)
        tl.store(ids_ptr + t * K + k, best.to(tl.int64))
        c = tl.where(es == best, float("-inf"), c)


@triton.jit
def grouped_mm_kernel(a_ptr, b_ptr, c_ptr, h_ptr, a_rows_ptr, c_rows_ptr, scale_ptr,
                      block_expert_ptr, block_start_ptr, block_end_ptr, N, Kdim,
                      s_am, s_ak, s_be, s_bn, s_bk, s_cm, s_cn, s_hm, s_hn,
                      GATHER: tl.constexpr, SCATTER: tl.constexpr, SCALE: tl.constexpr, GATED: tl.constexpr,
                      ACT: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[out(r)] = epilogue(A[in(r)] @ B[e]^T) for the rows r of one expert's block; B[e] is (N, Kdim) by strides.

    GATHER: in(r) = a_rows[r] (the token of row r: the dispatch gather, fused into the A loads).
    GATED: B holds [gate; up] (2N rows); the block computes both halves, stores the pre-activations to H (for
    the backward) and act(gate) * up to C. SCALE: multiply row r by scale[r] (the routing weight).
    SCATTER: out(r) = c_rows[r] (the row's token-major slot: the combine's un-permute, fused into the store).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        rows = tl.load(block_start_ptr + pid_m) + tl.arange(0, BM)
        row_mask = rows < tl.load(block_end_ptr + pid_m)
        a_rows = tl.load(a_rows_ptr + rows, mask=row_mask, other=0) if GATHER else rows
        cols = pid_n * BN + tl.arange(0, BN)
        col_mask = cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        precision: tl.constexpr = "ieee" if IEEE else "tf32"
        for k0 in range(0, Kdim, BK):
            ks = k0 + tl.arange(0, BK)
            k_mask = ks < Kdim
            a = tl.load(a_ptr + a_rows[:, None] * s_am + ks[None, :] * s_ak,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b_ptrs = b_ptr + e.to(tl.int64) * s_be + cols[None, :] * s_bn + ks[:, None] * s_bk
            b_mask = k_mask[:, None] & col_mask[None, :]
            acc += tl.dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), input_precision=precision)
            if GATED:
                acc_up += tl.dot(a, tl.load(b_ptrs + N * s_bn, mask=b_mask, other=0.0), input_precision=precision)
        out_mask = row_mask[:, None] & col_mask[None, :]
        if GATED:
            h_ptrs = h_ptr + rows[:, None] * s_hm + cols[None, :] * s_hn
            tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=out_mask)
            tl.store(h_ptrs + N * s_hn, acc_up.to(h_ptr.dtype.element_ty), mask=out_mask)
            # The backward recomputes from the stored (rounded) pre-activations: use the same values here.
            gate = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
            acc = _activation(gate, ACT) * acc_up.to(h_ptr.dtype.element_ty).to(tl.float32)
        if SCALE:
            acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        c_rows = tl.load(c_rows_ptr + rows, mask=row_mask, other=0) if SCATTER else rows
        tl.store(c_ptr + c_rows[:, None] * s_cm + cols[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def grouped_dw_kernel(g_ptr, a_ptr, dw_ptr, g_rows_ptr, a_rows_ptr, scale_ptr, starts_ptr, counts_ptr, N, Kdim,
                      s_gm, s_gn, s_am, s_ak, s_we, s_wn, s_wk,
                      GATHER_G: tl.constexpr, GATHER_A: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dW[e] (N, Kdim) = sum over expert e's rows r of (scale[r] * G[g(r)])^T A[a(r)]; gathers as above."""
    e = tl.program_id(0)
    ns = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.program_id(2) * BK + tl.arange(0, BK)
    n_mask = ns < N
    k_mask = ks < Kdim
    start = tl.load(starts_ptr + e)
    count = tl.load(counts_ptr + e)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    precision: tl.constexpr = "ieee" if IEEE else "tf32"
    for m0 in range(0, count, BM):
        offs = m0 + tl.arange(0, BM)
        row_mask = offs < count
        rows = start + offs
        g_rows = tl.load(g_rows_ptr + rows, mask=row_mask, other=0) if GATHER_G else rows
        a_rows = tl.load(a_rows_ptr + rows, mask=row_mask, other=0) if GATHER_A else rows
        g = tl.load(g_ptr + g_rows[:, None] * s_gm + ns[None, :] * s_gn,
                    mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if SCALE:
            g = (g.to(tl.float32) * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]).to(g.dtype)
        a = tl.load(a_ptr + a_rows[:, None] * s_am + ks[None, :] * s_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(tl.trans(g), a, input_precision=precision)
    tl.store(dw_ptr + e.to(tl.int64) * s_we + ns[:, None] * s_wn + ks[None, :] * s_wk,
             acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
