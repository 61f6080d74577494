"""Routed experts as stacked 3-D weights (one tensor per projection, no ModuleList), computed by a named backend.

Legend: N tokens, E experts, D model dim, F expert hidden dim, R rows sorted by expert.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe import kernels
from smoe.moe.dispatch import Routed


class Experts(nn.Module):
    """What MoELayer computes its routed experts with: ``run(x_ND, routed, backend) -> y_ND``, the unsorted tokens
    in, each token's weighted sum of its experts' outputs out. Here ``run`` is the seam: sort, gather,
    ``forward(x_RD, counts_E, backend)`` on rows sorted by expert, combine. A module that replaces the experts
    (expert parallelism) implements ``forward`` and keeps this ``run``; the stock modules hand the unsorted tokens
    to their backend's ``tokens`` kernel instead where the routing allows it (``Routed.hands_over``)."""

    # Whether torch.compile can capture a call as part of one graph (experts that read files between ops cannot).
    traceable = True

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor, backend: str | kernels.BackendRequest = "auto"
                ) -> torch.Tensor:
        raise NotImplementedError

    def run(self, x_ND: torch.Tensor, routed: Routed, backend: str | kernels.BackendRequest = "auto"
            ) -> torch.Tensor:
        return routed.combine(self(routed.gather(x_ND), routed.dispatch().counts_E, backend))

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

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor, backend: str | kernels.BackendRequest = "auto"
                ) -> torch.Tensor:
        """The seam: rows sorted by expert, ``counts_E`` rows each, y_RD in the same order. An expert-parallel
        module that replaces this one keeps this signature."""
        x_RD = _autocast_input(x_RD)
        fn = kernels.get(backend, x_RD.device, x_RD.dtype, x_RD.shape[0], counts_E.numel())
        return fn(x_RD, counts_E, self.w_gate_up, self.w_down, self.activation)

    def run(self, x_ND: torch.Tensor, routed: Routed, backend: str | kernels.BackendRequest = "auto"
            ) -> torch.Tensor:
        x = _autocast_input(x_ND)
        entry = kernels.select(backend, x.device, x.dtype).floating
        if routed.hands_over(entry):  # gather and combine inside the kernels
            return entry.tokens(x, routed.assignments(entry), self.w_gate_up, self.w_down, self.activation)
        return super().run(x_ND, routed, backend)


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    # Backends are custom ops autocast does not know; apply its policy (matmuls in the low dtype) here.
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x
