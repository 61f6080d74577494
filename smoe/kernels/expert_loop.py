"""CPU expert backend: one loop over the non-empty experts, forward and a hand-written backward.

Legend: R rows sorted by expert, D model dim, E experts, F expert hidden dim, c rows of one expert.

Why a loop beats ``torch._grouped_mm`` on CPU: the CPU ``_grouped_mm`` is itself a per-group loop of GEMMs, and
autograd around it adds a chunk, an activation, a multiply and their backward kernels, each a full pass over
R x 2F. Here each expert's rows go through both projections while they are hot in cache, the gated activation's
backward writes straight into the (c, 2F) gradient the next GEMM reads, weight gradients land in place in
preallocated (E, ...) tensors, and empty experts cost nothing. The one host sync is reading ``counts_E``.

Low precision: on a CPU without native bf16/fp16 dot products (no AVX512-BF16 / AMX; oneDNN reports it) a bf16
GEMM is several times slower than fp32, so the GEMMs run in fp32 on bf16 inputs and outputs (the "compute dtype").
Activations saved for backward keep the input dtype: memory stays that of a bf16 model.
"""

from __future__ import annotations

import torch

from smoe.kernels.activation import act, gated_act_backward
from smoe.kernels.registry import native_low_precision


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if native_low_precision(dtype) else torch.float32


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out = a @ b without a temporary when the dtypes agree (the result is returned in the compute dtype)."""
    if out.dtype == a.dtype and out.is_contiguous():
        return torch.mm(a, b, out=out)
    result = a @ b
    out.copy_(result)
    return result


def _spans(counts: list[int]):
    """(expert, first row, end row) of every non-empty expert."""
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, start, start + c
        start += c


def _empty_but_idle(w_E__: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """An uninitialised tensor like ``w_E__`` whose idle experts' slices (no rows this call) are zero."""
    out = torch.empty_like(w_E__)
    for e, c in enumerate(counts):
        if not c:
            out[e].zero_()
    return out


class _ExpertLoop(torch.autograd.Function):
    # The GEMMs run in the compute dtype chosen here, so autocast (which would recast their inputs) is off inside.
    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, x_RD, w_gate_up_E2FD, w_down_EDF, counts, activation):
        R, D = x_RD.shape
        F = w_down_EDF.shape[-1]
        cdt = compute_dtype(x_RD.dtype)
        h_R2F = x_RD.new_empty(R, 2 * F)  # pre-activations, saved for backward in the input dtype
        y_RD = x_RD.new_empty(R, D)
        for e, s, t in _spans(counts):
            h_c2F = _mm_into(h_R2F[s:t], x_RD[s:t].to(cdt), w_gate_up_E2FD[e].to(cdt).t())
            gate_cF, up_cF = h_c2F.chunk(2, dim=-1)
            _mm_into(y_RD[s:t], act(gate_cF, activation) * up_cF, w_down_EDF[e].to(cdt).t())
        ctx.save_for_backward(x_RD, w_gate_up_E2FD, w_down_EDF, h_R2F)
        ctx.counts, ctx.activation = counts, activation
        return y_RD

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, dy_RD):
        x_RD, w_gate_up_E2FD, w_down_EDF, h_R2F = ctx.saved_tensors
        need_x, need_gu, need_down = ctx.needs_input_grad[:3]
        cdt = compute_dtype(x_RD.dtype)
        dx_RD = torch.empty_like(x_RD) if need_x else None
        # Only empty experts need zeroing: every other slice is overwritten below (a zero fill of the whole
        # (E, 2F, D) gradient was a further pass over it, 10-15% of a small MoE's training step).
        dw_gu = _empty_but_idle(w_gate_up_E2FD, ctx.counts) if need_gu else None
        dw_down = _empty_but_idle(w_down_EDF, ctx.counts) if need_down else None
        dh_R2F = h_R2F.new_empty(h_R2F.shape, dtype=cdt)
        for e, s, t in _spans(ctx.counts):
            dy_cD = dy_RD[s:t].to(cdt)
            h_c2F = h_R2F[s:t].to(cdt)
            if need_down:
                gate_cF, up_cF = h_c2F.chunk(2, dim=-1)
                _mm_into(dw_down[e], dy_cD.t(), act(gate_cF, ctx.activation) * up_cF)
            dh_c2F = dh_R2F[s:t]
            gated_act_backward(dy_cD @ w_down_EDF[e].to(cdt), h_c2F, ctx.activation, out_c2F=dh_c2F)
            if need_x:
                _mm_into(dx_RD[s:t], dh_c2F, w_gate_up_E2FD[e].to(cdt))
            if need_gu:
                _mm_into(dw_gu[e], dh_c2F.t(), x_RD[s:t].to(cdt))
        return dx_RD, dw_gu, dw_down, None, None


def expert_loop_experts(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation):
    return _ExpertLoop.apply(x_RD, w_gate_up_E2FD, w_down_EDF, counts_E.tolist(), activation)
