"""Layer-level parity with transformers' own implementations, fp32, tiny shapes.

Each test builds the transformers module (inside a one-layer random model that transformers itself constructs, so
its mask and rotary embedding are the real ones), copies its weights into the matching smoe layer, and compares
outputs on the same input. Our cos/sin always come from our own RotaryEmbedding, so RoPE is part of what is checked.

Legend: B batch, T sequence, D model dim, E experts, K top_k.
"""

import dataclasses
import importlib
import warnings

import pytest
import torch

from smoe.config import AttentionConfig, MLAConfig, MoEConfig, RopeScaling
from smoe.moe.router import Router
from smoe.nn.attention import Attention
from smoe.nn.mixer import MixerStep
from smoe.nn.mla import MLA
from smoe.nn.rope import RotaryEmbedding, rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding  # noqa: E402

B, T, D = 2, 12, 64
TOL = dict(rtol=1e-5, atol=1e-5)

# DeepSeek-V3 config.json rope_scaling (https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json).
DEEPSEEK_V3_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
# DeepSeek-V2(-Lite) config.json rope_scaling.
DEEPSEEK_V2_YARN = {**DEEPSEEK_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}


def _our_scaling(params: dict) -> RopeScaling | None:
    kind = params.get("rope_type", "default")
    if kind == "default":
        return None
    return RopeScaling(
        type=kind,
        factor=params["factor"],
        original_max_seq_len=params.get("original_max_position_embeddings", 4096),
        beta_fast=params.get("beta_fast", 32.0),
        beta_slow=params.get("beta_slow", 1.0),
        mscale=params.get("mscale", 1.0),
        mscale_all_dim=params.get("mscale_all_dim", 0.0),
    )


def _hf_config(model_type: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoConfig.for_model(model_type, **kwargs)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Replace transformers' init (zero biases, unit norms) with values that make every weight matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.1 * noise)


def _hf_attention_call(model_type: str, attn_path: str, seed: int = 0, **config_kwargs):
    """A one-layer transformers model; returns (config, its layer-0 attention module, a function x -> output).

    The mask and position embeddings are the ones the model itself hands to the attention module.
    """
    no_special = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # vocab_size 32 holds none of them
    cfg = _hf_config(model_type, vocab_size=32, num_hidden_layers=1, **no_special, **config_kwargs)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    attn = model.get_submodule(attn_path)
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs, args=args)

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(torch.zeros(B, T, dtype=torch.long), use_cache=False)
    handle.remove()
    assert not captured.pop("args"), "the attention module is expected to be called with keyword arguments"
    if "attention_mask" in captured:
        assert captured["attention_mask"] is not None, "eager attention needs a materialised causal mask"
    _randomize(attn, seed + 1)

    def call(x_BTD):
        with torch.no_grad():
            return attn(**{**captured, "hidden_states": x_BTD})[0]

    return cfg, attn, call


def _input(seed: int = 2) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


# --- 1. RoPE ---------------------------------------------------------------------------------------------------------

ROPE_CASES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {k: v for k, v in DEEPSEEK_V3_YARN.items() if not k.startswith("mscale")},
    "yarn_deepseek_v3": DEEPSEEK_V3_YARN,
    "yarn_deepseek_v2": DEEPSEEK_V2_YARN,
    # Kimi K2 config.json: beta_fast == beta_slow == 1, factor 32 (a near zero-width ramp).
    "yarn_kimi_k2": {**DEEPSEEK_V3_YARN, "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0},
}


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("rot_dim", [16, 64])
def test_rope_frequencies_match_transformers(case, rot_dim):
    params = {**ROPE_CASES[case], "rope_theta": 10000.0}
    cfg = _hf_config("mistral", hidden_size=4 * rot_dim, num_attention_heads=4, head_dim=rot_dim,
                     max_position_embeddings=int(params.get("factor", 1) * 4096), rope_parameters=dict(params))
    if params["rope_type"] == "default":  # not in ROPE_INIT_FUNCTIONS: each model's rotary module computes it
        init_fn = MistralRotaryEmbedding.compute_default_rope_parameters
    else:
        init_fn = ROPE_INIT_FUNCTIONS[params["rope_type"]]
    hf_inv_freq, hf_factor = init_fn(cfg)

    inv_freq, factor = rope_frequencies(rot_dim, 10000.0, _our_scaling(params))

    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), **TOL)
    assert factor == pytest.approx(hf_factor, rel=1e-12)


# --- 2. GQA attention ------------------------------------------------------------------------------------------------

THETA = {"rope_type": "default", "rope_theta": 1e6}
MOE_SMALL = {"intermediate_size": 32, "num_experts_per_tok": 2}

