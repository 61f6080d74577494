"""Triton expert backend: the only place smoe imports triton.

The ``triton`` backend's float kernels: rows already sorted by expert, and from the unsorted tokens (gather in the
GEMM loads, weighted scatter-combine in the store), plus the top-k selection kernel the router uses on CUDA. Runs on
CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check it).

Legend: N tokens, D model dim, E experts, F expert hidden dim, A assignments, R rows sorted by expert.
"""

from __future__ import annotations

import os

import torch

from smoe.kernels.registry import Assignments, Kernels
from smoe.kernels.triton.ops import FusedExperts, select_experts


def runs_on(device: torch.device) -> str | None:
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "runs on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1)"


def experts(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation):
    R = x_RD.shape[0]
    rows_R = torch.arange(R, device=x_RD.device)
    ones_R = torch.ones(R, device=x_RD.device, dtype=torch.float32)
    w_gu, w_down = w_gate_up_E2FD.to(x_RD.dtype), w_down_EDF.to(x_RD.dtype)
    return FusedExperts.apply(x_RD, ones_R, w_gu, w_down, rows_R, counts_E, 1, activation)


def tokens(x_ND, assignments: Assignments, w_gate_up_E2FD, w_down_EDF, activation):
    top_k = assignments.weights_A.numel() // max(x_ND.shape[0], 1)
    w_gu, w_down = w_gate_up_E2FD.to(x_ND.dtype), w_down_EDF.to(x_ND.dtype)
    return FusedExperts.apply(x_ND, assignments.weights_A, w_gu, w_down, assignments.order_R, assignments.counts_E,
                              top_k, activation)


KERNELS = Kernels(experts, tokens)

__all__ = ["KERNELS", "experts", "runs_on", "select_experts", "tokens"]
