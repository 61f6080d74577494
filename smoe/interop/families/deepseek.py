"""DeepSeek's families: DeepSeekMoE 16B (``deepseek``, remote code: MHA), DeepSeek-V2 and V3 (``deepseek_v2``,
``deepseek_v3``: MLA, group-limited routing, V3's aux-free bias and multi-token prediction) and Kimi K2
(``kimi_k2``, remote code with V3's architecture). Defaults: transformers' DeepseekV2/V3 configs, and DeepSeek's own
configuration_deepseek.py for version 1.

Top-1 renormalisation: DeepSeek's own code (DeepSeekMoE, V2, Kimi K2's copy of V3) renormalises only when
``top_k > 1 and norm_topk_prob``, and transformers' DeepseekV2 never does, so at k = 1 those read as
``norm_topk_prob=False``; transformers' DeepseekV3 renormalises at k = 1 too (smoe.interop.families).
"""

from __future__ import annotations

from typing import Any

from smoe.config import AttentionConfig, LayoutConfig, MLAConfig, ModelConfig, MoEConfig
from smoe.interop.families.base import (
    GQA,
    MLA,
    MLP_EXPERTS,
    ROUTED_MLP,
    Family,
    Reader,
    llama_key_map,
    moe_out,
    read_common,
    read_rope,
    require,
    rope_out,
)


def read(r: Reader, version: int, renorm_top1: bool = False) -> ModelConfig:
    """``version`` 1, 2 or 3; ``renorm_top1``: the code that runs this model_type renormalises at top_k = 1."""
    r.reject("attention_bias", "mlp_bias", why="DeepSeek's biases on the attention and MLP projections")
    v3 = version == 3
    theta, scaling = read_rope(r)
    common = read_common(r, eps=1e-6, max_pos=4096 if v3 else 2048)
    heads = int(r.req("num_attention_heads"))
    method = r.opt("topk_method", "noaux_tc" if v3 else "greedy")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ValueError(f"{r.source}: topk_method {method!r} is not supported (greedy, group_limited_greedy, "
                         "noaux_tc)")
    grouped = method != "greedy"
    aux_free = method == "noaux_tc"
    # DeepSeek's reference code defaults to the sequence-wise loss (seq_aux=True); transformers has no aux loss here.
    balance = "aux_free" if aux_free else ("seq_aux" if r.opt("seq_aux", True) else "aux")
    alpha = float(r.opt("aux_loss_alpha", 0.001))
    moe = None
    if version > 1 or r.opt("n_routed_experts") is not None:  # DeepSeek's v1 config is dense without experts
        top_k = int(r.req("num_experts_per_tok") if version == 1 else r.opt("num_experts_per_tok", 8 if v3 else 6))
        moe = MoEConfig(
            n_routed_experts=int(r.first(("n_routed_experts", "num_local_experts", "num_experts"), 256 if v3 else 64)),
            top_k=top_k,
            expert_dim=int(r.opt("moe_intermediate_size", 2048 if v3 else 1407)),
            n_shared_experts=int(r.opt("n_shared_experts", {1: 0, 2: 2, 3: 1}[version])),
            score_func=r.opt("scoring_func", "sigmoid" if v3 else "softmax"),
            norm_topk_prob=bool(r.opt("norm_topk_prob", v3)) and (top_k > 1 or renorm_top1),
            routed_scaling_factor=float(r.opt("routed_scaling_factor", 2.5 if v3 else 1.0)),
            n_group=int(r.opt("n_group", 1)) if grouped else 1,
            topk_group=int(r.opt("topk_group", 1)) if grouped else 1,
            group_score="max" if method == "group_limited_greedy" else "top2_sum",  # V2 takes a group's best score
            balance=balance,
            **({"aux_loss_coef": alpha} if balance == "aux" else {"seq_aux_loss_coef": alpha}),
        )
    if version == 1:
        attention = AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", heads)),
                                    rope_theta=theta, rope_scaling=scaling)
    else:
        attention = MLAConfig(
            n_heads=heads, q_lora_rank=r.data["q_lora_rank"] if "q_lora_rank" in r.data else 1536,
            kv_lora_rank=int(r.opt("kv_lora_rank", 512)), qk_nope_head_dim=int(r.opt("qk_nope_head_dim", 128)),
            qk_rope_head_dim=int(r.opt("qk_rope_head_dim", 64)), v_head_dim=int(r.opt("v_head_dim", 128)),
            rope_theta=theta, rope_scaling=scaling, rope_interleave=bool(r.opt("rope_interleave", True)),
        )
    n_mtp = int(r.first(("num_nextn_predict_layers", "num_mtp_layers"), 0)) if v3 else 0
    layout = LayoutConfig(first_k_dense=int(r.opt("first_k_dense_replace", 3 if v3 else 0)),
                          moe_layer_freq=int(r.opt("moe_layer_freq", 1)), n_mtp_modules=n_mtp)
    return ModelConfig(**common, ffn_dim=int(r.opt("intermediate_size", 18432 if v3 else 11008)),
                       attention=attention, moe=moe, layout=layout)


