import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smoe.config import AttentionConfig, LayoutConfig, MLAConfig, ModelConfig, MoEConfig, RopeScaling, override
from smoe.models import build_model


def _mla_model() -> ModelConfig:
    return ModelConfig(
        attention=MLAConfig(q_lora_rank=32, rope_scaling=RopeScaling(factor=4.0, mscale_all_dim=1.0)),
        moe=MoEConfig(score_func="sigmoid", balance="aux_free", n_group=4, topk_group=2, n_shared_experts=1),
        layout=LayoutConfig(first_k_dense=1, n_mtp_modules=1, moe_layers=None),
    )


@pytest.mark.parametrize("config", [ModelConfig(), _mla_model(), ModelConfig(moe=None)], ids=["gqa", "mla", "dense"])
def test_json_round_trip(config):
    assert ModelConfig.from_json(config.to_json()) == config


def test_config_names_import_from_the_package_and_their_former_modules():
    import smoe.config as package
    import smoe.config_attention as former_attention
    import smoe.config_rules as former_rules
    from smoe.config import attention, model, rules

    assert package.ModelConfig is model.ModelConfig and package.MLAConfig is attention.MLAConfig
    assert former_attention.MLAConfig is attention.MLAConfig and former_rules.check_types is rules.check_types
    assert set(package.__all__) >= {"ModelConfig", "MoEConfig", "AttentionConfig", "MLAConfig", "LayoutConfig",
                                     "LinearAttentionConfig", "QuantConfig", "override", "hybrid_layer_types"}


def test_explicit_moe_layers_round_trip_as_tuple():
    config = ModelConfig(layout=LayoutConfig(moe_layers=(1, 3)))
    again = ModelConfig.from_json(config.to_json())
    assert again == config and again.moe_layer_ids == [1, 3]


def test_config_written_before_capacity_priority_loads_with_gshard_priority():
    old = ModelConfig(moe=MoEConfig(capacity_factor=1.0)).to_dict()
    del old["moe"]["capacity_priority"]
    assert ModelConfig.from_dict(old).moe.capacity_priority == "choice"
    token = ModelConfig(moe=MoEConfig(capacity_factor=1.0, capacity_priority="token"))
    assert ModelConfig.from_json(token.to_json()) == token


def test_from_dict_names_unknown_field():
    with pytest.raises(ValueError, match=r"moe\.topk: unknown field"):
        ModelConfig.from_dict({"moe": {"topk": 2}})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"moe.top_k": 9}, r"moe\.top_k: must not exceed n_routed_experts \(8\)"),
        ({"moe.n_group": 3}, r"moe\.n_group: must divide n_routed_experts"),
        ({"moe.n_group": 4, "moe.topk_group": 5}, r"moe\.topk_group: must not exceed n_group"),
        ({"attention.n_heads": 7, "attention.n_kv_heads": 7}, r"attention\.n_heads: must divide dim"),
        ({"attention.n_kv_heads": 3}, r"attention\.n_kv_heads: must divide n_heads"),
        ({"moe.score_func": "relu"}, r"moe\.score_func: must be"),
        ({"dim": "big"}, r"dim: must be of type int"),
        ({"moe.capacity_factor": 0.0}, r"moe\.capacity_factor: must be a positive number"),
        ({"moe.capacity_priority": "expert"}, r"moe\.capacity_priority: must be of type 'choice' \| 'token'"),
        ({"layout.moe_layers": [0, 9]}, r"layout\.moe_layers: indices must lie in"),
        ({"moe.routing": "expert_choice"}, r"moe\.balance: must be 'none' with expert_choice"),
    ],
)
def test_validate_names_field_and_rule(changes, message):
    with pytest.raises(ValueError, match=message):
        override(ModelConfig(), changes)


def test_override_rejects_unknown_path():
    with pytest.raises(ValueError, match=r"moe\.expert_size: unknown field 'expert_size' of MoEConfig"):
        override(ModelConfig(), {"moe.expert_size": 4})


def test_override_into_missing_moe_is_an_error():
    with pytest.raises(ValueError, match="moe is not set"):
        override(ModelConfig(moe=None), {"moe.top_k": 1})


def test_override_returns_new_frozen_config():
    base = ModelConfig()
    changed = override(base, {"moe.top_k": 4, "n_layers": 2})
    assert (changed.moe.top_k, changed.n_layers) == (4, 2) and base.moe.top_k == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.dim = 1


def test_layout_selects_moe_layers():
    config = ModelConfig(n_layers=6, layout=LayoutConfig(first_k_dense=1, moe_layer_freq=2))
    assert config.moe_layer_ids == [2, 4]


@pytest.mark.parametrize("layout", [LayoutConfig(), LayoutConfig(first_k_dense=3), LayoutConfig(moe_layer_freq=3),
                                    LayoutConfig(first_k_dense=2, moe_layer_freq=4), LayoutConfig(first_k_dense=7),
                                    LayoutConfig(moe_layers=(0, 4))])