# name: (model_type, transformers config kwargs, our AttentionConfig)
ATTENTION_CASES = {
    "mixtral_gqa": (
        "mixtral",
        dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, **MOE_SMALL),
        AttentionConfig(n_heads=4, n_kv_heads=2),
    ),
    "mixtral_sliding_window": (
        "mixtral",
        dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, sliding_window=5,
             **MOE_SMALL),
        AttentionConfig(n_heads=4, n_kv_heads=2, sliding_window=5),
    ),
    "qwen2_moe_qkv_bias": (
        "qwen2_moe",
        dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, qkv_bias=True, num_experts=4,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, **MOE_SMALL),
        AttentionConfig(n_heads=4, n_kv_heads=2, qkv_bias=True),
    ),
    "qwen3_moe_head_norm": (  # head_dim 32 != D / n_heads = 16
        "qwen3_moe",
        dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4,
             moe_intermediate_size=32, **MOE_SMALL),
        AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=32, qk_norm="head"),
    ),
    "olmoe_full_norm": (
        "olmoe",
        dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, num_experts=4, **MOE_SMALL),
        AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm="full"),
    ),
    "olmoe_full_norm_clip_qkv": (  # clip 0.5 is active both before and after the norm
        "olmoe",
        dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, num_experts=4, clip_qkv=0.5, **MOE_SMALL),
        AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm="full", clip_qkv=0.5),
    ),
    "minimax_m2_partial_rotary": (  # rotates 8 of 16 channels per head
        "minimax_m2",
        dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rotary_dim=8,
             num_local_experts=4, **MOE_SMALL),
        AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=16, rotary_dim=8, qk_norm="full"),
    ),
}
ATTN_NAMES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "q_norm": "q_norm", "k_norm": "k_norm"}


def _our_attention(attn_cfg: AttentionConfig, eps: float, state: dict) -> tuple[Attention, RotaryEmbedding]:
    ours = Attention(D, attn_cfg, eps).eval()
    ours.load_state_dict(state, strict=True)
    rot_dim = attn_cfg.rotary_dim or attn_cfg.resolved_head_dim(D)
    return ours, RotaryEmbedding(rot_dim, attn_cfg.rope_theta, attn_cfg.rope_scaling)


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_matches_transformers(case):
    model_type, kwargs, attn_cfg = ATTENTION_CASES[case]
    attn_cfg = dataclasses.replace(attn_cfg, rope_theta=THETA["rope_theta"])
    cfg, attn, hf_call = _hf_attention_call(model_type, "model.layers.0.self_attn", rope_parameters=dict(THETA),
                                            **kwargs)
    state = {}
    for name, tensor in attn.state_dict().items():
        module, kind = name.split(".")
        state[f"{ATTN_NAMES[module]}.{kind}"] = tensor
    ours, rope = _our_attention(attn_cfg, cfg.rms_norm_eps, state)
    x = _input()
    cos, sin = rope(torch.arange(T))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, MixerStep(cos=cos, sin=sin)), hf_call(x), **TOL)


def test_attention_clip_qkv_matches_dbrx():
    clip = 0.5  # below the typical |q|, |k|, |v| of the random weights, so the clamp is active
    _, attn, hf_call = _hf_attention_call(
        "dbrx", "transformer.blocks.0.norm_attn_norm.attn", d_model=D, n_heads=4, rope_parameters=dict(THETA),
        # DbrxAttention still reads attn_config.rope_theta, which DbrxAttentionConfig no longer declares.
        attn_config={"kv_n_heads": 2, "clip_qkv": clip, "rope_theta": THETA["rope_theta"]},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
    )
    wq, wk, wv = attn.Wqkv.weight.detach().split([D, D // 2, D // 2])
    assert attn.Wqkv(_input()).abs().max() > clip
    attn_cfg = AttentionConfig(n_heads=4, n_kv_heads=2, rope_theta=THETA["rope_theta"], clip_qkv=clip)
    state = {"wq.weight": wq, "wk.weight": wk, "wv.weight": wv, "wo.weight": attn.out_proj.weight.detach()}
    ours, rope = _our_attention(attn_cfg, 1e-5, state)
    x = _input()
    cos, sin = rope(torch.arange(T))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, MixerStep(cos=cos, sin=sin)), hf_call(x), **TOL)


# --- 3. MLA ----------------------------------------------------------------------------------------------------------

