import math

import pytest
import torch
import torch.nn.functional as F

from smoe.config import MoEConfig
from smoe.moe import (
    MoELayer,
    RouterStatsMode,
    load_balance_loss,
    router_z_loss,
    sequence_balance_loss,
    update_expert_bias,
)
from smoe.moe.dispatch import permute
from smoe.moe.router import expert_choice, expert_choice_capacity, token_choice

D = 16


def _logits(T=12, E=8, seed=0):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed))


# --- routers -----------------------------------------------------------------------------------------------------


def test_softmax_top_k_renormalised():
    logits = _logits()
    r = token_choice(logits, MoEConfig(top_k=2, norm_topk_prob=True), None)
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    torch.testing.assert_close(r.expert_ids_A.view(-1, 2), top.indices)
    torch.testing.assert_close(r.weights_A.view(-1, 2), top.values / top.values.sum(-1, keepdim=True))


def test_softmax_top_k_without_renormalisation_keeps_probabilities():
    logits = _logits()
    r = token_choice(logits, MoEConfig(top_k=3, norm_topk_prob=False), None)
    torch.testing.assert_close(r.weights_A.view(-1, 3), logits.softmax(-1).topk(3, dim=-1).values)


def test_sigmoid_bias_changes_selection_not_weights():
    logits = _logits()
    cfg = MoEConfig(top_k=2, score_func="sigmoid", balance="aux_free", routed_scaling_factor=2.5)
    bias = torch.zeros(8)
    bias[5] = 10.0  # forces expert 5 into every token's choice
    r = token_choice(logits, cfg, bias)
    ids = r.expert_ids_A.view(-1, 2)
    assert (ids == 5).any(-1).all()
    s = logits.sigmoid().gather(1, ids)
    torch.testing.assert_close(r.weights_A.view(-1, 2), s / s.sum(-1, keepdim=True) * 2.5)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_group_limited_routing_stays_in_best_groups(group_score):
    logits = _logits(T=32, E=16)
    cfg = MoEConfig(n_routed_experts=16, top_k=4, n_group=4, topk_group=2, group_score=group_score,
                    score_func="sigmoid")
    r = token_choice(logits, cfg, None)
    scores = logits.sigmoid().view(32, 4, 4)
    group = scores.amax(-1) if group_score == "max" else scores.topk(2, dim=-1).values.sum(-1)
    best = group.topk(2, dim=-1).indices
    chosen_groups = r.expert_ids_A.view(32, 4) // 4
    for t in range(32):
        assert set(chosen_groups[t].tolist()) <= set(best[t].tolist())
        eligible = torch.cat([torch.arange(g * 4, g * 4 + 4) for g in best[t].tolist()])
        want = eligible[logits[t, eligible].topk(4).indices]
        assert set(r.expert_ids_A.view(32, 4)[t].tolist()) == set(want.tolist())


def test_expert_choice_gives_every_expert_its_capacity():
    logits = _logits(T=12, E=4)
    cfg = MoEConfig(n_routed_experts=4, top_k=2, routing="expert_choice", balance="none")
    r = expert_choice(logits, cfg)
    C = expert_choice_capacity(12, cfg)
    assert C == 6
    assert torch.bincount(r.expert_ids_A, minlength=4).tolist() == [C] * 4
    for e in range(4):
        torch.testing.assert_close(r.weights_A[e * C:(e + 1) * C], logits.softmax(-1)[:, e].topk(C).values)


# --- dispatch ----------------------------------------------------------------------------------------------------


def test_permute_sorts_stably_and_drops_latest_over_capacity():
    expert_ids = torch.tensor([1, 0, 1, 1, 2, 1])
    d = permute(expert_ids, 3, capacity=2)
    assert d.order_R.tolist() == [1, 0, 2, 4]  # expert 1 keeps its first two assignments (0 and 2)
    assert d.counts_E.tolist() == [1, 2, 1]
    assert d.load_E.tolist() == [1, 4, 1]
    assert d.n_dropped.item() == 2


