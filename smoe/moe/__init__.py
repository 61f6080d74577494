"""Sparse MoE: routers, dispatch, stacked experts, balance terms and the layer that composes them."""

from smoe.moe.balance import (
    device_balance_loss,
    load_balance_loss,
    router_entropy,
    router_z_loss,
    sequence_balance_loss,
    update_expert_bias,
)
from smoe.moe.layer import MoELayer, RouterStats, RouterStatsMode
from smoe.moe.router import Router, Routing

__all__ = [
    "MoELayer",
    "Router",
    "RouterStats",
    "RouterStatsMode",
    "Routing",
    "device_balance_loss",
    "load_balance_loss",
    "router_entropy",
    "router_z_loss",
    "sequence_balance_loss",
    "update_expert_bias",
]
