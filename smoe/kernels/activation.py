"""The gated activation's pieces for backends with a hand-written backward (shared by expert_loop and triton).

Legend: c rows, F expert hidden dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def act(gate_cF: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(gate_cF) if activation == "silu" else F.gelu(gate_cF, approximate="tanh")


def gated_act_backward(da_cF: torch.Tensor, h_c2F: torch.Tensor, activation: str, out_c2F: torch.Tensor) -> None:
    """d[gate, up] of ``act(gate) * up`` given its gradient ``da``, written into ``out`` (no chunk/cat round
    trip); ``h`` holds the pre-activations, gate columns first. Computed in ``da``'s dtype."""
    F_ = da_cF.shape[-1]
    gate_cF, up_cF = h_c2F.to(da_cF.dtype).chunk(2, dim=-1)
    if activation == "silu":
        torch.ops.aten.silu_backward.grad_input(da_cF * up_cF, gate_cF, grad_input=out_c2F[:, :F_])
    else:
        torch.ops.aten.gelu_backward.grad_input(da_cF * up_cF, gate_cF, approximate="tanh",
                                                grad_input=out_c2F[:, :F_])
    torch.mul(da_cF, act(gate_cF, activation), out=out_c2F[:, F_:])
