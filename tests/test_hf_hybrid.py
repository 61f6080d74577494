"""Hugging Face interop of the hybrid linear-attention families (Qwen3-Next, MiniMax-01, Kimi Linear) through the
production converter: tiny random models that transformers itself builds, with both kinds of layer, MoE and dense
FFNs, partial rope and the gates, loaded with smoe.load_pretrained (fp32 logit parity, unpadded and left-padded),
exported back (transformers loads the export with the same logits), and generating greedily what transformers'
own generate does; and the config keys we cannot express, refused by name."""

import json
import warnings

import pytest
import torch

from smoe import load_pretrained, save_pretrained
from smoe.generation import generate, pad_left
from smoe.interop.hf import save_model_checkpoint
from smoe.interop.hf_config import config_from_hf, config_to_hf

transformers = pytest.importorskip("transformers")
from hf_helpers import hf_logits  # noqa: E402

LINEAR_FIRST = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4)
CASES = {
    # partial rope (a quarter of head_dim 16), gated attention, 2 key heads serving 4 value heads, a dense layer
    "qwen3_next": dict(SMALL, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=8, linear_value_head_dim=6, moe_intermediate_size=24,
                       shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                       layer_types=LINEAR_FIRST),
    # MiniMax's own pattern (full attention first: transformers' MiniMaxCache reports no cached tokens when layer 0 is
    # linear, so its decoding masks would let padding in), scaled residuals, every layer MoE
    "minimax": dict(SMALL, intermediate_size=24, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                    num_experts_per_tok=2, block_size=4, layer_types=LINEAR_FIRST[::-1], full_attn_alpha_factor=1.3,
                    full_attn_beta_factor=0.7, linear_attn_alpha_factor=1.1, linear_attn_beta_factor=0.9,
                    mlp_alpha_factor=1.2, mlp_beta_factor=0.8),
    # NoPE MLA, sigmoid routing with the correction bias and routed_scaling_factor, ungated shared expert, first dense
    "kimi_linear": dict(SMALL, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, num_key_value_heads=4,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, linear_num_heads=2,
                        linear_head_dim=8, layer_types=LINEAR_FIRST, mlp_layer_types=["dense"] + ["sparse"] * 3,
                        pad_token_id=None, bos_token_id=None, eos_token_id=None),
}
FAMILIES = pytest.mark.parametrize("family", list(CASES))
IDS = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(1))  # 21: partial chunks and blocks
ZERO_CENTRED = ("input_layernorm", "post_attention_layernorm", "model.norm", "q_norm", "k_norm")  # Qwen3-Next's


