"""Launchers and the autograd function around the Triton kernels.

Legend: N tokens, D model dim, E experts, F expert hidden dim, K top-k, A = N*K assignments (token-major slots),
R kept rows sorted by expert, B blocks of BM rows (each inside one expert).

Forward: h, a = act-GEMM(x[token(r)]) (gather fused into the loads, SwiGLU in the epilogue); then
out[slot(r)] = w_r * (a_r @ W_down[e]^T) (routing weight and un-permute fused into the store), y = sum of each
token's K slots: a deterministic reduction, no atomics. Backward: the same two kernels with transposed weight
strides give dA (gathering dy) and dX (scattering to slots), and the dW kernel accumulates each expert's rows.
"""

from __future__ import annotations

import torch
import triton

from smoe.kernels.activation import act, gated_act_backward
from smoe.kernels.triton.kernels import grouped_dw_kernel, grouped_mm_kernel, select_experts_kernel

_ACT = {"silu": 0, "gelu": 1}
BM, BN, BK = 64, 64, 32


def select_experts(choice_TE: torch.Tensor, top_k: int, n_group: int, topk_group: int, group_top2: bool):
    """Indices (T, K) of the K best experts of each row, restricted to the topk_group best groups."""
    T, E = choice_TE.shape
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=choice_TE.device)
    if T:
        choice_TE = choice_TE.contiguous()
        select_experts_kernel[(T,)](choice_TE, ids_TK, E, choice_TE.stride(0), E // n_group, K=top_k,
                                    N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_TOP2=group_top2,
                                    BLOCK_E=triton.next_power_of_2(E), BLOCK_G=triton.next_power_of_2(n_group))
    return ids_TK


def _schedule(counts_E: torch.Tensor, n_rows: int):
    """Per-block expert, first row and end row, from device counts: no host sync. The block count is an upper
    bound from shapes (cdiv(R, BM) + E), so the grid is static; surplus blocks get expert -1 and exit."""
    E = counts_E.numel()
    blocks_E = (counts_E + BM - 1) // BM
    last_block_E = torch.cumsum(blocks_E, 0)
    b_B = torch.arange(triton.cdiv(n_rows, BM) + E, device=counts_E.device)
    expert_B = torch.searchsorted(last_block_E, b_B, right=True)
    e_B = expert_B.clamp(max=E - 1)
    ends_E = torch.cumsum(counts_E, 0)
    starts_E = ends_E - counts_E
    start_B = starts_E[e_B] + (b_B - (last_block_E - blocks_E)[e_B]) * BM
    return torch.where(expert_B < E, expert_B, -1), start_B, ends_E[e_B], starts_E


def _mm(a, w_E, out, sched, n, k, w_strides, h=None, a_rows=None, out_rows=None, scale=None, activation="silu"):
    expert_B, start_B, end_B, _ = sched
    s_be, s_bn, s_bk = w_strides
    grid = (expert_B.numel(), triton.cdiv(n, BN))
    grouped_mm_kernel[grid](
        a, w_E, out, h if h is not None else out, a_rows if a_rows is not None else expert_B,
        out_rows if out_rows is not None else expert_B, scale if scale is not None else a,
        expert_B, start_B, end_B, n, k, a.stride(0), a.stride(1), s_be, s_bn, s_bk, out.stride(0), out.stride(1),
        h.stride(0) if h is not None else 0, h.stride(1) if h is not None else 0,
        GATHER=a_rows is not None, SCATTER=out_rows is not None, SCALE=scale is not None, GATED=h is not None,
        ACT=_ACT[activation], IEEE=a.dtype == torch.float32, BM=BM, BN=BN, BK=BK)


def _dw(g, a, dw, sched, counts_E, n, k, g_rows=None, a_rows=None, scale=None):
    starts_E = sched[3]
    grid = (counts_E.numel(), triton.cdiv(n, BN), triton.cdiv(k, BK))
    grouped_dw_kernel[grid](
        g, a, dw, g_rows if g_rows is not None else starts_E, a_rows if a_rows is not None else starts_E,
        scale if scale is not None else g, starts_E, counts_E, n, k, g.stride(0), g.stride(1), a.stride(0),
        a.stride(1), dw.stride(0), dw.stride(1), dw.stride(2), GATHER_G=g_rows is not None,
        GATHER_A=a_rows is not None, SCALE=scale is not None, IEEE=g.dtype == torch.float32, BM=BM, BN=BN, BK=BK)