@pytest.mark.parametrize("priority, kept_by_expert_0", [("choice", 2), ("token", 1)])
def test_capacity_priority_decides_who_is_dropped(priority, kept_by_expert_0):
    # token 0 -> (e1, e0), token 1 -> (e0, e2), capacity 1: expert 0 is wanted by token 1's first choice
    # (assignment 2) and token 0's second (assignment 1). GShard keeps the first choice; token order the earlier token.
    d = permute(torch.tensor([1, 0, 0, 2]), 3, capacity=1, top_k=2, priority=priority)
    assert d.order_R.tolist() == [kept_by_expert_0, 0, 3]
    dropped = 3 - kept_by_expert_0  # the other claimant of expert 0
    assert d.row_A[dropped].item() == 3 and d.n_dropped.item() == 1 and d.counts_E.tolist() == [1, 1, 1]


@pytest.mark.parametrize("seed", range(5))
def test_choice_priority_drops_no_first_choice_where_a_second_choice_is_kept(seed):
    N, K, E = 24, 3, 4
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, E, generator=g)
    logits[:, 0] += 1.0  # an overloaded expert, so first choices compete with later ones for its slots
    expert_ids_A = logits.topk(K, dim=-1).indices.reshape(-1)
    choice_A = torch.arange(N * K) % K
    violated = []
    for priority in ("choice", "token"):
        d = permute(expert_ids_A, E, capacity=8, top_k=K, priority=priority)
        kept_A = d.row_A < d.order_R.numel()
        lost_first = torch.zeros(E, dtype=torch.bool).index_fill_(0, expert_ids_A[~kept_A & (choice_A == 0)], True)
        holds_later = torch.zeros(E, dtype=torch.bool).index_fill_(0, expert_ids_A[kept_A & (choice_A > 0)], True)
        violated.append((lost_first & holds_later).any().item())
    assert violated == [False, True]  # token priority does break it on these routings, so the check has teeth


def test_permute_dropless_keeps_everything():
    expert_ids = torch.tensor([2, 2, 0, 2])
    d = permute(expert_ids, 4, capacity=None)
    assert d.order_R.tolist() == [2, 0, 1, 3] and d.counts_E.tolist() == [1, 0, 3, 0] and d.n_dropped.item() == 0


# --- balance terms -----------------------------------------------------------------------------------------------


def test_load_balance_loss_is_one_when_uniform():
    probs = torch.full((8, 4), 0.25)
    ids = torch.arange(8).view(4, 2) % 4
    torch.testing.assert_close(load_balance_loss(probs, ids), torch.tensor(1.0))


def test_load_balance_loss_matches_switch_formula():
    probs = torch.softmax(_logits(T=10, E=4), -1)
    ids = probs.topk(1, -1).indices
    f = torch.bincount(ids.flatten(), minlength=4).float() / 10
    torch.testing.assert_close(load_balance_loss(probs, ids), 4 * (f * probs.mean(0)).sum())


def test_sequence_balance_loss_averages_per_sequence_losses():
    probs = torch.softmax(torch.randn(3, 5, 4), -1)
    ids = probs.topk(2, -1).indices
    per_seq = torch.stack([load_balance_loss(probs[b], ids[b]) for b in range(3)])
    torch.testing.assert_close(sequence_balance_loss(probs, ids), per_seq.mean())


def test_router_z_loss():
    logits = _logits()
    torch.testing.assert_close(router_z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())


