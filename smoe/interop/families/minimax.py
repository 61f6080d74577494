"""MiniMax-01 (``minimax``, MiniMax-Text-01): a hybrid of lightning attention (decayed linear attention) and GQA
full attention, every layer a Mixtral-style MoE (softmax top-k, renormalised), and MiniMax's residual on the
normalised input, x <- alpha norm(x) + beta f(norm(x)), its six factors in ResidualConfig. Defaults: transformers'
MiniMaxConfig.

transformers rotates whole heads here (it reads no ``rotary_dim``) and tiles the lightning recurrence in
``block_size`` tokens, a speed setting that leaves the math as it is (ours: LinearAttentionConfig.chunk). Its
checkpoints hold the lightning layers' decay tables (``slope_rate``, ``query_decay``, ``key_decay``,
``diagonal_decay``), fixed by the layer index and head count, which we compute instead.

Legend: H heads, Dh head dim, D model dim.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from smoe.config import AttentionConfig, LinearAttentionConfig, ModelConfig, MoEConfig, ResidualConfig
from smoe.interop.families.base import (
    GQA,
    W_EXPERTS,
    Family,
    Piece,
    Reader,
    gqa_out,
    hybrid_out,
    interleaved,
    llama_key_map,
    moe_out,
    pooled_aux_coef,
    read_common,
    read_layer_types,
    read_rope,
    read_silu,
    require,
    softmax_plain,
    with_hf_aux,
)

# ResidualConfig field -> config.json key
FACTORS = {"attention_alpha": "full_attn_alpha_factor", "attention_beta": "full_attn_beta_factor",
           "linear_attention_alpha": "linear_attn_alpha_factor", "linear_attention_beta": "linear_attn_beta_factor",
           "ffn_alpha": "mlp_alpha_factor", "ffn_beta": "mlp_beta_factor"}


def read(r: Reader) -> ModelConfig:
    read_silu(r, "lightning attention's q, k, v are SiLU")
    theta, scaling = read_rope(r, 1e6)
    common = read_common(r, eps=1e-5, max_pos=4096 * 32)
    heads = int(r.req("num_attention_heads"))
    head_dim = int(r.opt("head_dim") or common["dim"] // heads)
    partial = (r.opt("rope_parameters", {}) or {}).get("partial_rotary_factor", r.opt("partial_rotary_factor"))
    if r.opt("rotary_dim", head_dim) != head_dim or partial not in (None, 1, 1.0):
        raise ValueError(f"{r.source}: rotary_dim={r.opt('rotary_dim')!r} / partial_rotary_factor={partial!r} is "
                         f"not supported (transformers' MiniMax rotates whole heads of {head_dim})")
    types = read_layer_types(r, common["n_layers"], lambda i: i % 2 == 0)
    config = ModelConfig(
        **common,
        ffn_dim=int(r.opt("intermediate_size", 14336)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", 8)),
                                  head_dim=None if head_dim * heads == common["dim"] else head_dim, rope_theta=theta,
                                  rope_scaling=scaling, sliding_window=r.opt("sliding_window")),
        # the lightning layers have the full attention's heads
        linear_attention=None if types is None else LinearAttentionConfig(kind="lightning", n_heads=heads,
                                                                          head_dim=head_dim),
        moe=MoEConfig(n_routed_experts=int(r.first(("num_local_experts", "num_experts"), 8)),
                      top_k=int(r.opt("num_experts_per_tok", 2)), expert_dim=int(r.opt("intermediate_size", 14336))),
        residual=ResidualConfig(**{ours: float(r.opt(key, 1.0)) for ours, key in FACTORS.items()}),
    )
    config = replace(config, layout=replace(config.layout, layer_types=types))
    return with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.001)))


def write(c: ModelConfig) -> dict[str, Any]:
    out, m, a = moe_out(c, "minimax", hybrid=True), c.moe, c.attention
    require("minimax", softmax_plain(m) and m.norm_topk_prob, "moe.score_func", "softmax top-k renormalised only")
    out.update(gqa_out(c, "minimax", "none", False), **hybrid_out(c, "minimax", "lightning"))
    require("minimax", a.rotary_dim is None, "attention.rotary_dim", "transformers' MiniMax rotates whole heads")
    require("minimax", c.residual is not None, "residual", "MiniMax adds to the normalised input (ResidualConfig)")
    la, head_dim = c.linear_attention, a.resolved_head_dim(c.dim)
    require("minimax", la is None or (la.n_heads, la.head_dim) == (a.n_heads, head_dim),
            "linear_attention.n_heads", "lightning layers have the full attention's heads and head_dim")
    out.update({key: getattr(c.residual, ours) for ours, key in FACTORS.items()})
    return {**out, "intermediate_size": m.expert_dim, "num_local_experts": m.n_routed_experts,
            "num_experts_per_tok": m.top_k, "router_aux_loss_coef": pooled_aux_coef(c),
            "sliding_window": a.sliding_window}


def lightning_pieces(D: int, H: int, Dh: int, hf: str, ours: str) -> list[Piece]:
    """A lightning layer's pieces, ``hf`` and ``ours`` its two prefixes: transformers fuses q, k, v into
    ``qkv_proj``, interleaved per head."""
    qkv = tuple((ours + f"w{x}.weight", Dh) for x in "qkv")
    return [*interleaved(hf + "qkv_proj.weight", qkv, H, (D,)),
            *(Piece(hf + theirs, ours + mine) for mine, theirs in (
                ("w_gate.weight", "output_gate.weight"), ("norm_weight", "norm.weight"),
                ("wo.weight", "out_proj.weight")))]


def _fused(c: ModelConfig, i: int, prefix: str) -> list[Piece]:
    if not c.layout.is_linear(i):
        return []
    la = c.linear_attention
    return lightning_pieces(c.dim, la.n_heads, la.head_dim, prefix + "self_attn.", f"layers.{i}.attn.")


KEY_MAP = replace(llama_key_map(GQA, {"ffn.router": "block_sparse_moe.gate"}, W_EXPERTS), fused=_fused,
                  ignore=r"\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$")
FAMILIES = (Family("minimax", read, KEY_MAP, write, "MiniMaxForCausalLM"),)
