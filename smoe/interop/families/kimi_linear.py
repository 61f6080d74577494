"""Kimi Linear (``kimi_linear``): a hybrid of Kimi Delta Attention (Gated DeltaNet with a decay per key channel)
and MLA without position embeddings (``rotary=False``), with DeepSeek-V3's MoE (sigmoid scores, the
``e_score_correction_bias`` selection bias, top-2-sum groups, renormalised with ``routed_scaling_factor``) and
ungated shared experts; the first layers dense. Defaults: transformers' KimiLinearConfig, which reads both its own
keys and the checkpoint's (``linear_attn_config``, ``num_experts_per_token``, ``moe_renormalize``, ...); so do we.

Names: Moonshot's checkpoints call a dense layer's FFN ``mlp`` and an MoE layer's ``block_sparse_moe``; transformers
saves both as ``block_sparse_moe`` and reads either, and so do we (``KeyMap.aliases``); export writes Moonshot's.
The short convolutions over q, k and v are stored one per projection.

Legend: H heads, K head dim, W convolution taps.
"""

from __future__ import annotations

from typing import Any

from smoe.config import LayoutConfig, LinearAttentionConfig, MLAConfig, ModelConfig, MoEConfig
from smoe.interop.families.base import (
    DENSE_MLP,
    MLA,
    NORMS,
    W_EXPERTS,
    Family,
    KeyMap,
    Piece,
    Reader,
    hybrid_out,
    moe_out,
    read_common,
    read_layer_types,
    read_silu,
    require,
    unsupported,
)


def read(r: Reader) -> ModelConfig:
    r.reject("attention_bias", why="biases on MLA's projections")
    read_silu(r, "Kimi Delta Attention's convolution is SiLU")
    if not r.opt("mla_use_nope", True):
        raise ValueError(f"{r.source}: mla_use_nope=false is not supported (Kimi Linear's MLA has no rotary "
                         "embedding)")
    func = r.opt("moe_router_activation_func", "sigmoid")
    if func != "sigmoid":
        raise ValueError(f"{r.source}: moe_router_activation_func={func!r} is not supported (sigmoid)")
    if int(r.opt("moe_layer_freq", 1)) != 1:  # transformers ignores it; Moonshot's code would skip layers
        raise ValueError(f"{r.source}: moe_layer_freq={r.data['moe_layer_freq']!r} is not supported (1: every "
                         "layer from first_k_dense_replace on is MoE)")
    common = {**read_common(r, eps=1e-5, max_pos=1048576),
              "max_seq_len": int(r.first(("model_max_length", "max_position_embeddings"), 1048576))}
    n, lin = common["n_layers"], r.sub("linear_attn_config")
    full = set(lin.opt("full_attn_layers", []))  # 1-based
    default = (lambda i: i + 1 in full) if full else (lambda i: i > 0 and i % 4 == 0)
    types = read_layer_types(r, n, default)
    heads = int(lin.opt("num_heads", r.opt("linear_num_heads", 32)))
    linear = None if types is None else LinearAttentionConfig(
        kind="kda", n_heads=heads, head_dim=int(lin.opt("head_dim", r.opt("linear_head_dim", 128))),
        conv_kernel=int(lin.opt("short_conv_kernel_size", r.opt("linear_conv_kernel_dim", 4))))
    n_experts = int(r.first(("num_experts", "num_local_experts", "n_routed_experts"), 256))
    moe = None if not n_experts else MoEConfig(
        n_routed_experts=n_experts, top_k=int(r.first(("num_experts_per_token", "num_experts_per_tok"), 8)),
        expert_dim=int(r.opt("moe_intermediate_size", 1024)),
        n_shared_experts=int(r.first(("num_shared_experts", "n_shared_experts"), 1)), score_func="sigmoid",
        norm_topk_prob=bool(r.first(("moe_renormalize", "norm_topk_prob"), True)),
        routed_scaling_factor=float(r.opt("routed_scaling_factor", 2.446)),
        n_group=int(r.first(("num_expert_group", "n_group"), 1)), topk_group=int(r.opt("topk_group", 1)),
        group_score="top2_sum", balance="aux_free", seq_aux_loss_coef=0.0)  # no loss beside the bias
    kinds = r.opt("mlp_layer_types") or ["dense" if i < int(r.opt("first_k_dense_replace", 1)) else "sparse"
                                         for i in range(n)]
    if len(kinds) != n or any(k not in ("dense", "sparse") for k in kinds):
        raise ValueError(f"{r.source}: mlp_layer_types must list 'dense' or 'sparse' per layer ({n}), got {kinds!r}")
    first_dense = next((i for i, k in enumerate(kinds) if k == "sparse"), n)
    if all(k == "sparse" for k in kinds[first_dense:]):
        layout = LayoutConfig(first_k_dense=first_dense, layer_types=types)
    else:
        layout = LayoutConfig(moe_layers=tuple(i for i, k in enumerate(kinds) if k == "sparse"), layer_types=types)
    return ModelConfig(
        **common,
        ffn_dim=int(r.opt("intermediate_size", 9216)),
        attention=MLAConfig(n_heads=int(r.req("num_attention_heads")), q_lora_rank=r.data.get("q_lora_rank"),
                            kv_lora_rank=int(r.opt("kv_lora_rank", 512)),
                            qk_nope_head_dim=int(r.opt("qk_nope_head_dim", 128)),
                            qk_rope_head_dim=int(r.opt("qk_rope_head_dim", 64)),
                            v_head_dim=int(r.opt("v_head_dim", 128)), rotary=False),
        linear_attention=linear, moe=moe, layout=layout,
    )


