"""Mixtral (``mixtral``): GQA, every layer MoE, softmax top-k always renormalised. Defaults: transformers'
MixtralConfig."""

from __future__ import annotations

from typing import Any

from smoe.config import AttentionConfig, ModelConfig, MoEConfig
from smoe.interop.families.base import (
    GQA,
    W_EXPERTS,
    Family,
    Reader,
    gqa_out,
    llama_key_map,
    moe_out,
    pooled_aux_coef,
    read_common,
    read_head_dim,
    read_rope,
    require,
    softmax_plain,
    with_hf_aux,
)


def read(r: Reader) -> ModelConfig:
    theta, scaling = read_rope(r, 1e6)
    heads = int(r.req("num_attention_heads"))
    config = ModelConfig(
        **read_common(r, eps=1e-5, max_pos=4096 * 32),
        ffn_dim=int(r.opt("intermediate_size", 14336)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", 8)),
                                  head_dim=read_head_dim(r, heads), rope_theta=theta, rope_scaling=scaling,
                                  sliding_window=r.opt("sliding_window")),
        moe=MoEConfig(n_routed_experts=int(r.first(("num_local_experts", "num_experts"), 8)),
                      top_k=int(r.opt("num_experts_per_tok", 2)), expert_dim=int(r.opt("intermediate_size", 14336))),
    )
    return with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.001)))


def write(c: ModelConfig) -> dict[str, Any]:
    out, m = moe_out(c, "mixtral"), c.moe
    require("mixtral", softmax_plain(m) and m.norm_topk_prob, "moe.score_func", "softmax top-k renormalised only")
    return {**out, **gqa_out(c, "mixtral", "none", False), "intermediate_size": m.expert_dim,
            "num_local_experts": m.n_routed_experts, "num_experts_per_tok": m.top_k,
            "router_aux_loss_coef": pooled_aux_coef(c), "sliding_window": c.attention.sliding_window}


KEY_MAP = llama_key_map(GQA, {"ffn.router": "block_sparse_moe.gate"}, W_EXPERTS)
FAMILIES = (Family("mixtral", read, KEY_MAP, write, "MixtralForCausalLM"),)
