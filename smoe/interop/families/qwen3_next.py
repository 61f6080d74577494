"""Qwen3-Next (``qwen3_next``): a hybrid of Gated DeltaNet linear attention and gated full attention (a sigmoid
gate on the heads' output, fused with the query projection; per-head qk-norm; partial rotary), with Qwen2-MoE's
sigmoid-gated shared expert. Defaults: transformers' Qwen3NextConfig.

Norms: every RMSNorm but the gated one inside the linear layers is zero-centred, x_norm * (1 + w) with w stored
(input_layernorm, post_attention_layernorm, the final norm, q_norm and k_norm); ours hold 1 + w (``KeyMap.shifted``).
The multi-token-prediction weights some checkpoints carry (``mtp.*``) are skipped, as transformers skips them.

Legend: Hk key heads, Hv value heads, K key head dim, V value head dim, D model dim.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from smoe.config import AttentionConfig, LinearAttentionConfig, ModelConfig, MoEConfig
from smoe.interop.families.base import (
    GQA,
    MLP_EXPERTS,
    O_BIAS,
    ROUTED_MLP,
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
    sparse_step_layout,
    unsupported,
    with_hf_aux,
)


def read(r: Reader) -> ModelConfig:
    r.reject("attention_bias", why=O_BIAS)
    read_silu(r, "Gated DeltaNet's convolution and gate are SiLU")
    theta, scaling = read_rope(r)
    common = read_common(r, eps=1e-6, max_pos=32768)
    n, heads = common["n_layers"], int(r.req("num_attention_heads"))
    head_dim = int(r.opt("head_dim", 256))
    partial = float((r.opt("rope_parameters", {}) or {}).get("partial_rotary_factor",
                                                              r.opt("partial_rotary_factor", 0.25)))
    rotary_dim = int(head_dim * partial)
    interval = r.opt("full_attention_interval", 4)
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"{r.source}: full_attention_interval must be a positive integer, got {interval!r}")
    types = read_layer_types(r, n, lambda i: (i + 1) % interval == 0)
    k_heads, v_heads = int(r.opt("linear_num_key_heads", 16)), int(r.opt("linear_num_value_heads", 32))
    k_dim, v_dim = int(r.opt("linear_key_head_dim", 128)), int(r.opt("linear_value_head_dim", 128))
    linear = None if types is None else LinearAttentionConfig(
        kind="gated_delta", n_heads=v_heads, n_k_heads=None if k_heads == v_heads else k_heads, head_dim=k_dim,
        v_head_dim=None if v_dim == k_dim else v_dim, conv_kernel=int(r.opt("linear_conv_kernel_dim", 4)))
    shared = int(r.opt("shared_expert_intermediate_size", 512))
    n_experts = int(r.first(("num_experts", "num_local_experts"), 512))
    if n_experts and not shared:
        raise ValueError(f"{r.source}: shared_expert_intermediate_size=0 is not supported (transformers' "
                         "Qwen3-Next always adds its gated shared expert)")
    moe = None if not n_experts else MoEConfig(
        n_routed_experts=n_experts, top_k=int(r.opt("num_experts_per_tok", 10)),
        expert_dim=int(r.opt("moe_intermediate_size", 512)), n_shared_experts=1, shared_expert_dim=shared,
        shared_expert_gate=True, norm_topk_prob=bool(r.opt("norm_topk_prob", True)))
    config = ModelConfig(
        **common,
        ffn_dim=int(r.opt("intermediate_size", 5632)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", 2)),
                                  head_dim=None if head_dim * heads == common["dim"] else head_dim,
                                  rotary_dim=None if rotary_dim == head_dim else rotary_dim, rope_theta=theta,
                                  rope_scaling=scaling, qk_norm="head", output_gate=True),
        linear_attention=linear, moe=moe,
        layout=replace(sparse_step_layout(r, n), layer_types=types),
    )
    return with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.001))) if moe else config


def write(c: ModelConfig) -> dict[str, Any]:
    t = "qwen3_next"
    out, m, a = moe_out(c, t, shared_experts=True, dense_layers=True, hybrid=True), c.moe, c.attention
    require(t, softmax_plain(m), "moe.score_func", "softmax routing without groups")
    require(t, m.n_shared_experts == 1 and m.shared_expert_gate, "moe.shared_expert_gate", "one gated shared expert")
    require(t, c.residual is None, "residual", "Qwen3-Next's residual is the plain pre-norm one")
    out.update(gqa_out(c, t, "head", False, partial_rotary=True, output_gate=True), **hybrid_out(c, t, "gated_delta"))
    require(t, a.sliding_window is None, "attention.sliding_window", "no sliding window in this family")
    head_dim = a.resolved_head_dim(c.dim)
    la = c.linear_attention or LinearAttentionConfig()  # the defaults of the keys an attention-only model writes
    out.update(partial_rotary_factor=(a.rotary_dim or head_dim) / head_dim, attention_bias=False,
               intermediate_size=c.ffn_dim, moe_intermediate_size=m.expert_dim, num_experts=m.n_routed_experts,
               num_experts_per_tok=m.top_k, norm_topk_prob=m.norm_topk_prob,
               shared_expert_intermediate_size=m.resolved_shared_expert_dim, router_aux_loss_coef=pooled_aux_coef(c),
               decoder_sparse_step=1, mlp_only_layers=[i for i in range(c.n_layers) if not c.layout.is_moe(i)],
               linear_num_key_heads=la.resolved_n_k_heads, linear_num_value_heads=la.n_heads,
               linear_key_head_dim=la.head_dim, linear_value_head_dim=la.resolved_v_head_dim,
               linear_conv_kernel_dim=la.conv_kernel)
    if c.linear_attention is None and c.layout.layer_types is not None:
        unsupported(t, "layout.layer_types", "no linear attention config")
    return out


def gated_delta_pieces(D: int, Hk: int, Hv: int, K: int, V: int, W: int, hf: str, ours: str) -> list[Piece]:
    """A Gated DeltaNet layer's pieces (W convolution taps), ``hf`` and ``ours`` its two prefixes: transformers
    fuses q, k, v, z into ``in_proj_qkvz`` and b, a into ``in_proj_ba``, interleaved per key head (its Hv / Hk value
    heads together), and stores the depthwise convolution over [q | k | v] as (C, 1, W)."""
    r = Hv // Hk
    qkvz = ((ours + "wq.weight", K), (ours + "wk.weight", K), (ours + "wv.weight", r * V), (ours + "wz.weight", r * V))
    return [*interleaved(hf + "in_proj_qkvz.weight", qkvz, Hk, (D,)),
            *interleaved(hf + "in_proj_ba.weight", ((ours + "wb.weight", r), (ours + "wa.weight", r)), Hk, (D,)),
            Piece(hf + "conv1d.weight", ours + "conv_weight", view=lambda t: t[:, 0],
                  shape=(2 * Hk * K + Hv * V, 1, W)),
            *(Piece(hf + theirs, ours + mine) for mine, theirs in (
                ("dt_bias", "dt_bias"), ("A_log", "A_log"), ("norm_weight", "norm.weight"),
                ("wo.weight", "out_proj.weight")))]


def _fused(c: ModelConfig, i: int, prefix: str) -> list[Piece]:
    """Each layer's mixer: Gated DeltaNet's fused projections, or the full attention's query fused with its gate
    (per head: the head's query rows, then its gate rows)."""
    ours = f"layers.{i}.attn."
    if c.layout.is_linear(i):
        la = c.linear_attention
        return gated_delta_pieces(c.dim, la.resolved_n_k_heads, la.n_heads, la.head_dim, la.resolved_v_head_dim,
                                  la.conv_kernel, prefix + "linear_attn.", ours)
    hd = c.attention.resolved_head_dim(c.dim)
    return interleaved(prefix + "self_attn.q_proj.weight", ((ours + "wq.weight", hd), (ours + "wg.weight", hd)),
                       c.attention.n_heads, (c.dim,))


MOE = {**ROUTED_MLP, "ffn.shared.gate": "mlp.shared_expert.gate_proj", "ffn.shared.up": "mlp.shared_expert.up_proj",
       "ffn.shared.down": "mlp.shared_expert.down_proj", "ffn.shared_gate": "mlp.shared_expert_gate"}
KEY_MAP = replace(llama_key_map(GQA, MOE, MLP_EXPERTS), fused=_fused, ignore=r"^mtp\.",
                  shifted=r"(^|\.)(norm|attn_norm|ffn_norm|q_norm|k_norm)\.weight$")
FAMILIES = (Family("qwen3_next", read, KEY_MAP, write, "Qwen3NextForCausalLM"),)
