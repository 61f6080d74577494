"""Whole-model logit parity with transformers' own implementations, fp32, on tiny random models it builds.

The weight-name map below is test-local; it checks the model maths (attention, MLA, RoPE, routing with a non-zero
correction bias, shared experts, dense-first layouts, qk-norm) before any checkpoint converter exists.
"""

import warnings

import pytest
import torch

from smoe import presets
from smoe.interop.hf_config import config_to_hf
from smoe.models import build_model

transformers = pytest.importorskip("transformers")

ATTENTION = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "q_a_proj": "wq_a", "q_b_proj": "wq_b",
             "kv_a_proj_with_mqa": "wkv_a", "kv_b_proj": "wkv_b", "q_a_layernorm": "q_norm",
             "kv_a_layernorm": "kv_norm", "q_norm": "q_norm", "k_norm": "k_norm"}
MLP = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def _our_name(name: str) -> str | None:
    parts = name.split(".")
    if name == "model.embed_tokens.weight":
        return "embed.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "head.weight"
    i, rest = parts[2], parts[3:]
    if rest[0] == "input_layernorm":
        return f"layers.{i}.attn_norm.weight"
    if rest[0] == "post_attention_layernorm":
        return f"layers.{i}.ffn_norm.weight"
    if rest[0] == "self_attn":
        return f"layers.{i}.attn.{ATTENTION[rest[1]]}.{rest[2]}"
    mlp = rest[1:]
    if mlp[0] in MLP:
        return f"layers.{i}.ffn.{MLP[mlp[0]]}.weight"
    if mlp == ["gate", "weight"]:
        return f"layers.{i}.ffn.router.weight"
    if mlp == ["gate", "e_score_correction_bias"]:
        return f"layers.{i}.ffn.router.expert_bias"
    if mlp[0] == "experts":
        return f"layers.{i}.ffn.experts." + {"gate_up_proj": "w_gate_up", "down_proj": "w_down"}[mlp[1]]
    if mlp[0] in ("shared_experts", "shared_expert"):
        return f"layers.{i}.ffn.shared.{MLP[mlp[1]]}.weight"
    if mlp[0] == "shared_expert_gate":
        return f"layers.{i}.ffn.shared_gate.weight"
    return None


CASES = {
    "mixtral": ("mixtral-tiny", {}),
    "qwen2_moe": ("qwen2-moe-tiny", {}),
    "qwen3_moe": ("qwen3-moe-tiny", {}),
    "olmoe": ("olmoe-tiny", {}),
    "deepseek_v3": ("deepseek-v3-tiny", {"layout.n_mtp_modules": 0}),
    "deepseek_v2": ("deepseek-v2-tiny", {"attention.q_lora_rank": None}),
}


@pytest.mark.parametrize("model_type", CASES)
def test_logits_match_transformers(model_type):
    preset, changes = CASES[model_type]
    config = presets.get(preset, **{"n_layers": 2, **changes})
    hf_dict = config_to_hf(config, model_type)
    hf_dict.pop("model_type")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = transformers.AutoConfig.for_model(model_type, **hf_dict)
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    state = hf.state_dict()
    for name, tensor in state.items():
        if name.endswith("e_score_correction_bias"):
            tensor.normal_(0, 0.1)  # a non-zero correction bias changes which experts are selected
    ours = build_model(config).eval()
    ours.load_state_dict({_our_name(k): v for k, v in state.items() if _our_name(k)}, strict=True)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)