def test_moe_layer_count_is_closed_form_and_agrees_with_the_list(layout):
    for n_layers in range(max(layout.first_k_dense, 5), 12):
        config = ModelConfig(n_layers=n_layers, layout=layout)
        assert config.n_moe_layers == len(config.moe_layer_ids), n_layers
    huge = ModelConfig(n_layers=10**12, layout=LayoutConfig(first_k_dense=2, moe_layer_freq=4))
    assert huge.n_moe_layers == 25 * 10**10 - 1  # layers 4, 8, ..., 10**12 - 4: counted, not listed
    assert ModelConfig(n_layers=8, moe=None).n_moe_layers == 0


# --- fuzzing: any config validates and runs, or raises ValueError ----------------------------------------------------

_small = st.integers(min_value=-1, max_value=9)
_odd_values = st.sampled_from([0, -1, 1.5, "x", None, True, float("nan")])


def _maybe(strategy):
    return st.one_of(strategy, _odd_values)


_rope = st.one_of(
    st.none(),
    st.builds(RopeScaling, type=st.sampled_from(["yarn", "linear", "default", "ntk"]),
              factor=_maybe(st.floats(0.5, 8)), original_max_seq_len=_maybe(st.integers(1, 64)),
              mscale_all_dim=_maybe(st.floats(0, 1))),
)
_gqa = st.builds(
    AttentionConfig, n_heads=_maybe(st.integers(1, 4)), n_kv_heads=_maybe(st.integers(1, 4)),
    head_dim=st.one_of(st.none(), st.sampled_from([4, 6, 8, 7])), rotary_dim=st.one_of(st.none(), _small),
    rope_scaling=_rope, sliding_window=st.one_of(st.none(), _small), qkv_bias=st.booleans(),
    qk_norm=st.sampled_from(["none", "head", "full", "both"]), clip_qkv=st.one_of(st.none(), st.floats(-1, 8)),
)
_mla = st.builds(
    MLAConfig, n_heads=_maybe(st.integers(1, 4)), q_lora_rank=st.one_of(st.none(), _small),
    kv_lora_rank=_maybe(st.integers(1, 16)), qk_nope_head_dim=_maybe(st.integers(1, 8)),
    qk_rope_head_dim=_maybe(st.integers(1, 8)), v_head_dim=_maybe(st.integers(1, 8)), rope_scaling=_rope,
    rope_interleave=st.booleans(),
)
_moe = st.one_of(st.none(), st.builds(
    MoEConfig, n_routed_experts=_maybe(st.integers(1, 8)), top_k=_maybe(st.integers(1, 4)),
    expert_dim=_maybe(st.integers(1, 16)), n_shared_experts=_maybe(st.integers(0, 2)),
    shared_expert_dim=st.one_of(st.none(), _small), shared_expert_gate=st.booleans(),
    score_func=st.sampled_from(["softmax", "sigmoid", "tanh"]), norm_topk_prob=st.booleans(),
    routed_scaling_factor=_maybe(st.floats(0.1, 3)), n_group=_maybe(st.integers(1, 4)),
    topk_group=_maybe(st.integers(1, 4)), group_score=st.sampled_from(["max", "top2_sum"]),
    capacity_factor=st.one_of(st.none(), st.floats(0.1, 2)), capacity_priority=st.sampled_from(["choice", "token"]),
    balance=st.sampled_from(["aux", "seq_aux", "aux_free", "none", "bogus"]),
    z_loss_coef=_maybe(st.floats(0, 0.01)), routing=st.sampled_from(["token_choice", "expert_choice"]),
    router_bias=st.booleans(),
))
_layout = st.builds(
    LayoutConfig, first_k_dense=_maybe(st.integers(0, 3)), moe_layer_freq=_maybe(st.integers(1, 2)),
    moe_layers=st.one_of(st.none(), st.lists(_small, max_size=3).map(tuple)), dense_residual=st.booleans(),
    n_mtp_modules=_maybe(st.integers(0, 2)),
)
_model = st.builds(
    ModelConfig, vocab_size=_maybe(st.integers(1, 64)), dim=_maybe(st.sampled_from([8, 12, 16])),
    n_layers=_maybe(st.integers(1, 2)), ffn_dim=_maybe(st.integers(1, 16)),
    activation=st.sampled_from(["silu", "gelu", "relu"]), norm=st.sampled_from(["rmsnorm", "layernorm"]),
    tie_embeddings=st.booleans(), max_seq_len=_maybe(st.integers(4, 16)),
    attention=st.one_of(_gqa, _mla), moe=_moe, layout=_layout,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=_model, seq_len=st.integers(1, 6))
def test_fuzz_config_validates_and_runs_or_raises_value_error(config, seq_len):
    try:
        config.validate()
    except ValueError:
        return
    _trains_a_step(config, min(seq_len, config.max_seq_len))


# --- valid MoE and MLA configs, drawn on purpose: each must validate, build, and train a step ------------------------