MLA_DIMS = dict(n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
# name: (model_type, q_lora_rank, rope_interleave, rope_parameters)
MLA_CASES = {
    "deepseek_v3": ("deepseek_v3", 24, True, DEEPSEEK_V3_YARN),
    "deepseek_v3_no_q_lora": ("deepseek_v3", None, True, DEEPSEEK_V3_YARN),
    "deepseek_v3_half_layout": ("deepseek_v3", 24, False, DEEPSEEK_V3_YARN),
    "deepseek_v2_lite": ("deepseek_v2", None, True, DEEPSEEK_V2_YARN),
}
MLA_NAMES = {"q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
             "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}


@pytest.mark.parametrize("case", MLA_CASES)
def test_mla_matches_transformers(case):
    model_type, q_lora_rank, interleave, rope_params = MLA_CASES[case]
    kwargs = dict(hidden_size=D, num_attention_heads=MLA_DIMS["n_heads"], num_key_value_heads=MLA_DIMS["n_heads"],
                  q_lora_rank=q_lora_rank, kv_lora_rank=MLA_DIMS["kv_lora_rank"],
                  qk_nope_head_dim=MLA_DIMS["qk_nope_head_dim"], qk_rope_head_dim=MLA_DIMS["qk_rope_head_dim"],
                  v_head_dim=MLA_DIMS["v_head_dim"], intermediate_size=32, first_k_dense_replace=1,
                  rms_norm_eps=1e-6, max_position_embeddings=163840,
                  rope_parameters={**rope_params, "rope_theta": 10000.0})
    if model_type == "deepseek_v3":
        kwargs["rope_interleave"] = interleave
    _, attn, hf_call = _hf_attention_call(model_type, "model.layers.0.self_attn", **kwargs)
    scaling = _our_scaling(rope_params)
    qk_head_dim = MLA_DIMS["qk_nope_head_dim"] + MLA_DIMS["qk_rope_head_dim"]
    assert attn.scaling != pytest.approx(qk_head_dim**-0.5)  # the YaRN softmax-scale correction is exercised
    mla_cfg = MLAConfig(q_lora_rank=q_lora_rank, rope_theta=10000.0, rope_scaling=scaling, rope_interleave=interleave,
                        **MLA_DIMS)
    ours = MLA(D, mla_cfg, 1e-6).eval()
    state = {}
    for name, tensor in attn.state_dict().items():
        module, kind = name.split(".")
        state[f"{MLA_NAMES[module]}.{kind}"] = tensor
    ours.load_state_dict(state, strict=True)
    rope = RotaryEmbedding(mla_cfg.qk_rope_head_dim, mla_cfg.rope_theta, scaling)
    x = _input()
    cos, sin = rope(torch.arange(T))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, MixerStep(cos=cos, sin=sin)), hf_call(x), **TOL)


# --- 4. Routers ------------------------------------------------------------------------------------------------------

N_TOKENS = 32
# name: (model_type, router class path, transformers config kwargs, our MoEConfig)
ROUTER_CASES = {
    "deepseek_v3_grouped_sigmoid": (
        "deepseek_v3",
        "deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter",
        dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
             norm_topk_prob=True),
        MoEConfig(n_routed_experts=16, top_k=4, n_group=4, topk_group=2, group_score="top2_sum",
                  score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, balance="aux_free"),
    ),
    "mixtral_softmax_renormalised": (
        "mixtral",
        "mixtral.modeling_mixtral.MixtralTopKRouter",
        dict(num_local_experts=8, num_experts_per_tok=2),
        MoEConfig(n_routed_experts=8, top_k=2, score_func="softmax", norm_topk_prob=True),
    ),
    "qwen2_moe_softmax_raw": (
        "qwen2_moe",
        "qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter",
        dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=False),
        MoEConfig(n_routed_experts=8, top_k=4, score_func="softmax", norm_topk_prob=False),
    ),
}


def _sorted_by_expert(ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids_TK, order = ids_TK.sort(dim=-1)
    return ids_TK, weights_TK.gather(1, order)


@pytest.mark.parametrize("case", ROUTER_CASES)
def test_router_matches_transformers(case):
    model_type, path, kwargs, moe_cfg = ROUTER_CASES[case]
    module_path, cls_name = path.rsplit(".", 1)
    module = importlib.import_module(f"transformers.models.{module_path}")
    hf = getattr(module, cls_name)(_hf_config(model_type, hidden_size=D, **kwargs)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=g) * 0.3)
    ours = Router(D, moe_cfg).eval()
    ours.weight.data.copy_(hf.weight.data)
    if hasattr(hf, "e_score_correction_bias"):
        # A non-zero correction bias changes the selected experts (and groups) but not the weights.
        bias = torch.randn(moe_cfg.n_routed_experts, generator=g) * 0.1
        hf.e_score_correction_bias.copy_(bias)
        if ours.expert_bias is not None:  # None would be a config that forgot the bias: caught below
            ours.expert_bias.copy_(bias)
    x_TD = torch.randn(N_TOKENS, D, generator=g)

    with torch.no_grad():
        hf_logits, hf_weights_TK, hf_ids_TK = hf(x_TD)
        routing = ours(x_TD)

    K = moe_cfg.top_k
    assert routing.token_major
    torch.testing.assert_close(routing.token_ids_A, torch.arange(N_TOKENS).repeat_interleave(K))
    torch.testing.assert_close(routing.logits_TE, hf_logits.float(), **TOL)
    ids, weights = _sorted_by_expert(routing.expert_ids_A.view(N_TOKENS, K), routing.weights_A.view(N_TOKENS, K))
    hf_ids, hf_weights = _sorted_by_expert(hf_ids_TK, hf_weights_TK.float())
    torch.testing.assert_close(ids, hf_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, hf_weights, **TOL)
