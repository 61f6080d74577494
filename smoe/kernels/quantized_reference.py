"""The spec of the quantised-weight kernels: dequantise (smoe.quant.format), then the float maths. Also the
fallback wherever the fast path cannot run (numba not installed, a GPU). On a CPU it is several times slower than
fp32, since every call writes and reads the dequantised fp32 weight (docs/quantization.md has the numbers); the
experts dequantise only the experts that have rows.

Legend: B rows, I inputs, O outputs, R rows sorted by expert, D model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoe.kernels.registry import QuantizedKernels, register_quantized
from smoe.nn.mlp import gated_act
from smoe.quant.format import QWeight, dequantize


def linear(x_BI: torch.Tensor, w: QWeight) -> torch.Tensor:
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


register_quantized("reference", QuantizedKernels(linear, experts))
