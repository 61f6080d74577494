"""The spec of the quantised-weight kernels: dequantise (smoe.kernels.qweight), round the activations an int4 weight
multiplies to int8 where the format says so (``int8_activations``), then the float maths. Also the fallback
wherever the fast path cannot run (numba not installed, a GPU). On a CPU it is several times slower than fp32,
since every call writes and reads the dequantised fp32 weight (docs/quantization.md has the numbers); the experts
dequantise only the experts that have rows.

Legend: B rows, I inputs, O outputs, R rows sorted by expert, D model dim, N tokens, K experts per token,
A = N * K assignments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoe.kernels.qweight import QWeight, dequantize, int8_activations, quantize_activations
from smoe.kernels.registry import Assignments, Kernels
from smoe.nn.mlp import gated_act


def linear(x_BI: torch.Tensor, w: QWeight) -> torch.Tensor:
    if int8_activations(w):
        x_BI = quantize_activations(x_BI, w.group_size).to(x_BI.dtype)
    return F.linear(x_BI, dequantize(w))


def experts(x_RD: torch.Tensor, counts_E: torch.Tensor, w_gate_up: QWeight, w_down: QWeight, activation: str
            ) -> torch.Tensor:
    y_RD = x_RD.new_zeros(x_RD.shape[0], w_down.qweight.shape[-2])
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        if count:
            gate, up = linear(x_RD[start : start + count], w_gate_up.expert(e)).chunk(2, dim=-1)
            y_RD[start : start + count] = linear(gated_act(gate, up, activation), w_down.expert(e))
        start += count
    return y_RD


def tokens(x_ND: torch.Tensor, assignments: Assignments, w_gate_up: QWeight, w_down: QWeight, activation: str
           ) -> torch.Tensor:
    """Each token's weighted sum of its experts' outputs, expert by expert (the spec of a backend's ``tokens``)."""
    N, E = x_ND.shape[0], w_gate_up.qweight.shape[0]
    expert_ids_A, weights_A = assignments.expert_ids_A, assignments.weights_A
    ids_NK, weights_NK = expert_ids_A.view(N, -1), weights_A.view(N, -1)
    y_ND = x_ND.new_zeros(N, w_down.qweight.shape[-2])
    for e in expert_ids_A.unique().tolist():
        if 0 <= e < E:
            n, k = (ids_NK == e).nonzero(as_tuple=True)
            y_e = experts(x_ND[n], torch.tensor([n.numel()]), w_gate_up.expert(e, keepdim=True),
                          w_down.expert(e, keepdim=True), activation)
            y_ND.index_add_(0, n, y_e * weights_NK[n, k, None].to(y_e.dtype))
    return y_ND


KERNELS = Kernels(experts, tokens, sorts_tokens=True, linear=linear)