def write(c: ModelConfig, model_type: str) -> dict[str, Any]:
    """transformers' DeepseekV2 or V3 config.json (it has no version 1)."""
    v3 = model_type == "deepseek_v3"
    out = moe_out(c, model_type, shared_experts=True, dense_layers=True, aux_free=v3)
    a, m, lay = c.attention, c.moe, c.layout
    require(model_type, isinstance(a, MLAConfig) and a.rotary, "attention", "the family uses MLA with rotary keys")
    require(model_type, lay.moe_layers is None, "layout.moe_layers", "layout is first_k_dense + frequency")
    require(model_type, not m.shared_expert_gate and m.shared_expert_dim in (None, m.expert_dim),
            "moe.shared_expert_dim", "shared experts are ungated and as wide as routed ones")
    require(model_type, v3 or m.top_k > 1 or not m.norm_topk_prob, "moe.norm_topk_prob",
            "transformers' DeepseekV2 does not renormalise a single expert's weight")
    if v3:
        require(model_type, m.score_func == "sigmoid" and m.balance == "aux_free" and m.group_score == "top2_sum",
                "moe", "sigmoid scores, aux-free bias and top-2-sum group scores (noaux_tc)")
    else:
        require(model_type, m.score_func == "softmax" and (m.group_score == "max" or m.n_group == 1)
                and lay.n_mtp_modules == 0, "moe", "softmax scores, max group scores, no MTP")
    method = "noaux_tc" if v3 else ("group_limited_greedy" if m.n_group > 1 else "greedy")
    out.update(num_attention_heads=a.n_heads, num_key_value_heads=a.n_heads, q_lora_rank=a.q_lora_rank,
               kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
               qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, head_dim=a.qk_rope_head_dim,
               rope_interleave=a.rope_interleave, **rope_out(a),
               intermediate_size=c.ffn_dim, moe_intermediate_size=m.expert_dim,
               n_routed_experts=m.n_routed_experts, n_shared_experts=m.n_shared_experts,
               num_experts_per_tok=m.top_k, routed_scaling_factor=m.routed_scaling_factor, n_group=m.n_group,
               topk_group=m.topk_group, topk_method=method, norm_topk_prob=m.norm_topk_prob,
               scoring_func=m.score_func, first_k_dense_replace=lay.first_k_dense,
               moe_layer_freq=lay.moe_layer_freq, seq_aux=m.balance in ("seq_aux", "aux_free"),
               aux_loss_alpha=m.aux_loss_coef if m.balance == "aux" else m.seq_aux_loss_coef)
    if v3:
        out["num_nextn_predict_layers"] = lay.n_mtp_modules
    return out


MOE = {**ROUTED_MLP, "ffn.router.expert_bias": "mlp.gate.e_score_correction_bias",
       "ffn.shared.gate": "mlp.shared_experts.gate_proj", "ffn.shared.up": "mlp.shared_experts.up_proj",
       "ffn.shared.down": "mlp.shared_experts.down_proj"}
# V3's MTP layer L = n_layers + d holds a whole block plus these; its embed_tokens and shared_head.head repeat the
# model's embedding and head.
MTP = {"hidden_norm": "hnorm", "embed_norm": "enorm", "norm": "shared_head.norm", "proj": "eh_proj"}
V1_KEYS = llama_key_map(GQA, MOE, MLP_EXPERTS)
V3_KEYS = llama_key_map(MLA, MOE, MLP_EXPERTS, mtp=MTP)  # V2's too: it has no MTP layer to name

FAMILIES = (
    Family("deepseek", lambda r: read(r, version=1), V1_KEYS),  # DeepSeekMoE 16B (remote code)
    Family("deepseek_v2", lambda r: read(r, version=2), V3_KEYS, lambda c: write(c, "deepseek_v2"),
           "DeepseekV2ForCausalLM"),
    Family("deepseek_v3", lambda r: read(r, version=3, renorm_top1=True), V3_KEYS, lambda c: write(c, "deepseek_v3"),
           "DeepseekV3ForCausalLM"),
    Family("kimi_k2", lambda r: read(r, version=3), V3_KEYS),  # remote code with V3's architecture
)
