"""Triton expert backend: the only place smoe imports triton.

Registers ``triton`` on the plain seam (rows already sorted by expert) and, for the stock ``RoutedExperts``, the
fused path (gather in the GEMM loads, weighted scatter-combine in the store), plus the top-k selection kernel the
router uses on CUDA. Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check it).

Legend: N tokens, D model dim, E experts, F expert hidden dim, A assignments, R rows sorted by expert.
"""

from __future__ import annotations

import os

import torch

from smoe.kernels.registry import register, register_fused
from smoe.kernels.triton.ops import FusedExperts, select_experts


def available(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@register("triton", available=available)
def triton_experts(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation):
    R = x_RD.shape[0]
    rows_R = torch.arange(R, device=x_RD.device)
    ones_R = torch.ones(R, device=x_RD.device, dtype=torch.float32)
    w_gu, w_down = w_gate_up_E2FD.to(x_RD.dtype), w_down_EDF.to(x_RD.dtype)
    return FusedExperts.apply(x_RD, ones_R, w_gu, w_down, rows_R, counts_E, 1, activation)


@register_fused("triton")
def triton_fused_experts(x_ND, weights_A, order_R, counts_E, w_gate_up_E2FD, w_down_EDF, activation):
    top_k = weights_A.numel() // max(x_ND.shape[0], 1)
    w_gu, w_down = w_gate_up_E2FD.to(x_ND.dtype), w_down_EDF.to(x_ND.dtype)
    return FusedExperts.apply(x_ND, weights_A, w_gu, w_down, order_R, counts_E, top_k, activation)


__all__ = ["available", "select_experts", "triton_experts", "triton_fused_experts"]
