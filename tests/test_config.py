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
    assert ModelConfig.from_json(config.to_json()) == config
    model = build_model(config)
    seq_len = min(seq_len, config.max_seq_len)
    ids = torch.randint(0, config.vocab_size, (2, seq_len))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, seq_len, config.vocab_size)
    out.loss.backward()
    assert torch.isfinite(out.loss)
