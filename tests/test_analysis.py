"""The paper-following analyses of smoe.eval.analysis (on tiny random models) and smoe.eval.routing_stats (on
hand-built traces)."""

import pytest
import torch

from smoe import presets
from smoe.eval import analysis, routing_stats
from smoe.models import build_model

TINY = {"dim": 32, "n_layers": 2, "vocab_size": 300, "attention.n_heads": 2, "attention.n_kv_heads": 2,
        "max_seq_len": 64}


def _model(name: str, **changes):
    torch.manual_seed(0)
    return build_model(presets.get(name, **TINY, **changes)).eval()


def _batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g))
            for _ in range(n)]


# --- redundancy (DeepSeekMoE §4.5, Fig. 4) -----------------------------------------------------------------------


def test_disabled_counts_round_halves_up_and_leave_top_k():
    assert [analysis.n_disabled(r, 64, 6) for r in analysis.REDUNDANCY_RATIOS] == [0, 4, 8, 12, 16]
    assert [analysis.n_disabled(r, 8, 2) for r in analysis.REDUNDANCY_RATIOS] == [0, 1, 1, 2, 2]
    assert analysis.n_disabled(0.5, 8, 6) == 2


def test_redundancy_at_zero_is_the_base_loss():
    model, batches = _model("deepseekmoe"), _batches()
    curve = analysis.redundancy(model, batches)
    assert curve["ratios"] == list(analysis.REDUNDANCY_RATIOS) and curve["disabled_experts"] == [0, 4, 8, 12, 16]
    assert curve["loss"][0] == analysis.mean_loss(model, batches) and curve["skipped_layers"] == {}
    assert len(set(curve["loss"])) == len(curve["loss"])


@pytest.mark.parametrize("name", ["deepseekmoe", "deepseek-v3-style"])  # softmax; sigmoid + groups + bias
def test_disabled_experts_are_each_tokens_top_scored_and_never_selected(name):
    model = _model(name)
    router = model.moe_layers_by_index()[0].router
    if router.expert_bias is not None:  # a bias that differs from the scores' order, as after training
        router.expert_bias.copy_(torch.randn_like(router.expert_bias))
    seen = []
    router.register_forward_hook(lambda m, args, routing: seen.append((args[0], routing)))
    with analysis.disable_top_scored(model, 8):
        analysis.mean_loss(model, _batches(1))
    (x_TD, routing), = seen
    logits = router.logits(x_TD)
    scores = logits.softmax(-1) if router.config.score_func == "softmax" else logits.sigmoid()
    off = scores.topk(8, dim=-1).indices
    chosen = routing.expert_ids_A.view(len(x_TD), -1)
    assert not (chosen[:, :, None] == off[:, None, :]).any()
    # the kept experts are weighted by their own scores, as the router does without the mask
    expected = scores.gather(1, chosen)
    if router.config.norm_topk_prob:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(routing.weights_A.view_as(chosen), expected * router.config.routed_scaling_factor)
    assert "forward" not in router.__dict__  # restored on exit


def test_redundancy_skips_hash_layers_and_says_so():
    model = _model("switch", **{"moe.routing": "hash", "moe.balance": "none"})
    curve = analysis.redundancy(model, _batches(1))
    assert curve["loss"] == [] and curve["skipped_layers"] == {"0": "hash", "1": "hash"}


# --- knock-outs --------------------------------------------------------------------------------------------------


def test_shared_to_routed_routes_top_k_plus_n_without_shared_output():
    model = _model("deepseekmoe")  # 2 shared experts of the routed width, top-6
    layer = model.moe_layers_by_index()[0]
    assert analysis.n_replacing_shared(layer.config) == 2
    picks, shared_out = [], []
    layer.router.register_forward_hook(lambda m, args, routing: picks.append(routing.expert_ids_A.numel()))
    layer.shared.register_forward_hook(lambda m, args, y: shared_out.append(y.abs().max().item()))
    with analysis.shared_to_routed(model):
        analysis.mean_loss(model, _batches(1))
    assert picks == [32 * 8] and shared_out == [0.0]
    assert layer.config.top_k == 6 and "forward" not in layer.shared.__dict__


def test_analyze_records_the_knocked_out_fraction_and_the_traded_shared_experts():
    result = analysis.analyze(_model("deepseekmoe"), _batches(1), [0, 1], ["a", "b"], knockouts=(1, 4))
    assert result.knockout_fraction == {"top1_routed": 1 / 64, "top4_routed": 4 / 64}
    assert set(result.knockout) == {"top1_routed", "top4_routed", "shared", "shared_to_routed"}
    assert result.shared_to_routed_top_k == 8 and result.redundancy.disabled_experts[-1] == 16
    layer = result.layers[0]
    assert layer.coactivation is not None and layer.specialisation.vocabulary is not None
    assert result.dropless_loss is None  # no capacity limit
    # analysis.json's form round-trips, and smoe analyze prints a line per finding
    assert analysis.Analysis.from_json(result.to_json()) == result
    assert any(line.startswith("knock-out top4_routed: loss +") for line in result.lines())


def test_hash_layers_are_traced_and_score_exactly_their_vocabulary_baseline():
    model = _model("switch", **{"moe.routing": "hash", "moe.balance": "none"})
    batches = _batches(2)
    result = analysis.analyze(model, batches, [0, 1, 0, 1], ["a", "b"])
    for layer in result.layers.values():
        spec = layer.specialisation
        assert layer.routing == "hash" and spec.score == pytest.approx(spec.vocabulary)
    assert result.knockout == {} and result.redundancy.loss == []  # no scores to intervene on


