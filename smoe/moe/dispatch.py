"""Sort-based dispatch: group token-expert assignments by expert, drop those over capacity, and combine back.

Legend: T tokens, D model dim, E experts, A assignments, R kept assignments (rows the experts compute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from smoe.moe.router import Routing


@dataclass(frozen=True)
class Dispatch:
    order_R: torch.Tensor  # assignment index of each expert row, rows sorted by expert
    counts_E: torch.Tensor  # int64 rows per expert, after capacity: what the experts compute
    load_E: torch.Tensor  # int64 assignments routed to each expert, before capacity: the expert's demand
    n_dropped: torch.Tensor  # assignments dropped over capacity (0-dim int64)


def token_choice_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """GShard/Switch expert capacity: capacity_factor x the balanced share T*K/E, rounded up."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def permute(expert_ids_A: torch.Tensor, n_experts: int, capacity: int | None) -> Dispatch:
    """Stable sort by expert, so within an expert earlier tokens come first and the last ones are dropped."""
    order_A = torch.argsort(expert_ids_A, stable=True)
    counts_E = torch.bincount(expert_ids_A, minlength=n_experts)
    if capacity is None:
        return Dispatch(order_A, counts_E, counts_E, counts_E.new_zeros(()))
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_experts_A = expert_ids_A[order_A]
    rank_A = torch.arange(order_A.numel(), device=order_A.device) - starts_E[sorted_experts_A]
    kept = rank_A < capacity
    kept_counts_E = counts_E.clamp(max=capacity)
    return Dispatch(order_A[kept], kept_counts_E, counts_E, counts_E.sum() - kept_counts_E.sum())


def combine(y_RD: torch.Tensor, routing: Routing, dispatch: Dispatch, n_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs; dropped assignments contribute nothing."""
    A, D = routing.expert_ids_A.numel(), y_RD.shape[-1]
    weights_R = routing.weights_A[dispatch.order_R].to(y_RD.dtype)
    weighted_RD = y_RD * weights_R[:, None]
    if routing.token_major:
        # Un-permute into token-major order and sum each token's K rows: a gather-free reshape, no atomics.
        out_AD = weighted_RD.new_zeros(A, D).index_copy(0, dispatch.order_R, weighted_RD)
        return out_AD.view(n_tokens, A // n_tokens, D).sum(1)
    token_ids_R = routing.token_ids_A[dispatch.order_R]
    return weighted_RD.new_zeros(n_tokens, D).index_add(0, token_ids_R, weighted_RD)
