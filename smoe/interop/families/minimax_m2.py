"""MiniMax-M2 (``minimax_m2``): sigmoid scores with a selection bias, renormalised, partial rotary, qk-norm over all
heads. Defaults: transformers' MiniMaxM2Config."""

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
    read_common,
    read_rope,
    require,
)


def read(r: Reader) -> ModelConfig:
    theta, scaling = read_rope(r)
    common = read_common(r, eps=1e-6, max_pos=196608)
    heads = int(r.req("num_attention_heads"))
    head_dim = int(r.opt("head_dim", 128))  # partial rotary needs the resolved value
    params = r.opt("rope_parameters", {}) or {}
    partial = params.get("partial_rotary_factor", r.opt("partial_rotary_factor"))
    rotary_dim = r.opt("rotary_dim") or (int(head_dim * partial) if partial else None)
    return ModelConfig(
        **common,
        ffn_dim=int(r.opt("intermediate_size", 1536)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", 8)),
                                  head_dim=None if head_dim * heads == common["dim"] else head_dim,
                                  rotary_dim=None if rotary_dim == head_dim else rotary_dim, rope_theta=theta,
                                  rope_scaling=scaling, qk_norm="full"),
        # transformers' MiniMax-M2 selects on sigmoid + e_score_correction_bias and renormalises; no loss beside it
        moe=MoEConfig(n_routed_experts=int(r.first(("num_local_experts", "num_experts"), 256)),
                      top_k=int(r.opt("num_experts_per_tok", 8)), expert_dim=int(r.opt("intermediate_size", 1536)),
                      score_func="sigmoid", norm_topk_prob=True, balance="aux_free", seq_aux_loss_coef=0.0),
    )


def write(c: ModelConfig) -> dict[str, Any]:
    out, m = moe_out(c, "minimax_m2", aux_free=True), c.moe
    require("minimax_m2", m.score_func == "sigmoid" and m.balance == "aux_free" and m.norm_topk_prob
            and m.n_group == 1, "moe", "sigmoid scores with a selection bias, renormalised, no groups")
    return {**out, **gqa_out(c, "minimax_m2", "full", False, partial_rotary=True), "intermediate_size": m.expert_dim,
            "num_local_experts": m.n_routed_experts, "num_experts_per_tok": m.top_k,
            "rotary_dim": c.attention.rotary_dim or c.attention.resolved_head_dim(c.dim)}


# Mixtral's names, and the selection bias
KEY_MAP = llama_key_map(GQA, {"ffn.router": "block_sparse_moe.gate",
                              "ffn.router.expert_bias": "block_sparse_moe.e_score_correction_bias"}, W_EXPERTS)
FAMILIES = (Family("minimax_m2", read, KEY_MAP, write, "MiniMaxM2ForCausalLM"),)
