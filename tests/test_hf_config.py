import json
import warnings

import pytest

from smoe.accounting import account
from smoe.interop.hf_config import FAMILIES, config_from_hf, load_hf_config

# The published configs' relevant keys (huggingface.co/<repo>/blob/main/config.json).
MIXTRAL_8X7B = {
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "rope_theta": 1e6, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "sliding_window": None,
}
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "num_nextn_predict_layers": 1, "max_position_embeddings": 163840,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}
DEEPSEEK_V2 = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288,
    "moe_intermediate_size": 1536, "num_hidden_layers": 60, "num_attention_heads": 128, "n_shared_experts": 2,
    "n_routed_experts": 160, "routed_scaling_factor": 16.0, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "group_limited_greedy",
    "n_group": 8, "topk_group": 3, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "aux_loss_alpha": 0.003, "seq_aux": True,
}
QWEN15_MOE = {
    "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
    "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "decoder_sparse_step": 1, "norm_topk_prob": False, "tie_word_embeddings": False,
}


@pytest.mark.parametrize("hf, total, active", [
    (MIXTRAL_8X7B, 46_702_792_704, 12_879_925_248),
    (DEEPSEEK_V3, 671_026_419_200, 37.55e9),
    (DEEPSEEK_V2, 235_741_434_880, 21.38e9),
    (QWEN15_MOE, 14_315_784_192, 2_689_173_504),
], ids=["mixtral-8x7b", "deepseek-v3", "deepseek-v2", "qwen1.5-moe"])
def test_published_configs_reproduce_published_counts(hf, total, active):
    acc = account(config_from_hf(hf))
    assert abs(acc.total_params / total - 1) < 0.005
    assert abs(acc.active_params / active - 1) < 0.005


def test_deepseek_v3_mapping_keeps_routing_and_mtp():
    config = config_from_hf(DEEPSEEK_V3)
    moe = config.moe
    assert (moe.score_func, moe.balance, moe.group_score, moe.n_group, moe.topk_group) == (
        "sigmoid", "aux_free", "top2_sum", 8, 4)
    assert config.layout.n_mtp_modules == 1 and config.layout.first_k_dense == 3
    assert config.attention.rope_scaling.factor == 40 and config.attention.rope_scaling.mscale_all_dim == 1.0


def test_qwen_sparse_step_becomes_explicit_moe_layers():
    config = config_from_hf({**QWEN15_MOE, "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert config.moe_layer_ids == [1, 5]


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ValueError, match=r"config\.json: unsupported model_type 'llama'; supported: mixtral, "):
        config_from_hf({"model_type": "llama"})


def test_missing_required_key_names_file_and_key():
    hf = dict(MIXTRAL_8X7B)
    del hf["hidden_size"]
    with pytest.raises(ValueError, match=r"my/config\.json: missing required key 'hidden_size'"):
        config_from_hf(hf, "my/config.json")


def test_malformed_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match=str(bad)):
        load_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_hf_config(tmp_path / "nope")


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


def test_every_family_has_a_cross_check():
    assert set(FAMILIES) - {"kimi_k2"} == set(TINY_HF)


# --- our config -> config.json --------------------------------------------------------------------------------------

ROUND_TRIP = {"mixtral-tiny": "mixtral", "qwen2-moe-tiny": "qwen2_moe", "qwen3-moe-tiny": "qwen3_moe",
              "deepseek-v2-tiny": "deepseek_v2", "deepseek-v3-tiny": "deepseek_v3", "olmoe-tiny": "olmoe",
              "minimax-tiny": "minimax_m2", "dbrx-tiny": "dbrx", "deepseek-v3": "deepseek_v3",
              "qwen3-30b-a3b": "qwen3_moe", "mixtral-8x7b": "mixtral"}


@pytest.mark.parametrize("preset, model_type", ROUND_TRIP.items())
def test_config_to_hf_round_trips(preset, model_type):
    from dataclasses import replace

    from smoe import presets
    from smoe.interop.hf_config import config_to_hf

    config = presets.get(preset)
    assert replace(config_from_hf(config_to_hf(config, model_type)), name=config.name) == config


def test_config_to_hf_names_what_the_family_cannot_express():
    from smoe import presets
    from smoe.interop.hf_config import config_to_hf

    with pytest.raises(ValueError, match=r"moe\.n_shared_experts: cannot be expressed as a Hugging Face mixtral"):
        config_to_hf(presets.get("deepseek-moe-tiny"), "mixtral")
    with pytest.raises(ValueError, match=r"attention: cannot be expressed as a Hugging Face deepseek_v3"):
        config_to_hf(presets.get("mixtral-tiny"), "deepseek_v3")
