"""Qwen's MoE families: Qwen1.5-MoE / Qwen2-MoE (``qwen2_moe``: q/k/v biases, one sigmoid-gated shared expert) and
Qwen3-MoE (``qwen3_moe``: per-head qk-norm, no shared expert); both place dense layers by ``decoder_sparse_step``
and ``mlp_only_layers``. Defaults: transformers' Qwen2MoeConfig and Qwen3MoeConfig."""

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
    read_head_dim,
    read_rope,
    read_sliding,
    require,
    softmax_plain,
    sparse_step_layout,
    with_hf_aux,
)


def read_qwen2_moe(r: Reader) -> ModelConfig:
    theta, scaling = read_rope(r)
    common = read_common(r, eps=1e-6, max_pos=32768)
    shared = int(r.opt("shared_expert_intermediate_size", 5632))
    config = ModelConfig(
        **common,
        ffn_dim=int(r.opt("intermediate_size", 5632)),
        attention=AttentionConfig(n_heads=int(r.req("num_attention_heads")),
                                  n_kv_heads=int(r.opt("num_key_value_heads", 16)), rope_theta=theta,
                                  rope_scaling=scaling, qkv_bias=bool(r.opt("qkv_bias", True)),
                                  sliding_window=read_sliding(r, lambda i: bool((i + 1) % 2) and i < int(
                                      r.opt("max_window_layers", 28)))),  # every other layer, below it
        moe=MoEConfig(n_routed_experts=int(r.first(("num_experts", "num_local_experts"), 60)),
                      top_k=int(r.opt("num_experts_per_tok", 4)), expert_dim=int(r.opt("moe_intermediate_size", 1408)),
                      n_shared_experts=1 if shared else 0, shared_expert_dim=shared or None,
                      shared_expert_gate=bool(shared), norm_topk_prob=bool(r.opt("norm_topk_prob", False))),
        layout=sparse_step_layout(r, common["n_layers"]),
    )
    return with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.001)))


def read_qwen3_moe(r: Reader) -> ModelConfig:
    r.reject("attention_bias", why=O_BIAS)
    theta, scaling = read_rope(r)
    common = read_common(r, eps=1e-6, max_pos=32768)
    heads = int(r.req("num_attention_heads"))
    config = ModelConfig(
        **common,
        ffn_dim=int(r.opt("intermediate_size", 6144)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", 4)),
                                  head_dim=read_head_dim(r, heads), rope_theta=theta, rope_scaling=scaling,
                                  qk_norm="head", sliding_window=read_sliding(r)),
        moe=MoEConfig(n_routed_experts=int(r.first(("num_experts", "num_local_experts"), 128)),
                      top_k=int(r.opt("num_experts_per_tok", 8)), expert_dim=int(r.opt("moe_intermediate_size", 768)),
                      norm_topk_prob=bool(r.opt("norm_topk_prob", False))),
        layout=sparse_step_layout(r, common["n_layers"]),
    )
    return with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.001)))


def write(c: ModelConfig, model_type: str) -> dict[str, Any]:
    qwen2 = model_type == "qwen2_moe"
    out, m = moe_out(c, model_type, shared_experts=qwen2, dense_layers=True), c.moe
    require(model_type, softmax_plain(m), "moe.score_func", "softmax routing without groups")
    out.update(gqa_out(c, model_type, "none" if qwen2 else "head", None if qwen2 else False),
               intermediate_size=c.ffn_dim, moe_intermediate_size=m.expert_dim, num_experts=m.n_routed_experts,
               num_experts_per_tok=m.top_k, norm_topk_prob=m.norm_topk_prob, router_aux_loss_coef=pooled_aux_coef(c),
               decoder_sparse_step=1, mlp_only_layers=[i for i in range(c.n_layers) if not c.layout.is_moe(i)],
               use_sliding_window=c.attention.sliding_window is not None, sliding_window=c.attention.sliding_window)
    if qwen2:
        require(model_type, m.n_shared_experts <= 1 and m.shared_expert_gate == bool(m.n_shared_experts),
                "moe.shared_expert_gate", "one gated shared expert (or none)")
        out.update(qkv_bias=c.attention.qkv_bias,
                   shared_expert_intermediate_size=m.resolved_shared_expert_dim * m.n_shared_experts)
    else:
        out["attention_bias"] = False
    return out


QWEN2_MOE_KEYS = llama_key_map(GQA, {**ROUTED_MLP, "ffn.shared.gate": "mlp.shared_expert.gate_proj",
                                     "ffn.shared.up": "mlp.shared_expert.up_proj",
                                     "ffn.shared.down": "mlp.shared_expert.down_proj",
                                     "ffn.shared_gate": "mlp.shared_expert_gate"}, MLP_EXPERTS)
QWEN3_MOE_KEYS = llama_key_map(GQA, ROUTED_MLP, MLP_EXPERTS)
FAMILIES = (
    Family("qwen2_moe", read_qwen2_moe, QWEN2_MOE_KEYS, lambda c: write(c, "qwen2_moe"), "Qwen2MoeForCausalLM"),
    Family("qwen3_moe", read_qwen3_moe, QWEN3_MOE_KEYS, lambda c: write(c, "qwen3_moe"), "Qwen3MoeForCausalLM"),
)
