"""The layer's gather and combine (autograd functions reusing the forward permutation) match the plain-autograd
reference, forward and backward, with capacity drops, skewed routing and expert choice."""

import pytest
import torch

from smoe.config import MoEConfig
from smoe.moe.dispatch import combine, combine_reference, gather, gather_reference, permute, token_choice_capacity
from smoe.moe.router import expert_choice, token_choice

N, D, E = 10, 8, 4


def _routing(cfg: MoEConfig, skew: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g)
    if skew:
        logits[:, 2] += 10.0  # every token's first choice is expert 2
    return expert_choice(logits, cfg) if cfg.routing == "expert_choice" else token_choice(logits, cfg, None)


def _through(gather_fn, combine_fn, routing, dispatch, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    weights = routing.weights_A.detach().clone().requires_grad_()
    routing = type(routing)(**{**routing.__dict__, "weights_A": weights})
    x_RD = gather_fn(x, routing, dispatch)
    y_RD = torch.tanh(x_RD) * torch.arange(x_RD.shape[0], dtype=x.dtype)[:, None]  # rows must stay distinct
    y = combine_fn(y_RD, routing, dispatch, N)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, weights.grad


CASES = {
    "dropless": (MoEConfig(n_routed_experts=E, top_k=2), False),
    "skewed": (MoEConfig(n_routed_experts=E, top_k=2), True),
    "capacity_drops": (MoEConfig(n_routed_experts=E, top_k=2, capacity_factor=0.5), True),
    "capacity_drops_token": (MoEConfig(n_routed_experts=E, top_k=2, capacity_factor=0.5, capacity_priority="token"),
                             True),
    "expert_choice": (MoEConfig(n_routed_experts=E, top_k=2, routing="expert_choice", balance="none"), False),
}


@pytest.mark.parametrize("cfg,skew", CASES.values(), ids=CASES.keys())
def test_gather_and_combine_match_reference_forward_and_backward(cfg, skew):
    routing = _routing(cfg, skew)
    capacity = None
    if cfg.capacity_factor is not None and cfg.routing == "token_choice":
        capacity = token_choice_capacity(N, cfg.top_k, E, cfg.capacity_factor)
    dispatch = permute(routing.expert_ids_A, E, capacity, cfg.top_k, cfg.capacity_priority)
    if capacity is not None:
        assert dispatch.n_dropped.item() > 0
    want = _through(gather_reference, combine_reference, routing, dispatch)
    got = _through(gather, combine, routing, dispatch)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_row_of_each_assignment_inverts_the_order_and_marks_drops():
    d = permute(torch.tensor([1, 0, 1, 1, 2, 1]), 3, capacity=2)
    assert d.row_A.tolist() == [1, 0, 2, 4, 3, 4]  # assignments 3 and 5 dropped: row R = 4