def test_dropless_evaluation_lifts_the_capacity_only_inside_the_block():
    model = _model("gshard", **{"moe.capacity_factor": 0.5})
    batches = _batches(1)
    with_drops = analysis.mean_loss(model, batches)
    with analysis.dropless(model):
        free = analysis.mean_loss(model, batches)
        assert all(layer.config.capacity_factor is None for layer in model.moe_layers)
    assert free != with_drops and analysis.mean_loss(model, batches) == with_drops
    assert analysis.analyze(model, batches, [0, 1], ["a"]).dropless_loss == free


# --- chance baselines on hand-built traces -----------------------------------------------------------------------


def test_consecutive_chance_is_the_load_weighted_reuse():
    # two disjoint top-2 sets, each on half the tokens: a random pair overlaps half the time
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    sets = torch.tensor([[0, 1], [2, 3]]).repeat(500, 1)[order]
    rates = routing_stats.consecutive_rates(sets.view(10, 100, 2), n_experts=4)
    assert rates["first_load_weighted"] == pytest.approx(0.5)
    assert rates["any_load_aware"] == pytest.approx(0.5, abs=0.05)
    assert rates["any_vs_chance"] == pytest.approx(rates["any"] / rates["any_load_aware"])
    uniform = routing_stats.consecutive_rates(torch.arange(8).repeat(100).view(10, 80, 1), n_experts=8)
    assert uniform["first_load_weighted"] == pytest.approx(1 / 8) and uniform["first_vs_chance"] == 0.0


def test_saturation_chance_is_k_over_e_for_uniform_loads_and_one_for_a_single_expert():
    uniform = torch.arange(8).view(1, 4, 2)  # every expert once
    assert routing_stats.saturation_chance(uniform.flip(1), uniform, n_experts=8) == pytest.approx(2 / 8)
    single = torch.zeros(1, 5, 1, dtype=torch.long)
    assert routing_stats.saturation_chance(single, single, n_experts=4) == 1.0


def test_coactivation_finds_fixed_pairs_and_chance_does_not():
    pairs = torch.tensor([[0, 1], [2, 3]]).repeat(400, 1).view(20, 40, 2)  # expert 0 always with 1, 2 with 3
    co = routing_stats.coactivation(pairs, n_experts=4)
    assert co["max_partner"] == 1.0 and co["top_pair"][2] == 1.0
    # independent choices in proportion to the (uniform) loads: a partner is picked a third of the time
    assert co["chance"] == pytest.approx(1 / 3, abs=0.05)
    assert routing_stats.coactivation(pairs[..., :1], n_experts=4) is None  # top-1 has no partners


def test_the_vocabulary_baseline_explains_token_keyed_routing_and_not_source_keyed():
    ids = torch.tensor([[1, 2, 1, 2]] * 4 + [[3, 4, 3, 4]] * 4)  # sources 0 and 1 use different tokens
    sources = [0] * 4 + [1] * 4
    by_token = (ids % 2).unsqueeze(-1)  # the expert is a function of the token alone
    spec = routing_stats.specialisation(by_token, sources, 2, 2, token_ids_BT=ids)
    assert spec["score"] == pytest.approx(spec["vocabulary"])
    shared_ids = torch.tensor([[1, 2, 1, 2]] * 8)  # both sources use the same tokens, routed by source
    by_source = torch.tensor(sources).view(8, 1, 1).expand(8, 4, 1)
    spec = routing_stats.specialisation(by_source, sources, 2, 2, token_ids_BT=shared_ids)
    assert spec["score"] == pytest.approx(0.5) and spec["vocabulary"] == pytest.approx(0.0)


def test_specialisation_is_zero_for_identical_routing_and_above_shuffled_for_disjoint():
    alike = torch.tensor([0, 1, 2, 3]).repeat(8, 4).view(8, 8, 2)
    assert routing_stats.specialisation(alike, [0, 1] * 4, 2, 4)["score"] == pytest.approx(0.0)
    disjoint = torch.cat([torch.zeros(4, 8, 1, dtype=torch.long), torch.ones(4, 8, 1, dtype=torch.long)])
    spec = routing_stats.specialisation(disjoint, [0] * 4 + [1] * 4, 2, 2)
    assert spec["score"] == pytest.approx(0.5) and spec["score"] > spec["shuffled_mean"] + 2 * spec["shuffled_std"]


def test_a_group_limit_left_short_of_top_k_is_refused():
    # groups of two, one kept, scored by their best expert: a token whose top expert's partner wins its group
    # would keep a single expert for top-2
    model = _model("deepseek-v3-style", **{"moe.n_routed_experts": 8, "moe.top_k": 2, "moe.n_group": 4,
                                           "moe.topk_group": 1, "moe.group_score": "max"})
    refused = pytest.raises(ValueError, match="redundancy: with 1 of 8 experts disabled, the group limit")
    with refused, analysis.disable_top_scored(model, 1):
        analysis.mean_loss(model, _batches(1))


def test_analysis_batches_carry_the_runs_document_boundaries():
    from smoe.train.loop import document_arguments

    model = _model("deepseekmoe")
    inputs, targets = _batches(1)[0]
    inputs = inputs.clone()
    inputs[:, 5] = 7  # a token 7 ends a document in the middle of each row
    docs = document_arguments(inputs, 7, "all")
    with torch.no_grad():
        direct = model(inputs, labels=targets, **docs).lm_loss.item()
    assert analysis.mean_loss(model, [(inputs, targets, docs)]) == direct
    assert analysis.mean_loss(model, [(inputs, targets)]) != direct  # packed documents see each other
    assert analysis.trace_routing(model, [(inputs, targets, docs)])[1] == pytest.approx(direct)