def _random(family: str, name: str, p: torch.Tensor) -> None:
    """Random weights: transformers' init leaves norms at one (or zero) and the correction bias at zero, which
    would hide a swapped or unshifted norm and a bias that selects nothing."""
    if "A_log" in name or "dt_bias" in name:
        return  # transformers' init is already random, and in range
    if p.dim() == 1 and "norm" in name:
        zero = family == "qwen3_next" and any(k in name for k in ZERO_CENTRED)
        p.copy_(torch.randn_like(p) * 0.3 + (0.0 if zero else 1.0))
    else:
        p.normal_(0, 0.1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny transformers model, saved once: family -> (model, directory)."""
    root, models = tmp_path_factory.mktemp("hybrid"), {}
    for family, kwargs in CASES.items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.AutoConfig.for_model(family, **kwargs)
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    _random(family, name, p)
                for name, b in model.named_buffers():
                    if name.endswith("e_score_correction_bias"):
                        b.normal_(0, 0.1)
            model.save_pretrained(root / family)
        models[family] = model, root / family
    return models


@FAMILIES
def test_import_matches_transformers_logits(family, saved):
    hf, path = saved[family]
    ours = load_pretrained(path)
    assert ours.config.layout.layer_types == tuple(CASES[family]["layer_types"])
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, hf(IDS).logits, rtol=1e-4, atol=1e-5)


@FAMILIES
def test_a_left_padded_batch_matches_transformers_on_its_real_tokens(family, saved):
    hf, path = saved[family]
    ids, mask = pad_left([IDS[0, :21].tolist(), IDS[1, :13].tolist()], pad_id=0)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # transformers counts positions from the mask only in generate
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = load_pretrained(path)(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


@FAMILIES
def test_export_loads_in_transformers_with_the_same_logits(family, saved, tmp_path):
    hf, path = saved[family]
    ours = load_pretrained(path)
    save_pretrained(ours, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == family
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "back", IDS), hf(IDS).logits, rtol=1e-5, atol=1e-6)
    back = load_pretrained(tmp_path / "back")  # and back again: the same weights (Qwen3-Next's norms to 1e-7)
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=1e-7, msg=name)


@pytest.mark.slow
@FAMILIES
def test_greedy_generation_matches_transformers_generate(family, saved):
    hf, path = saved[family]
    ours = load_pretrained(path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (9, 5)]
    ids, mask = pad_left(prompts, pad_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no EOS: both sides run the full length
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                               eos_token_id=None)[:, ids.shape[1]:]
    assert expected.shape == (2, 12)
    assert torch.equal(generate(ours, prompts, max_new_tokens=12, pad_id=0), expected)


@FAMILIES
def test_config_round_trips_through_config_json(family, saved):
    config = config_from_hf(saved[family][0].config.to_dict())
    assert config_from_hf(config_to_hf(config, family)) == config


def test_a_lightning_model_loads_back_from_a_smoe_checkpoint_with_its_decays(saved, tmp_path):
    # the decay slopes are computed, not stored: a model allocated empty must compute them again
    ours = load_pretrained(saved["minimax"][1])
    save_model_checkpoint(ours, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "ours")(IDS).logits, ours(IDS).logits, rtol=0, atol=0)


def test_kimi_delta_attentions_dt_bias_stays_fp32_in_a_bf16_model(saved):
    # bf16 would move each channel's decay by up to 1.6%; transformers keeps dt_bias in fp32 as well
    theirs, directory = saved["kimi_linear"]
    ours = load_pretrained(directory, dtype=torch.bfloat16)
    for layer in (0, 2):  # the linear layers
        dt_bias = ours.layers[layer].attn.dt_bias
        assert dt_bias.dtype == torch.float32 and ours.layers[layer].attn.wq.weight.dtype == torch.bfloat16
        assert torch.equal(dt_bias, theirs.model.layers[layer].self_attn.forget_gate.dt_bias)


def test_kimi_dense_ffn_loads_under_either_name_but_not_both(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    save_pretrained(load_pretrained(saved["kimi_linear"][1]), tmp_path / "moonshot")  # Moonshot's `mlp.` names
    tensors = load_file(tmp_path / "moonshot" / "model.safetensors")
    moonshot, theirs = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.block_sparse_moe.gate_proj.weight"
    assert moonshot in tensors and theirs in load_file(saved["kimi_linear"][1] / "model.safetensors")
    tensors[theirs] = tensors[moonshot].clone()
    save_file(tensors, tmp_path / "moonshot" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds both .*two spellings of one tensor"):
        load_pretrained(tmp_path / "moonshot")


@pytest.mark.parametrize("family, change, key", [
    ("qwen3_next", {"attention_bias": True}, "attention_bias"),
    ("qwen3_next", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3_next", {"layer_types": ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]},
     "layer_types"),
    ("qwen3_next", {"layer_types": None, "full_attention_interval": 0}, "full_attention_interval"),
    ("minimax", {"rotary_dim": 4}, "rotary_dim"),
    ("kimi_linear", {"mla_use_nope": False}, "mla_use_nope"),
    ("kimi_linear", {"moe_router_activation_func": "softmax"}, "moe_router_activation_func"),
    ("kimi_linear", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("kimi_linear", {"mlp_layer_types": ["dense", "moe", "sparse", "sparse"]}, "mlp_layer_types"),
    ("kimi_linear", {"linear_attn_config": {"num_heads": 10**9}}, r"linear_attn_config\.num_heads = 1000000000 is "
     "outside"),  # bounded before anything is built
])
def test_a_key_we_cannot_express_is_refused_naming_it(family, change, key, saved):
    hf = {**saved[family][0].config.to_dict(), **change}
    with pytest.raises(ValueError, match=rf"config\.json: {key}"):
        config_from_hf(hf, "config.json")


@pytest.mark.parametrize("family, change, field", [
    ("qwen3_next", {"attention.output_gate": False}, r"attention\.output_gate"),
    ("qwen3_next", {"residual": None}, None),
    ("minimax", {"residual": None}, "residual"),
    ("kimi_linear", {"attention.rotary": True}, "attention"),
])
def test_export_names_what_a_hybrid_family_cannot_express(family, change, field, saved):
    from dataclasses import replace

    from smoe.config import ResidualConfig, override

    config = config_from_hf(saved[family][0].config.to_dict())
    if field is None:  # a residual the family lacks
        config, field = replace(config, residual=ResidualConfig()), "residual"
    else:
        config = override(config, change) if change != {"residual": None} else replace(config, residual=None)
    with pytest.raises(ValueError, match=rf"^{field}: cannot be expressed as a Hugging Face {family} config"):
        config_to_hf(config, family)
    with pytest.raises(ValueError, match=r"^linear_attention: cannot be expressed as a Hugging Face mixtral config"):
        config_to_hf(config, "mixtral")  # no other family takes a hybrid model
