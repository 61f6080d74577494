"""DBRX (``dbrx``): bias-free LayerNorm, q/k/v clip, its keys nested in ``attn_config`` and ``ffn_config``; fused
``Wqkv`` and per-projection expert matrices, split into pieces. Defaults: transformers' DbrxConfig.

Legend: E routed experts, F expert hidden dim, D model dim.
"""

from __future__ import annotations

from typing import Any

from smoe.config import AttentionConfig, ModelConfig, MoEConfig
from smoe.interop.families.base import (
    Family,
    KeyMap,
    Piece,
    Reader,
    gqa_out,
    moe_out,
    pooled_aux_coef,
    read_activation,
    read_rope,
    require,
    softmax_plain,
    with_hf_aux,
)


def read(r: Reader) -> ModelConfig:
    attn, ffn = r.sub("attn_config"), r.sub("ffn_config")
    theta, scaling = read_rope(attn if "rope_theta" in attn.data else r)
    normalize = ffn.opt("moe_normalize_expert_weights", 1.0)
    if normalize not in (None, 1, 1.0):
        raise ValueError(f"{ffn.source}: moe_normalize_expert_weights={normalize} is not supported (1 or null)")
    hidden = int(ffn.opt("ffn_hidden_size", 3584))
    config = ModelConfig(
        vocab_size=int(r.req("vocab_size")), dim=int(r.req("d_model")), n_layers=int(r.req("n_layers")),
        ffn_dim=hidden, activation=read_activation((ffn.opt("ffn_act_fn") or {}).get("name", "silu"), ffn.source),
        norm="layernorm", norm_eps=1e-5, tie_embeddings=bool(r.opt("tie_word_embeddings", False)),
        init_std=float(r.opt("initializer_range", 0.02)), max_seq_len=int(r.opt("max_seq_len", 2048)),
        attention=AttentionConfig(n_heads=int(r.req("n_heads")), n_kv_heads=int(attn.opt("kv_n_heads", 1)),
                                  rope_theta=theta, rope_scaling=scaling, clip_qkv=attn.opt("clip_qkv")),
        moe=MoEConfig(n_routed_experts=int(ffn.opt("moe_num_experts", 4)), top_k=int(ffn.opt("moe_top_k", 1)),
                      expert_dim=hidden, norm_topk_prob=normalize is not None),
        name="dbrx",
    )
    return with_hf_aux(config, float(ffn.opt("moe_loss_weight", 0.01)))


def write(c: ModelConfig) -> dict[str, Any]:
    moe_out(c, "dbrx", rms_norm=False)  # its checks only: DBRX spells every key its own way
    a, m = c.attention, c.moe
    require("dbrx", c.norm == "layernorm" and softmax_plain(m) and m.norm_topk_prob, "norm",
            "bias-free LayerNorm and softmax top-k renormalised")
    gqa_out(c, "dbrx", "none", False, clip_qkv=True)
    return {"model_type": "dbrx", "vocab_size": c.vocab_size, "d_model": c.dim, "n_heads": a.n_heads,
            "n_layers": c.n_layers, "max_seq_len": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
            "initializer_range": c.init_std,
            "attn_config": {"kv_n_heads": a.n_kv_heads, "clip_qkv": a.clip_qkv, "rope_theta": a.rope_theta},
            # transformers 5 reads DBRX's theta from the top level and ignores attn_config's: write both.
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
            "ffn_config": {"ffn_hidden_size": m.expert_dim, "moe_num_experts": m.n_routed_experts,
                           "moe_top_k": m.top_k, "moe_normalize_expert_weights": 1.0,
                           "moe_loss_weight": pooled_aux_coef(c)}}


def _fused(config: ModelConfig, i: int, prefix: str) -> list[Piece]:
    """DBRX fuses q, k, v into one ``Wqkv`` and stores each expert projection as one (E*F, D) matrix, the down
    projection transposed."""
    attn, moe, D = config.attention, config.moe, config.dim
    q, kv = attn.n_heads * attn.resolved_head_dim(D), attn.n_kv_heads * attn.resolved_head_dim(D)
    E, F = moe.n_routed_experts, moe.expert_dim
    wqkv, mlp, ours = f"{prefix}norm_attn_norm.attn.Wqkv.weight", f"{prefix}ffn.experts.mlp.", f"layers.{i}."
    qkv_shape, expert_shape = (q + 2 * kv, D), (E * F, D)
    return [
        Piece(wqkv, ours + "attn.wq.weight", view=lambda t: t[:q], shape=qkv_shape),
        Piece(wqkv, ours + "attn.wk.weight", view=lambda t: t[q:q + kv], shape=qkv_shape),
        Piece(wqkv, ours + "attn.wv.weight", view=lambda t: t[q + kv:], shape=qkv_shape),
        Piece(mlp + "w1", ours + "ffn.experts.w_gate_up", (slice(None), slice(0, F)), lambda t: t.view(E, F, D),
              shape=expert_shape),
        Piece(mlp + "v1", ours + "ffn.experts.w_gate_up", (slice(None), slice(F, None)), lambda t: t.view(E, F, D),
              shape=expert_shape),
        Piece(mlp + "w2", ours + "ffn.experts.w_down", view=lambda t: t.view(E, F, D).transpose(1, 2),
              shape=expert_shape),
    ]


KEY_MAP = KeyMap({"embed": "transformer.wte", "norm": "transformer.norm_f", "head": "lm_head"},
                 "transformer.blocks.{i}.",
                 {"attn_norm": "norm_attn_norm.norm_1", "ffn_norm": "norm_attn_norm.norm_2",
                  "attn.wo": "norm_attn_norm.attn.out_proj", "ffn.router": "ffn.router.layer"},
                 fused=_fused)
FAMILIES = (Family("dbrx", read, KEY_MAP, write, "DbrxForCausalLM"),)