class FusedExperts(torch.autograd.Function):
    """y_ND = sum over each token's kept assignments of weight * expert(x_token), from unsorted tokens."""

    @staticmethod
    def forward(ctx, x_ND, weights_A, w_gate_up_E2FD, w_down_EDF, order_R, counts_E, top_k, activation):
        # Weights arrive in x's dtype (the caller casts them, so autograd owns the cast's backward).
        N, D = x_ND.shape
        F = w_down_EDF.shape[-1]
        R = order_R.numel()
        x_ND = x_ND.contiguous()
        token_R = order_R // top_k
        weights_R = weights_A.index_select(0, order_R).float().contiguous()
        sched = _schedule(counts_E, R)
        h_R2F = x_ND.new_empty(R, 2 * F)
        a_RF = x_ND.new_empty(R, F)
        w_gu, w_down = w_gate_up_E2FD, w_down_EDF
        _mm(x_ND, w_gu, a_RF, sched, F, D, (w_gu.stride(0), w_gu.stride(1), w_gu.stride(2)), h=h_R2F,
            a_rows=token_R, activation=activation)
        out_AD = x_ND.new_zeros(N * top_k, D)  # dropped assignments keep a zero slot
        _mm(a_RF, w_down, out_AD, sched, D, F, (w_down.stride(0), w_down.stride(1), w_down.stride(2)),
            out_rows=order_R, scale=weights_R)
        ctx.save_for_backward(x_ND, w_gu, w_down, order_R, token_R, counts_E, weights_R, h_R2F, a_RF, *sched)
        ctx.top_k, ctx.activation = top_k, activation
        return out_AD.view(N, top_k, D).sum(1, dtype=torch.float32).to(x_ND.dtype)

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, w_gu, w_down, order_R, token_R, counts_E, weights_R, h_R2F, a_RF, *sched = ctx.saved_tensors
        N, D = x_ND.shape
        R, F = a_RF.shape
        dy_ND = dy_ND.to(x_ND.dtype).contiguous()
        # g_r = dy[token(r)] @ W_down[e]: W_down (E, D, F) read as (F, D) by strides.
        g_RF = x_ND.new_empty(R, F)
        _mm(dy_ND, w_down, g_RF, sched, F, D, (w_down.stride(0), w_down.stride(2), w_down.stride(1)),
            a_rows=token_R)
        gate_RF, up_RF = h_R2F.float().chunk(2, dim=-1)
        act_RF = act(gate_RF, ctx.activation) * up_RF
        d_weights_A = torch.zeros(N * ctx.top_k, device=x_ND.device, dtype=torch.float32)
        d_weights_A.index_copy_(0, order_R, (g_RF.float() * act_RF).sum(-1))
        dh_R2F = torch.empty(R, 2 * F, device=x_ND.device, dtype=torch.float32)
        gated_act_backward(g_RF.float() * weights_R[:, None], h_R2F, ctx.activation, out_c2F=dh_R2F)
        dh_R2F = dh_R2F.to(x_ND.dtype)
        # dX: dh_r @ W_gu[e], W_gu (E, 2F, D) read as (D, 2F); scattered to the row's slot, then summed over K.
        dx_AD = x_ND.new_zeros(N * ctx.top_k, D)
        _mm(dh_R2F, w_gu, dx_AD, sched, D, 2 * F, (w_gu.stride(0), w_gu.stride(2), w_gu.stride(1)),
            out_rows=order_R)
        dx_ND = dx_AD.view(N, ctx.top_k, D).sum(1, dtype=torch.float32).to(x_ND.dtype)
        dw_down = torch.empty_like(w_down)
        _dw(dy_ND, a_RF, dw_down, sched, counts_E, D, F, g_rows=token_R, scale=weights_R)
        dw_gu = torch.empty_like(w_gu)
        _dw(dh_R2F, x_ND, dw_gu, sched, counts_E, 2 * F, D, a_rows=token_R)
        return dx_ND, d_weights_A, dw_gu, dw_down, None, None, None, None
