"""Routed experts as stacked 3-D weights (one tensor per projection, no ModuleList), computed by a named backend.

Legend: E experts, D model dim, F expert hidden dim, R rows sorted by expert.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe import kernels


class Experts(nn.Module):
    """What MoELayer computes its routed experts with. ``forward(x_RD, counts_E, backend)`` is the seam (rows
    sorted by expert). A module whose kernel can also start from the unsorted tokens returns it from ``direct``:
    ``(x_ND, expert_ids_A, weights_A) -> y_ND`` with the dispatch and combine inside, which the layer calls when
    nothing else needs the dispatch (inference: no capacity, no statistics)."""

    def direct(self, backend: str, x: torch.Tensor):
        return None

    def rows_independent(self, device: torch.device) -> bool:
        """Whether the usual backend computes each row bitwise alike whatever other rows share the call (then a
        decode step needs no fixed-shape ``tiled`` experts for that promise, and can be compiled keeping it)."""
        return False


class RoutedExperts(Experts):
    def __init__(self, n_experts: int, dim: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        self.activation = activation
        # (out, in) per expert, as nn.Linear and Hugging Face store them: gate rows [0, F), up rows [F, 2F).
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """The seam: rows sorted by expert, ``counts_E`` rows each, y_RD in the same order. An expert-parallel
        module that replaces this one keeps this signature."""
        x_RD = _autocast_input(x_RD)
        fn = kernels.get(backend, x_RD.device, x_RD.dtype, x_RD.shape[0], counts_E.numel())
        return fn(x_RD, counts_E, self.w_gate_up, self.w_down, self.activation)

    def fused_for(self, backend: str, x: torch.Tensor):
        """The backend's fused variant (see smoe.kernels) for input ``x``, or None if it has none."""
        return kernels.get_fused(backend, x.device, _autocast_input(x).dtype)

    def forward_tokens(self, fused, x_ND, weights_A, order_R, counts_E) -> torch.Tensor:
        """The fused path: unsorted tokens in, the weighted combine out (y_ND); gather and scatter happen inside
        the kernels. ``order_R``: kept token-major assignments sorted by expert."""
        x_ND = _autocast_input(x_ND)
        return fused(x_ND, weights_A, order_R, counts_E, self.w_gate_up, self.w_down, self.activation)


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    # Backends are custom ops autocast does not know; apply its policy (matmuls in the low dtype) here.
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x