def write(c: ModelConfig) -> dict[str, Any]:
    t = "kimi_linear"
    out, m, a = moe_out(c, t, shared_experts=True, dense_layers=True, aux_free=True, hybrid=True), c.moe, c.attention
    require(t, isinstance(a, MLAConfig) and not a.rotary, "attention", "MLA without rotary embeddings")
    require(t, m.score_func == "sigmoid" and m.balance == "aux_free"
            and (m.group_score == "top2_sum" or m.n_group == 1), "moe", "sigmoid scores, the selection bias and "
            "top-2-sum groups")
    require(t, not m.shared_expert_gate and m.shared_expert_dim in (None, m.expert_dim), "moe.shared_expert_dim",
            "shared experts are ungated and as wide as routed ones")
    require(t, c.residual is None, "residual", "Kimi Linear's residual is the plain pre-norm one")
    if c.layout.layer_types is not None and c.linear_attention is None:
        unsupported(t, "layout.layer_types", "no linear attention config")
    la = c.linear_attention or LinearAttentionConfig(kind="kda", n_heads=32, head_dim=128)
    for key in ("max_position_embeddings", "num_experts_per_tok"):
        out.pop(key, None)
    out.update(hybrid_out(c, t, "kda"), model_max_length=c.max_seq_len, num_attention_heads=a.n_heads,
               num_key_value_heads=a.n_heads, q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank,
               qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
               intermediate_size=c.ffn_dim, moe_intermediate_size=m.expert_dim, num_experts=m.n_routed_experts,
               num_experts_per_token=m.top_k, num_shared_experts=m.n_shared_experts,
               routed_scaling_factor=m.routed_scaling_factor, num_expert_group=m.n_group, topk_group=m.topk_group,
               moe_renormalize=m.norm_topk_prob, attention_bias=False,
               mlp_layer_types=["sparse" if c.layout.is_moe(i) else "dense" for i in range(c.n_layers)],
               linear_num_heads=la.n_heads, linear_head_dim=la.head_dim, linear_conv_kernel_dim=la.conv_kernel,
               pad_token_id=None, bos_token_id=None, eos_token_id=None)  # KimiLinearConfig's defaults are Kimi's ids
    return out


def kda_pieces(H: int, K: int, W: int, hf: str, ours: str) -> list[Piece]:
    """The pieces of a Kimi Delta Attention layer that are not renames: the three convolutions (one per q, k, v,
    each (H K, 1, W)) that ours holds as one over [q | k | v], and the decay rates A_log, stored (1, 1, H, 1)."""
    conv = [Piece(hf + f"{x}_conv1d.weight", ours + "conv_weight", (slice(j * H * K, (j + 1) * H * K),),
                  lambda t: t[:, 0], shape=(H * K, 1, W)) for j, x in enumerate("qkv")]
    return [*conv, Piece(hf + "A_log", ours + "A_log", view=lambda t: t.view(-1), shape=(1, 1, H, 1))]


def _fused(c: ModelConfig, i: int, prefix: str) -> list[Piece]:
    if not c.layout.is_linear(i):
        return []
    la = c.linear_attention
    return kda_pieces(la.n_heads, la.head_dim, la.conv_kernel, prefix + "self_attn.", f"layers.{i}.attn.")


MOE = {"ffn.router": "block_sparse_moe.gate",
       "ffn.router.expert_bias": "block_sparse_moe.gate.e_score_correction_bias",
       **{f"ffn.shared.{w}": f"block_sparse_moe.shared_experts.{w}_proj" for w in ("gate", "up", "down")}}
# MLA's wq and wo are named as KDA's q_proj and o_proj too
KDA = {f"attn.{mine}": f"self_attn.{theirs}" for mine, theirs in (
    ("wk", "k_proj"), ("wv", "v_proj"), ("wb", "b_proj"), ("wf_a", "f_a_proj"), ("wf_b", "f_b_proj"),
    ("dt_bias", "dt_bias"), ("wg_a", "g_a_proj"), ("wg_b", "g_b_proj"), ("norm_weight", "o_norm.weight"))}
KEY_MAP = KeyMap({"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}, "model.layers.{i}.",
                 {**NORMS, **MLA, **KDA, **DENSE_MLP, **MOE}, W_EXPERTS, fused=_fused,
                 aliases=((r"\.block_sparse_moe\.(gate|up|down)_proj\.", r".mlp.\1_proj."),))
FAMILIES = (Family("kimi_linear", read, KEY_MAP, write, "KimiLinearForCausalLM"),)