def test_expert_bias_update_moves_against_load():
    bias = torch.zeros(4)
    new = update_expert_bias(bias, torch.tensor([10, 2, 4, 4]), rate=0.1)
    torch.testing.assert_close(new, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert bias.abs().sum() == 0  # pure: the input is untouched


# --- the layer against a token-by-token spec --------------------------------------------------------------------


def _naive_moe(layer: MoELayer, x_ND: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert, in token order. Capacity is granted per expert in priority order: every token's
    first choice, then every second choice, ... ("choice"), or token by token ("token")."""
    cfg = layer.config
    routing = layer.router(x_ND)
    w_gu, w_d = layer.experts.w_gate_up, layer.experts.w_down
    A = routing.expert_ids_A.numel()
    capacity = math.ceil(cfg.capacity_factor * x_ND.shape[0] * cfg.top_k / cfg.n_routed_experts) \
        if cfg.capacity_factor and cfg.routing == "token_choice" else None
    claims = range(A)
    if cfg.capacity_priority == "choice":
        claims = sorted(claims, key=lambda a: (a % cfg.top_k, a // cfg.top_k))  # (choice, token)
    used, kept = [0] * cfg.n_routed_experts, set()
    for a in claims:
        e = routing.expert_ids_A[a].item()
        used[e] += 1
        if capacity is None or used[e] <= capacity:
            kept.add(a)
    out = torch.zeros_like(x_ND)
    for a in sorted(kept):
        t, e = routing.token_ids_A[a].item(), routing.expert_ids_A[a].item()
        gate, up = (w_gu[e] @ x_ND[t]).chunk(2)
        out[t] += routing.weights_A[a] * (w_d[e] @ (F.silu(gate) * up))
    if layer.shared is not None:
        shared = layer.shared(x_ND)
        if layer.shared_gate is not None:
            shared = torch.sigmoid(layer.shared_gate(x_ND)) * shared
        out += shared
    return out


LAYER_CONFIGS = {
    "mixtral": MoEConfig(n_routed_experts=8, top_k=2, expert_dim=8),
    "qwen": MoEConfig(n_routed_experts=8, top_k=4, expert_dim=8, norm_topk_prob=False, n_shared_experts=1,
                      shared_expert_dim=16, shared_expert_gate=True),
    "deepseek_v3": MoEConfig(n_routed_experts=8, top_k=2, expert_dim=8, score_func="sigmoid", balance="aux_free",
                             n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=2),
    "capacity": MoEConfig(n_routed_experts=4, top_k=2, expert_dim=8, capacity_factor=0.75),
    "capacity_token": MoEConfig(n_routed_experts=4, top_k=2, expert_dim=8, capacity_factor=0.75,
                                capacity_priority="token"),
    "expert_choice": MoEConfig(n_routed_experts=4, top_k=2, expert_dim=8, routing="expert_choice", balance="none"),
}


@pytest.mark.parametrize("cfg", LAYER_CONFIGS.values(), ids=LAYER_CONFIGS.keys())
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_layer_matches_token_by_token_spec(cfg, backend):
    torch.manual_seed(0)
    layer = MoELayer(D, cfg, init_std=0.2, backend=backend)
    x = torch.randn(2, 10, D)
    y, stats = layer(x)
    torch.testing.assert_close(y, _naive_moe(layer, x.view(20, D)).view(2, 10, D), rtol=1e-5, atol=1e-5)
    if cfg.routing == "token_choice":  # every token's K choices, counted before capacity drops any
        assert stats.load.sum().item() == 20 * cfg.top_k
    else:  # expert choice: every expert takes exactly its capacity
        assert stats.load.tolist() == [expert_choice_capacity(20, cfg)] * cfg.n_routed_experts


def test_layer_accepts_2d_input_and_reports_drops():
    torch.manual_seed(0)
    layer = MoELayer(D, LAYER_CONFIGS["capacity"])
    y, stats = layer(torch.randn(16, D))
    assert y.shape == (16, D)
    capacity = math.ceil(0.75 * 16 * 2 / 4)
    assert stats.dropped.item() == (stats.load - capacity).clamp_min(0).sum().item() > 0


def test_layer_aux_loss_reaches_router_and_stats_are_fresh_values():
    torch.manual_seed(0)
    layer = MoELayer(D, MoEConfig(n_routed_experts=4, top_k=1, expert_dim=8, z_loss_coef=1e-3))
    x = torch.randn(2, 6, D)
    _, first = layer(x)
    first.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    _, second = layer(x)
    torch.testing.assert_close(first.load, second.load)  # nothing accumulates across calls
    expected = 0.01 * first.load_balance + 1e-3 * first.z_loss
    torch.testing.assert_close(first.aux_loss.detach(), expected)
    assert 0 < first.entropy.item() <= math.log(4) + 1e-6


def test_the_stats_mode_picks_what_the_layer_reports():
    torch.manual_seed(0)
    layer = MoELayer(D, MoEConfig(n_routed_experts=4, top_k=2, expert_dim=8))
    x = torch.randn(2, 6, D)
    y_all, every = layer(x, stats=RouterStatsMode.ALL)
    y_load, load = layer(x, stats=RouterStatsMode.LOAD)
    y_none, none = layer(x, stats=RouterStatsMode.NONE)
    assert every.aux_loss is not None and load.aux_loss is None and none is None
    torch.testing.assert_close(load.load, every.load)
    torch.testing.assert_close(y_load, y_all)
    torch.testing.assert_close(y_none, y_all)
    # the former spellings name the same modes
    assert [RouterStatsMode.of(v) for v in (True, False, "load", "none", RouterStatsMode.LOAD)] == [
        RouterStatsMode.ALL, RouterStatsMode.NONE, RouterStatsMode.LOAD, RouterStatsMode.NONE, RouterStatsMode.LOAD]
    with pytest.raises(ValueError, match="^router_stats: .*'load'.*got 'loads'"):
        layer(x, stats="loads")


def test_aux_free_layer_adds_complementary_sequence_loss_only_when_enabled():
    torch.manual_seed(0)
    x = torch.randn(2, 6, D)
    cfg = MoEConfig(n_routed_experts=4, top_k=2, expert_dim=8, score_func="sigmoid", balance="aux_free")
    _, with_seq = MoELayer(D, cfg)(x)
    torch.manual_seed(0)
    _, without = MoELayer(D, MoEConfig(**{**cfg.__dict__, "seq_aux_loss_coef": 0.0}))(x)
    assert with_seq.aux_loss.item() > 0 and without.aux_loss.item() == 0


def test_device_balance_loss_is_one_when_uniform_and_sees_only_device_totals():
    from smoe.moe import device_balance_loss

    probs = torch.full((8, 4), 0.25)
    torch.testing.assert_close(device_balance_loss(probs, torch.tensor([2, 2, 2, 2]), 2), torch.tensor(1.0))
    # Imbalance inside a device is not penalised; imbalance between devices is.
    skewed = torch.tensor([[0.5, 0.0, 0.25, 0.25]]).expand(8, 4)
    torch.testing.assert_close(device_balance_loss(skewed, torch.tensor([4, 0, 2, 2]), 2), torch.tensor(1.0))
    to_device_0 = torch.tensor([[0.4, 0.4, 0.1, 0.1]]).expand(8, 4)
    torch.testing.assert_close(device_balance_loss(to_device_0, torch.tensor([4, 4, 0, 0]), 2),
                               torch.tensor(2 * 0.8 + 0 * 0.2))


# --- GShard's random second expert -------------------------------------------------------------------------------


def test_random_second_expert_keeps_the_second_choice_with_probability_twice_its_share():
    from smoe.moe.layer import random_second_expert

    torch.manual_seed(0)
    shares = torch.tensor([0.5, 0.25, 0.0])  # 2 x share: always, half the time, never
    weights = torch.stack([1 - shares, shares], dim=1).repeat(4000, 1).reshape(-1)
    kept = random_second_expert(weights).view(-1, 3, 2)
    assert kept[..., 0].all()  # the first choice always
    assert kept[:, 0, 1].all() and not kept[:, 2, 1].any()
    assert kept[:, 1, 1].float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_random_second_expert_drops_only_in_training_and_is_gshards_top2_rule():
    cfg = MoEConfig(n_routed_experts=8, top_k=2, expert_dim=8, second_expert="random")
    layer = MoELayer(D, cfg, backend="reference")
    x = torch.randn(64, D)
    always = MoELayer(D, MoEConfig(n_routed_experts=8, top_k=2, expert_dim=8), backend="reference")
    always.load_state_dict(layer.state_dict())
    torch.manual_seed(1)
    y, stats = layer(x)
    assert stats.load.sum() < 64 * 2  # some second choices were not dispatched, and take no load
    layer.eval(), always.eval()
    torch.testing.assert_close(layer(x)[0], always(x)[0])  # evaluation dispatches both
    with pytest.raises(ValueError, match=r"moe\.second_expert: 'random' is GShard's top-2 token-choice rule"):
        MoEConfig(n_routed_experts=8, top_k=1, expert_dim=8, norm_topk_prob=False, second_expert="random").validate()
