import json
import re
import warnings
from dataclasses import replace

import pytest

from smoe import presets
from smoe.accounting import account
from smoe.interop.families import FAMILIES
from smoe.interop.hf_config import TRANSFORMERS_FAMILIES, config_from_hf, load_hf_config

# The published configs' keys that matter (https://huggingface.co/<repo>/blob/main/config.json); absent keys take
# the transformers default, as they would there.
MIXTRAL_8X7B = {  # mistralai/Mixtral-8x7B-v0.1
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "rope_theta": 1e6, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "router_aux_loss_coef": 0.02, "tie_word_embeddings": False, "sliding_window": None, "hidden_act": "silu",
}
MIXTRAL_8X22B = {  # mistralai/Mixtral-8x22B-v0.1
    **MIXTRAL_8X7B, "vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 56,
    "num_attention_heads": 48, "max_position_embeddings": 65536, "router_aux_loss_coef": 0.001,
}
DEEPSEEK_MOE_16B = {  # deepseek-ai/deepseek-moe-16b-base (remote code)
    "model_type": "deepseek", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
    "seq_aux": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "attention_bias": False, "tie_word_embeddings": False,
}
V2_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}
DEEPSEEK_V2 = {  # deepseek-ai/DeepSeek-V2
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288,
    "moe_intermediate_size": 1536, "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 2, "n_routed_experts": 160, "routed_scaling_factor": 16.0, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "num_experts_per_tok": 6,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "aux_loss_alpha": 0.003, "seq_aux": True, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "rope_scaling": V2_YARN, "attention_bias": False, "tie_word_embeddings": False,
}
DEEPSEEK_V2_LITE = {  # deepseek-ai/DeepSeek-V2-Lite: no query compression, no expert groups
    **DEEPSEEK_V2, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "aux_loss_alpha": 0.001,
}
DEEPSEEK_V3 = {  # deepseek-ai/DeepSeek-V3
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "tie_word_embeddings": False,
}
KIMI_K2 = {  # moonshotai/Kimi-K2-Instruct (remote code, V3's architecture)
    **DEEPSEEK_V3, "model_type": "kimi_k2", "vocab_size": 163840, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_routed_experts": 384, "routed_scaling_factor": 2.827, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "max_position_embeddings": 131072,
    "rope_theta": 50000.0,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}
QWEN15_MOE = {  # Qwen/Qwen1.5-MoE-A2.7B
    "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
    "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "decoder_sparse_step": 1, "norm_topk_prob": False, "router_aux_loss_coef": 0.001, "rope_theta": 1e6,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": 32768,
    "max_window_layers": 21, "tie_word_embeddings": False,
}
QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B
    "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "rope_theta": 1e6, "rope_scaling": None,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": None,
    "max_window_layers": 48, "attention_bias": False, "tie_word_embeddings": False,
}
OLMOE_1B_7B = {  # allenai/OLMoE-1B-7B-0924
    "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
    "num_experts_per_tok": 8, "norm_topk_prob": False, "router_aux_loss_coef": 0.01, "clip_qkv": None,
    "rope_theta": 10000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "attention_bias": False,
    "tie_word_embeddings": False,
}
DBRX = {  # databricks/dbrx-base
    "model_type": "dbrx", "vocab_size": 100352, "d_model": 6144, "n_heads": 48, "n_layers": 40, "max_seq_len": 32768,
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "rope_theta": 500000},
    "ffn_config": {"ffn_hidden_size": 10752, "moe_jitter_eps": 0.01, "moe_loss_weight": 0.05, "moe_num_experts": 16,
                   "moe_top_k": 4},
    "tie_word_embeddings": False,
}
MINIMAX_M2 = {  # MiniMaxAI/MiniMax-M2
    "model_type": "minimax_m2", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 1536,
    "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128, "rotary_dim": 64,
    "num_local_experts": 256, "num_experts_per_tok": 8, "rope_theta": 5000000, "max_position_embeddings": 196608,
    "rms_norm_eps": 1e-6, "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "use_routing_bias": True,
    "use_mtp": True, "num_mtp_modules": 3, "tie_word_embeddings": False,
}
LLAMA_2_7B = {  # meta-llama/Llama-2-7b-hf: 6,738,415,616 parameters (its model card's 6.74B)
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "attention_bias": False,
}
OFFICIAL = {
    "mixtral-8x7b": MIXTRAL_8X7B, "mixtral-8x22b": MIXTRAL_8X22B, "deepseek-moe-16b": DEEPSEEK_MOE_16B,
    "deepseek-v2": DEEPSEEK_V2, "deepseek-v2-lite": DEEPSEEK_V2_LITE, "deepseek-v3": DEEPSEEK_V3, "kimi-k2": KIMI_K2,
    "qwen1.5-moe-a2.7b": QWEN15_MOE, "qwen3-30b-a3b": QWEN3_30B_A3B, "olmoe-1b-7b": OLMOE_1B_7B, "dbrx": DBRX,
    "minimax-m2": MINIMAX_M2,
}


