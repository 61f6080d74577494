"""Sort-based grouped GEMM: one ``torch._grouped_mm`` per projection over all experts, no padding.

Rows arrive sorted by expert, so expert e's rows are the contiguous slice ending at offs[e]; the weights are
transposed views, so the stored (out, in) layout is untouched. ``torch._grouped_mm`` needs 16-byte aligned row
strides (and bf16 on CUDA); other shapes and dtypes fall back to the reference loop.
"""

from __future__ import annotations

import torch

from smoe.kernels.reference import reference_experts
from smoe.nn.mlp import gated_act


def runs_on(device: torch.device) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"this torch ({torch.__version__}) has no torch._grouped_mm"
    if device.type == "cuda":
        return None if torch.cuda.get_device_capability(device) >= (9, 0) else "CUDA needs sm90 or newer"
    return None if device.type == "cpu" else "runs on the CPU and on CUDA only"


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense: _grouped_mm's backward rejects the
    zero-stride gradients that reductions such as ``sum()`` produce."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_experts(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation):
    itemsize = x_RD.element_size()
    cuda_needs_bf16 = x_RD.is_cuda and x_RD.dtype != torch.bfloat16  # the CUDA kernel is bf16-only
    if cuda_needs_bf16 or any(n * itemsize % 16 for n in w_down_EDF.shape[1:]):
        return reference_experts(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation)
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    w_gate_up_E2FD, w_down_EDF = w_gate_up_E2FD.to(x_RD.dtype), w_down_EDF.to(x_RD.dtype)
    h_R2F = _ContiguousGrad.apply(torch._grouped_mm(x_RD, w_gate_up_E2FD.transpose(-2, -1), offs=offs_E))
    gate_RF, up_RF = h_R2F.chunk(2, dim=-1)
    a_RF = gated_act(gate_RF, up_RF, activation).contiguous()
    return _ContiguousGrad.apply(torch._grouped_mm(a_RF, w_down_EDF.transpose(-2, -1), offs=offs_E))
