"""OLMoE (``olmoe``): qk-norm over all heads, an optional q/k/v clip, a router z-loss. Defaults: transformers'
OlmoeConfig."""

from __future__ import annotations

from typing import Any

from smoe.config import AttentionConfig, ModelConfig, MoEConfig
from smoe.interop.families.base import (
    GQA,
    MLP_EXPERTS,
    O_BIAS,
    ROUTED_MLP,
    Family,
    Reader,
    gqa_out,
    llama_key_map,
    moe_out,
    pooled_aux_coef,
    read_common,
    read_rope,
    require,
    softmax_plain,
    with_hf_aux,
)


def read(r: Reader) -> ModelConfig:
    r.reject("attention_bias", why=O_BIAS)
    theta, scaling = read_rope(r)
    heads = int(r.req("num_attention_heads"))
    config = ModelConfig(
        **read_common(r, eps=1e-5, max_pos=4096),
        ffn_dim=int(r.opt("intermediate_size", 2048)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", heads)),
                                  rope_theta=theta, rope_scaling=scaling, qk_norm="full", clip_qkv=r.opt("clip_qkv")),
        moe=MoEConfig(n_routed_experts=int(r.first(("num_experts", "num_local_experts"), 64)),
                      top_k=int(r.opt("num_experts_per_tok", 8)), expert_dim=int(r.opt("intermediate_size", 2048)),
                      norm_topk_prob=bool(r.opt("norm_topk_prob", False)),
                      z_loss_coef=float(r.opt("router_z_loss_coef", 0.0))),
    )
    return with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.01)))


def write(c: ModelConfig) -> dict[str, Any]:
    out, m = moe_out(c, "olmoe"), c.moe
    require("olmoe", softmax_plain(m), "moe.score_func", "softmax routing without groups")
    return {**out, **gqa_out(c, "olmoe", "full", False, clip_qkv=True), "intermediate_size": m.expert_dim,
            "num_experts": m.n_routed_experts, "num_experts_per_tok": m.top_k, "norm_topk_prob": m.norm_topk_prob,
            "router_aux_loss_coef": pooled_aux_coef(c), "router_z_loss_coef": m.z_loss_coef,
            "attention_bias": False, "clip_qkv": c.attention.clip_qkv}


KEY_MAP = llama_key_map(GQA, ROUTED_MLP, MLP_EXPERTS)
FAMILIES = (Family("olmoe", read, KEY_MAP, write, "OlmoeForCausalLM"),)