def _architecture(config):
    """The config without its name and balance coefficients, which some presets take from the paper instead."""
    moe = replace(config.moe, aux_loss_coef=0, seq_aux_loss_coef=0, z_loss_coef=0, bias_update_rate=0)
    return replace(config, name="", moe=moe)


@pytest.mark.parametrize("preset", OFFICIAL)
def test_preset_is_what_its_config_json_maps_to(preset):
    assert _architecture(config_from_hf(OFFICIAL[preset])) == _architecture(presets.get(preset))


@pytest.mark.parametrize("hf, total, active", [
    (MIXTRAL_8X7B, 46_702_792_704, 12_879_925_248),
    (DEEPSEEK_V3, 671_026_419_200, 37.55e9),
    (DEEPSEEK_V2, 235_741_434_880, 21.38e9),
    (QWEN15_MOE, 14_315_784_192, 2_689_173_504),
    (DEEPSEEK_MOE_16B, 16.376e9, 2.829e9),
], ids=["mixtral-8x7b", "deepseek-v3", "deepseek-v2", "qwen1.5-moe", "deepseek-moe-16b"])
def test_published_configs_reproduce_published_counts(hf, total, active):
    acc = account(config_from_hf(hf))
    assert abs(acc.total_params / total - 1) < 0.005
    assert abs(acc.active_params / active - 1) < 0.005


def test_dense_llama_2_7b_maps_to_its_exact_count():
    config = config_from_hf(LLAMA_2_7B)
    assert config.moe is None and config.attention.n_kv_heads == 32 and config.norm_eps == 1e-5
    assert account(config).total_params == 6_738_415_616


