"""Routed experts as stacked 3-D weights (one tensor per projection, no ModuleList), computed by a named backend.

Legend: E experts, D model dim, F expert hidden dim, R rows sorted by expert.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe import kernels


class RoutedExperts(nn.Module):
    def __init__(self, n_experts: int, dim: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        # (out, in) per expert, as nn.Linear and Hugging Face store them: gate rows [0, F), up rows [F, 2F).
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        fn = kernels.get(backend, x_RD.device)
        device_type = x_RD.device.type
        if torch.is_autocast_enabled(device_type):
            # Backends are custom ops autocast does not know; apply its policy (matmuls in the low dtype) here.
            x_RD = x_RD.to(torch.get_autocast_dtype(device_type))
        return fn(x_RD, counts_E, self.w_gate_up, self.w_down, self.activation)