@st.composite
def _valid_moe(draw) -> MoEConfig:
    routing = draw(st.sampled_from(["token_choice", "token_choice", "expert_choice", "hash"]))
    n_group = 1
    if routing == "token_choice":
        n_group = draw(st.sampled_from([1, 1, 2, 4]))
    n_experts = n_group * draw(st.integers(2, 4))
    per_group = n_experts // n_group
    topk_group = draw(st.integers(1, n_group))
    top_k = 1 if routing == "hash" else draw(st.integers(1, min(4, topk_group * per_group)))
    n_shared = draw(st.integers(0, 2))
    balance = "none" if routing != "token_choice" else draw(st.sampled_from(["aux", "seq_aux", "aux_free", "none"]))
    return MoEConfig(
        n_routed_experts=n_experts, top_k=top_k, expert_dim=draw(st.sampled_from([4, 8, 12])),
        n_shared_experts=n_shared, shared_expert_dim=draw(st.one_of(st.none(), st.integers(1, 8))),
        shared_expert_gate=n_shared > 0 and draw(st.booleans()),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        norm_topk_prob=draw(st.booleans()), routed_scaling_factor=draw(st.floats(0.5, 2.5)), n_group=n_group,
        topk_group=topk_group, group_score=draw(st.sampled_from(["max", "top2_sum"])) if per_group >= 2 else "max",
        capacity_factor=draw(st.one_of(st.none(), st.floats(0.5, 2))) if routing == "token_choice" else None,
        capacity_priority=draw(st.sampled_from(["choice", "token"])), balance=balance,
        z_loss_coef=draw(st.sampled_from([0.0, 1e-3])),
        device_balance_loss_coef=draw(st.sampled_from([0.0, 0.01])) if n_group > 1 else 0.0,
        routing=routing, router_bias=routing != "hash" and draw(st.booleans()),
    )


@st.composite
def _valid_attention(draw, kind: str) -> AttentionConfig | MLAConfig:
    rope = draw(st.one_of(st.none(), st.builds(RopeScaling, type=st.sampled_from(["yarn", "linear"]),
                                               factor=st.floats(1, 4), original_max_seq_len=st.integers(4, 16),
                                               mscale_all_dim=st.sampled_from([0.0, 1.0]))))
    if kind == "mla":
        return MLAConfig(n_heads=draw(st.integers(1, 4)), q_lora_rank=draw(st.one_of(st.none(), st.integers(2, 8))),
                         kv_lora_rank=draw(st.integers(2, 16)), qk_nope_head_dim=draw(st.integers(1, 8)),
                         qk_rope_head_dim=draw(st.sampled_from([2, 4, 8])), v_head_dim=draw(st.integers(1, 8)),
                         rope_scaling=rope, rope_interleave=draw(st.booleans()))
    n_kv = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    return AttentionConfig(n_heads=n_kv * draw(st.integers(1, 2)), n_kv_heads=n_kv, head_dim=head_dim,
                           rotary_dim=draw(st.sampled_from([None, 2, head_dim])), rope_scaling=rope,
                           sliding_window=draw(st.one_of(st.none(), st.integers(1, 6))), qkv_bias=draw(st.booleans()),
                           qk_norm=draw(st.sampled_from(["none", "head", "full"])),
                           clip_qkv=draw(st.one_of(st.none(), st.floats(1, 8))))


@st.composite
def _valid_model(draw, attention: str, moe: bool) -> ModelConfig:
    n_layers = draw(st.integers(1, 3))
    layout = LayoutConfig(first_k_dense=draw(st.integers(0, n_layers - 1)), moe_layer_freq=draw(st.integers(1, 2)),
                          dense_residual=moe and draw(st.booleans()), n_mtp_modules=draw(st.integers(0, 1)))
    return ModelConfig(vocab_size=draw(st.integers(8, 64)), dim=draw(st.sampled_from([8, 16])), n_layers=n_layers,
                       ffn_dim=draw(st.integers(4, 16)), activation=draw(st.sampled_from(["silu", "gelu"])),
                       norm=draw(st.sampled_from(["rmsnorm", "layernorm"])), tie_embeddings=draw(st.booleans()),
                       max_seq_len=16, attention=draw(_valid_attention(attention)),
                       moe=draw(_valid_moe()) if moe else None, layout=layout)


def _trains_a_step(config: ModelConfig, seq_len: int) -> None:
    assert ModelConfig.from_json(config.to_json()) == config
    model = build_model(config)
    ids = torch.randint(0, config.vocab_size, (2, seq_len))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, seq_len, config.vocab_size)
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(("attention", "moe"), [("gqa", True), ("mla", True), ("mla", False)],
                         ids=["gqa-moe", "mla-moe", "mla-dense"])
@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seq_len=st.integers(1, 6))
def test_fuzz_valid_moe_and_mla_configs_build_and_train(attention, moe, data, seq_len):
    config = data.draw(_valid_model(attention, moe))
    config.validate()  # drawn valid on purpose: a ValueError here is a wrong rule or a wrong strategy
    assert isinstance(config.attention, MLAConfig) == (attention == "mla")
    assert (config.moe is not None) == moe
    _trains_a_step(config, seq_len)