@pytest.mark.parametrize("hf, field, value", [
    ({**LLAMA_2_7B, "model_type": "mistral"}, "sliding_window", 4096),  # MistralConfig's default when absent
    ({**LLAMA_2_7B, "model_type": "mistral", "sliding_window": None}, "sliding_window", None),  # v0.2 on
    ({**LLAMA_2_7B, "model_type": "qwen2"}, "qkv_bias", True),
    ({**LLAMA_2_7B, "model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 0, "sliding_window": 64},
     "sliding_window", 64),
])
def test_dense_family_attention_defaults(hf, field, value):
    assert getattr(config_from_hf(hf).attention, field) == value


def test_dense_family_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match=r"config\.json: attention_bias=True is not supported"):
        config_from_hf({**LLAMA_2_7B, "attention_bias": True})
    with pytest.raises(ValueError, match=r"use_sliding_window=true with full attention on some layers"):
        config_from_hf({**LLAMA_2_7B, "model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 4})
    with pytest.raises(ValueError, match=r"rope scaling type 'llama3' is not supported"):
        config_from_hf({**LLAMA_2_7B, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_published_configs_reproduce_counts_without_embedding():
    v3, qwen = account(config_from_hf(DEEPSEEK_V3)), account(config_from_hf(QWEN15_MOE))
    assert abs(v3.active_params_excl_embedding / 36.63e9 - 1) < 0.005
    qwen_non_embedding = qwen.active_params - qwen.params_by_component["embedding"] - qwen.params_by_component["head"]
    assert abs(qwen_non_embedding / 2.07e9 - 1) < 0.005


def test_deepseek_v3_mapping_keeps_routing_and_mtp():
    config = config_from_hf(DEEPSEEK_V3)
    moe = config.moe
    assert (moe.score_func, moe.balance, moe.group_score, moe.n_group, moe.topk_group) == (
        "sigmoid", "aux_free", "top2_sum", 8, 4)
    assert config.layout.n_mtp_modules == 1 and config.layout.first_k_dense == 3
    assert config.attention.rope_scaling.factor == 40 and config.attention.rope_scaling.mscale_all_dim == 1.0


def test_deepseek_v2_group_limited_greedy_scores_groups_by_max():
    moe = config_from_hf(DEEPSEEK_V2).moe
    assert (moe.group_score, moe.n_group, moe.topk_group, moe.balance) == ("max", 8, 3, "seq_aux")
    assert config_from_hf(DEEPSEEK_V2_LITE).attention.q_lora_rank is None


@pytest.mark.parametrize("hf, renorm", [(MIXTRAL_8X7B, True), (QWEN15_MOE, True), (DEEPSEEK_V3, True),
                                        (DEEPSEEK_MOE_16B, False), (DEEPSEEK_V2, False), (KIMI_K2, False)])
def test_top1_renormalises_exactly_where_the_family_code_does(hf, renorm):
    # transformers' Mixtral/Qwen/DeepseekV3 renormalise a single weight to 1; DeepSeek's own code (DeepSeekMoE, V2,
    # Kimi K2) checks top_k > 1 first, and transformers' DeepseekV2 never renormalises.
    hf = {**hf, "num_experts_per_tok": 1, "norm_topk_prob": True, "n_group": 1, "topk_group": 1}
    assert config_from_hf(hf).moe.norm_topk_prob is renorm


def test_switch_loss_coefficient_is_converted_to_our_per_layer_loss():
    # transformers pools all 32 layers' statistics and counts f_i per token (top_k times ours)
    assert config_from_hf(MIXTRAL_8X7B).moe.aux_loss_coef == pytest.approx(0.02 * 2 / 32)
    assert config_from_hf(DEEPSEEK_V2).moe.seq_aux_loss_coef == 0.003  # DeepSeek's alpha is already per layer


def test_qwen_sparse_step_becomes_explicit_moe_layers():
    config = config_from_hf({**QWEN15_MOE, "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert config.moe_layer_ids == [1, 5]


@pytest.mark.parametrize("config, key", [
    ({**MIXTRAL_8X7B, "num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000 is outside [0, 1024]"),
    ({**QWEN15_MOE, "num_hidden_layers": 10**9, "decoder_sparse_step": 2}, "num_hidden_layers = 1000000000"),
    ({**MIXTRAL_8X7B, "num_local_experts": 10**9}, "num_local_experts = 1000000000 is outside [0, 65536]"),
    ({**MIXTRAL_8X7B, "vocab_size": 2**40}, "vocab_size = 1099511627776 is outside [0, 16777216]"),
    ({**MIXTRAL_8X7B, "intermediate_size": -1}, "intermediate_size = -1 is outside"),
    ({**DBRX, "ffn_config": {**DBRX["ffn_config"], "moe_num_experts": 10**6}}, "ffn_config.moe_num_experts = 1000000"),
    ({**DEEPSEEK_V3, "rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "original_max_position_embeddings": 2**30}},
     "rope_scaling.original_max_position_embeddings = 1073741824"),
    ({**MIXTRAL_8X7B, "num_hidden_layers": "1000000000"}, "num_hidden_layers must be an integer, got '1000000000'"),
    ({**MIXTRAL_8X7B, "num_attention_heads": True}, "num_attention_heads must be an integer, got True"),
])
def test_integers_are_bounded_before_anything_is_built(config, key):
    with pytest.raises(ValueError, match=r"config\.json: " + re.escape(key)):
        config_from_hf(config)


def test_inspect_of_a_config_claiming_a_billion_layers_fails_fast(tmp_path, capsys):
    from smoe.cli import main

    (tmp_path / "config.json").write_text(json.dumps({**DEEPSEEK_V3, "num_hidden_layers": 10**9}))
    assert main(["inspect", "--hf-config", str(tmp_path / "config.json")]) == 2
    assert "num_hidden_layers = 1000000000 is outside [0, 1024]" in capsys.readouterr().err


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError, match=r"config\.json: unsupported model_type 'llama4'; supported: mixtral, "):
        config_from_hf({"model_type": "llama4"})


def test_missing_required_key_names_file_and_key():
    hf = dict(MIXTRAL_8X7B)
    del hf["hidden_size"]
    with pytest.raises(ValueError, match=r"my/config\.json: missing required key 'hidden_size'"):
        config_from_hf(hf, "my/config.json")


def test_what_our_config_cannot_hold_is_refused_by_name():
    with pytest.raises(ValueError, match=r"config\.json: attention_bias=True is not supported"):
        config_from_hf({**QWEN3_30B_A3B, "attention_bias": True})
    with pytest.raises(ValueError, match=r"config\.json: use_sliding_window=true with full attention on some"):
        config_from_hf({**QWEN15_MOE, "use_sliding_window": True})


def test_malformed_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match=str(bad)):
        load_hf_config(tmp_path)
    with pytest.raises(ValueError, match=r"nope: no such file"):
        load_hf_config(tmp_path / "nope")
    bad.write_text(json.dumps({**MIXTRAL_8X7B, "num_hidden_layers": "many"}))
    with pytest.raises(ValueError, match=str(bad)):
        load_hf_config(bad)


def test_directory_and_file_paths_load_the_same(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    assert load_hf_config(tmp_path) == load_hf_config(tmp_path / "config.json")


# --- exactness on configs transformers itself builds --------------------------------------------------------------

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_key_value_heads=4,
           moe_intermediate_size=32, num_experts_per_tok=2, first_k_dense_replace=1)
TINY_HF = {
    "mixtral": dict(SMALL),
    "qwen2_moe": dict(SMALL, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6,
                      num_experts_per_tok=2, decoder_sparse_step=2),
    "qwen3_moe": dict(SMALL, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2, head_dim=24,
                      mlp_only_layers=[0]),
    "deepseek_v2": dict(SMALL, **MLA, n_routed_experts=8, n_shared_experts=2, q_lora_rank=None,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "deepseek_v3": dict(SMALL, **MLA, n_routed_experts=8, n_shared_experts=1, q_lora_rank=24, n_group=4,
                        topk_group=2),
    "olmoe": dict(SMALL, num_experts=8, num_experts_per_tok=2),
    "minimax_m2": dict(SMALL, num_local_experts=8, num_experts_per_tok=2, head_dim=16, rotary_dim=8),
    "llama": dict(SMALL),
    "mistral": dict(SMALL, sliding_window=16),
    "qwen2": dict(SMALL, tie_word_embeddings=True),
    # the hybrids: layers 0 and 2 linear attention
    "qwen3_next": dict(SMALL, num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=8, linear_value_head_dim=6, moe_intermediate_size=24,
                       shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                       full_attention_interval=2),
    "minimax": dict(SMALL, num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2, head_dim=8),
    "kimi_linear": dict(SMALL, **MLA, num_hidden_layers=4, num_experts=4, linear_num_heads=2, linear_head_dim=8,
                        layer_types=["linear_attention", "full_attention"] * 2, pad_token_id=None, bos_token_id=None,
                        eos_token_id=None),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, vocab_size=128,
                 attn_config=dict(kv_n_heads=2, clip_qkv=8, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2)),
}


@pytest.mark.parametrize("model_type", TINY_HF)
def test_accounting_is_exact_on_models_transformers_builds(model_type):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = transformers.AutoConfig.for_model(model_type, **TINY_HF[model_type])
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    n_hf = sum(p.numel() for p in model.parameters())
    n_hf += sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    assert account(config_from_hf(hf_config.to_dict())).total_params == n_hf


def test_every_transformers_family_has_a_cross_check():
    assert set(TRANSFORMERS_FAMILIES) == set(TINY_HF)


@pytest.mark.parametrize("model_type", TINY_HF)
def test_export_names_the_class_transformers_builds(model_type):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(model_type, **TINY_HF[model_type])
    assert transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)].__name__ == FAMILIES[model_type].architecture


# --- our config -> config.json --------------------------------------------------------------------------------------

ROUND_TRIP = {"mixtral-tiny": "mixtral", "qwen2-moe-tiny": "qwen2_moe", "qwen3-moe-tiny": "qwen3_moe",
              "deepseek-v2-tiny": "deepseek_v2", "deepseek-v3-tiny": "deepseek_v3", "olmoe-tiny": "olmoe",
              "minimax-tiny": "minimax_m2", "dbrx-tiny": "dbrx", "deepseek-v3": "deepseek_v3",
              "qwen3-30b-a3b": "qwen3_moe", "mixtral-8x7b": "mixtral", "dense": "llama"}


@pytest.mark.parametrize("preset, model_type", ROUND_TRIP.items())
def test_config_to_hf_round_trips(preset, model_type):
    from smoe.interop.hf_config import config_to_hf

    config = presets.get(preset)
    assert replace(config_from_hf(config_to_hf(config, model_type)), name=config.name) == config


def test_config_to_hf_names_what_the_family_cannot_express():
    from smoe.interop.hf_config import config_to_hf

    with pytest.raises(ValueError, match=r"moe\.n_shared_experts: cannot be expressed as a Hugging Face mixtral"):
        config_to_hf(presets.get("deepseek-moe-tiny"), "mixtral")
    with pytest.raises(ValueError, match=r"attention: cannot be expressed as a Hugging Face deepseek_v3"):
        config_to_hf(presets.get("mixtral-tiny"), "deepseek_v3")
    with pytest.raises(ValueError, match=r"moe: cannot be expressed as a Hugging Face llama config \(a dense family"):
        config_to_hf(presets.get("mixtral-tiny"), "llama")
    with pytest.raises(ValueError, match=r"moe: cannot be expressed as a Hugging Face mixtral config \(a dense model"):
        config_to_hf(presets.get("dense"), "mixtral")
    with pytest.raises(ValueError, match=r"attention\.qkv_bias: cannot be expressed as a Hugging Face llama"):
        config_to_hf(presets.get("dense", **{"attention.qkv_bias": True}), "llama")
    top1 = presets.get("deepseek-v2-tiny", **{"moe.top_k": 1, "moe.norm_topk_prob": True})
    with pytest.raises(ValueError, match=r"moe\.norm_topk_prob: cannot be expressed as a Hugging Face deepseek_v2"):
        config_to_hf(top1, "deepseek_v2")
