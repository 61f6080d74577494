"""Hugging Face ``config.json`` <-> ModelConfig (no torch import): ``config_from_hf`` checks the integers against
bounds, then reads with the family's function (smoe.interop.hf_families, where the reading conventions are
described); ``config_to_hf`` writes a family's config.json, refusing what the family cannot express.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smoe.config import AttentionConfig, MLAConfig, ModelConfig
from smoe.interop.hf_families import DENSE_FAMILIES, FAMILIES, TRANSFORMERS_FAMILIES, Reader
from smoe.io.files import read_json

# Upper bounds on the integers of a config.json, checked before anything is built from them: some work (the layer
# lists of a layout, the pieces of a checkpoint, a model on the meta device) grows with them, so a tiny file claiming
# 10^9 layers must be refused, not obeyed. Each bound is many times the largest published model's (about 128 layers,
# Kimi K2's 384 routed experts, 16384-wide models and 53248-wide FFNs, vocabularies of 256k, contexts of 10M tokens),
# so no plausible model hits one. DBRX nests some of its keys in attn_config / ffn_config; rope_scaling holds one.
_LAYERS, _EXPERTS, _WIDTH, _VOCAB, _POSITIONS = 1024, 2**16, 2**20, 2**24, 2**24
_BOUNDS = {
    **dict.fromkeys(("num_hidden_layers", "n_layers", "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step",
                     "num_nextn_predict_layers", "num_mtp_layers"), _LAYERS),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
                     "moe_top_k", "n_shared_experts", "n_group", "topk_group", "num_attention_heads", "n_heads",
                     "num_key_value_heads", "kv_n_heads"), _EXPERTS),
    **dict.fromkeys(("hidden_size", "d_model", "intermediate_size", "moe_intermediate_size", "ffn_hidden_size",
                     "shared_expert_intermediate_size", "head_dim", "rotary_dim", "q_lora_rank", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"), _WIDTH),
    "vocab_size": _VOCAB,
    **dict.fromkeys(("max_position_embeddings", "max_seq_len", "sliding_window", "original_max_position_embeddings"),
                    _POSITIONS),
}


def _check_bounds(hf: dict[str, Any], source: str) -> None:
    """Every bounded key present (at the top level or one object down) is an integer in [0, bound]."""
    nested = [(f"{key}.", value) for key, value in hf.items() if isinstance(value, dict)]
    for prefix, data in [("", hf), *nested]:
        for key, bound in _BOUNDS.items():
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{source}: {prefix}{key} must be an integer, got {value!r}")
            if not 0 <= value <= bound:
                raise ValueError(f"{source}: {prefix}{key} = {value} is outside [0, {bound}], the bound smoe "
                                 "checks before building anything from it")


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map a Hugging Face config dict onto a validated ModelConfig; errors name ``source`` and the key. At top_k 1,
    each family's own renormalisation is kept exactly, constant gate included (module docstring)."""
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    _check_bounds(hf, source)
    try:
        return FAMILIES[model_type](Reader(hf, source)).validate()
    except ValueError as err:
        if str(err).startswith(source):
            raise
        raise ValueError(f"{source}: {err}") from None
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{source}: malformed {model_type} config ({type(err).__name__}: {err})") from None


def load_hf_config(path: str | Path) -> ModelConfig:
    """Read a config.json file, or the config.json inside a model directory."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file}: no such file" + (" (a directory without config.json)" if path.is_dir() else ""))
    return config_from_hf(read_json(file), str(file))


# --- ModelConfig -> config.json ----------------------------------------------------------------------------------


def _unsupported(model_type: str, path: str, why: str) -> None:
    raise ValueError(f"{path}: cannot be expressed as a Hugging Face {model_type} config ({why})")


def _rope_out(attn) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_theta": attn.rope_theta}
    s = attn.rope_scaling
    if s is not None and s.type != "default":
        scaling: dict[str, Any] = {"rope_type": s.type, "type": s.type, "factor": s.factor}
        if s.type == "yarn":
            scaling.update(original_max_position_embeddings=s.original_max_seq_len, beta_fast=s.beta_fast,
                           beta_slow=s.beta_slow, mscale=s.mscale, mscale_all_dim=s.mscale_all_dim)
        out["rope_scaling"] = scaling
    return out


def _base_out(c: ModelConfig, model_type: str) -> dict[str, Any]:
    dense = model_type in DENSE_FAMILIES
    if (c.moe is None) != dense:
        _unsupported(model_type, "moe", "a dense family: no experts" if dense else "a dense model")
    if c.activation != "silu":
        _unsupported(model_type, "activation", f"{c.activation!r}; the family uses silu")
    if c.norm != "rmsnorm" and model_type != "dbrx":
        _unsupported(model_type, "norm", "the family uses RMSNorm")
    m = c.moe
    if dense and c.layout.n_mtp_modules:
        _unsupported(model_type, "layout.n_mtp_modules", "no multi-token prediction in this family")
    elif not dense and c.layout.dense_residual:
        _unsupported(model_type, "layout.dense_residual", "no dense residual FFN in this family")
    elif not dense and (m.routing != "token_choice" or m.capacity_factor is not None or m.router_bias):
        _unsupported(model_type, "moe", "only dropless token-choice routing without a router logit bias")
    return {"model_type": model_type, "vocab_size": c.vocab_size, "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers, "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
            "initializer_range": c.init_std, "max_position_embeddings": c.max_seq_len, "hidden_act": "silu"}


def _gqa_out(c: ModelConfig, model_type: str, qk_norm: str, bias: bool | None) -> dict[str, Any]:
    a = c.attention
    if not isinstance(a, AttentionConfig):
        _unsupported(model_type, "attention", "the family uses GQA, not MLA")
    if a.qk_norm != qk_norm:
        _unsupported(model_type, "attention.qk_norm", f"the family uses {qk_norm!r}")
    if bias is not None and a.qkv_bias != bias:
        _unsupported(model_type, "attention.qkv_bias", f"the family uses {bias}")
    if a.clip_qkv is not None and model_type not in ("olmoe", "dbrx"):
        _unsupported(model_type, "attention.clip_qkv", "not in this family")
    if a.rotary_dim is not None and model_type != "minimax_m2":
        _unsupported(model_type, "attention.rotary_dim", "partial rotary is not in this family")
    return {"num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
            "head_dim": a.resolved_head_dim(c.dim), **_rope_out(a)}


def _dense_out(c: ModelConfig, model_type: str) -> dict[str, Any]:
    """The keys of a dense Llama-family config.json beyond _base_out's (Qwen2 biases q, k and v; Llama and Mistral
    nothing; only Mistral and Qwen2 slide, every layer or none)."""
    window = c.attention.sliding_window if isinstance(c.attention, AttentionConfig) else None
    _require(model_type, window is None or model_type != "llama", "attention.sliding_window",
             "Llama has no sliding window")
    out = {**_gqa_out(c, model_type, "none", model_type == "qwen2"), "intermediate_size": c.ffn_dim}
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        out["sliding_window"] = window
    else:  # Qwen2 slides on the layers from max_window_layers on: all of them, or none
        out.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
    return out


def _require(model_type: str, ok: bool, path: str, why: str) -> None:
    if not ok:
        _unsupported(model_type, path, why)


def check_exportable(config: ModelConfig) -> None:
    """What no family can express: smoe's int8/int4 weights."""
    if config.quantization is not None:
        raise ValueError(f"quantization: a {config.quantization.scheme} model is stored in smoe's own format, which "
                         "transformers does not read; export the full-precision checkpoint")


def config_to_hf(config: ModelConfig, model_type: str) -> dict[str, Any]:
    """The Hugging Face config.json of ``model_type`` describing ``config``; raises naming the field that the
    family cannot express. ``config_from_hf(config_to_hf(c, t))`` gives ``c`` back (up to name and defaults, and a
    routed_scaling_factor the family lacks, which the exported weights carry instead)."""
    c, m, lay = config, config.moe, config.layout
    if model_type not in TRANSFORMERS_FAMILIES:
        raise ValueError(f"model_type: unsupported {model_type!r}; supported: {', '.join(TRANSFORMERS_FAMILIES)}")
    check_exportable(c)
    out = _base_out(c, model_type)
    if model_type in DENSE_FAMILIES:
        return {**out, **_dense_out(c, model_type)}
    # transformers' pooled loss coefficient (module docstring); 12 digits keep 0.001 from printing as 0.00099999...
    hf_aux = float(f"{m.aux_loss_coef * max(c.n_moe_layers, 1) / m.top_k:.12g}")
    plain_layout = lay.first_k_dense == 0 and lay.moe_layer_freq == 1 and lay.moe_layers is None
    # A routed_scaling_factor the family lacks is folded into the experts' down projections on export
    # (smoe.interop.hf.save_pretrained), so it is not refused here.
    softmax_plain = m.score_func == "softmax" and m.n_group == 1
    no_shared = m.n_shared_experts == 0
    if model_type in ("mixtral", "qwen3_moe", "olmoe", "minimax_m2", "dbrx"):
        _require(model_type, no_shared, "moe.n_shared_experts", "no shared experts in this family")
    if model_type in ("mixtral", "olmoe", "minimax_m2", "dbrx"):
        _require(model_type, plain_layout, "layout", "every layer is MoE in this family")
    if model_type not in ("deepseek_v3", "minimax_m2"):
        _require(model_type, m.balance != "aux_free", "moe.balance", "no expert selection bias in this family")
    k = m.top_k
    if model_type == "mixtral":
        _require(model_type, softmax_plain and m.norm_topk_prob, "moe.score_func",
                 "softmax top-k renormalised only")
        out.update(_gqa_out(c, model_type, "none", False), intermediate_size=m.expert_dim,
                   num_local_experts=m.n_routed_experts, num_experts_per_tok=k,
                   router_aux_loss_coef=hf_aux, sliding_window=c.attention.sliding_window)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        _require(model_type, softmax_plain, "moe.score_func", "softmax routing without groups")
        qwen2 = model_type == "qwen2_moe"
        out.update(_gqa_out(c, model_type, "none" if qwen2 else "head", None if qwen2 else False),
                   intermediate_size=c.ffn_dim,
                   moe_intermediate_size=m.expert_dim, num_experts=m.n_routed_experts, num_experts_per_tok=k,
                   norm_topk_prob=m.norm_topk_prob, router_aux_loss_coef=hf_aux,
                   decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(c.n_layers) if not (c.moe is not None and lay.is_moe(i))],
                   use_sliding_window=c.attention.sliding_window is not None,
                   sliding_window=c.attention.sliding_window)
        if qwen2:
            _require(model_type, m.n_shared_experts <= 1 and m.shared_expert_gate == bool(m.n_shared_experts),
                     "moe.shared_expert_gate", "one gated shared expert (or none)")
            out.update(qkv_bias=c.attention.qkv_bias,
                       shared_expert_intermediate_size=m.resolved_shared_expert_dim * m.n_shared_experts)
        else:
            out["attention_bias"] = False
    elif model_type in ("deepseek_v2", "deepseek_v3"):
        a = c.attention
        _require(model_type, isinstance(a, MLAConfig), "attention", "the family uses MLA")
        _require(model_type, lay.moe_layers is None, "layout.moe_layers", "layout is first_k_dense + frequency")
        _require(model_type, not m.shared_expert_gate and m.shared_expert_dim in (None, m.expert_dim),
                 "moe.shared_expert_dim", "shared experts are ungated and as wide as routed ones")
        v3 = model_type == "deepseek_v3"
        _require(model_type, v3 or k > 1 or not m.norm_topk_prob, "moe.norm_topk_prob",
                 "transformers' DeepseekV2 does not renormalise a single expert's weight")
        if v3:
            _require(model_type, m.score_func == "sigmoid" and m.balance == "aux_free" and m.group_score == "top2_sum",
                     "moe", "sigmoid scores, aux-free bias and top-2-sum group scores (noaux_tc)")
        else:
            _require(model_type, m.score_func == "softmax" and (m.group_score == "max" or m.n_group == 1)
                     and lay.n_mtp_modules == 0, "moe", "softmax scores, max group scores, no MTP")
        method = "noaux_tc" if v3 else ("group_limited_greedy" if m.n_group > 1 else "greedy")
        out.update(num_attention_heads=a.n_heads, num_key_value_heads=a.n_heads, q_lora_rank=a.q_lora_rank,
                   kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
                   qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, head_dim=a.qk_rope_head_dim,
                   rope_interleave=a.rope_interleave, **_rope_out(a),
                   intermediate_size=c.ffn_dim, moe_intermediate_size=m.expert_dim,
                   n_routed_experts=m.n_routed_experts, n_shared_experts=m.n_shared_experts,
                   num_experts_per_tok=k, routed_scaling_factor=m.routed_scaling_factor, n_group=m.n_group,
                   topk_group=m.topk_group, topk_method=method, norm_topk_prob=m.norm_topk_prob,
                   scoring_func=m.score_func, first_k_dense_replace=lay.first_k_dense,
                   moe_layer_freq=lay.moe_layer_freq, seq_aux=m.balance in ("seq_aux", "aux_free"),
                   aux_loss_alpha=m.aux_loss_coef if m.balance == "aux" else m.seq_aux_loss_coef)
        if v3:
            out["num_nextn_predict_layers"] = lay.n_mtp_modules
    elif model_type == "olmoe":
        _require(model_type, softmax_plain, "moe.score_func", "softmax routing without groups")
        out.update(_gqa_out(c, model_type, "full", False), intermediate_size=m.expert_dim,
                   num_experts=m.n_routed_experts, num_experts_per_tok=k, norm_topk_prob=m.norm_topk_prob,
                   router_aux_loss_coef=hf_aux, router_z_loss_coef=m.z_loss_coef, attention_bias=False,
                   clip_qkv=c.attention.clip_qkv)
    elif model_type == "minimax_m2":
        _require(model_type, m.score_func == "sigmoid" and m.balance == "aux_free" and m.norm_topk_prob
                 and m.n_group == 1, "moe",
                 "sigmoid scores with a selection bias, renormalised, no groups")
        out.update(_gqa_out(c, model_type, "full", False), intermediate_size=m.expert_dim,
                   num_local_experts=m.n_routed_experts, num_experts_per_tok=k,
                   rotary_dim=c.attention.rotary_dim or c.attention.resolved_head_dim(c.dim))
    else:  # dbrx
        a = c.attention
        _require(model_type, c.norm == "layernorm" and softmax_plain and m.norm_topk_prob, "norm",
                 "bias-free LayerNorm and softmax top-k renormalised")
        _gqa_out(c, model_type, "none", False)
        out = {"model_type": "dbrx", "vocab_size": c.vocab_size, "d_model": c.dim, "n_heads": a.n_heads,
               "n_layers": c.n_layers, "max_seq_len": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
               "initializer_range": c.init_std,
               "attn_config": {"kv_n_heads": a.n_kv_heads, "clip_qkv": a.clip_qkv, "rope_theta": a.rope_theta},
               # transformers 5 reads DBRX's theta from the top level and ignores attn_config's: write both.
               "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
               "ffn_config": {"ffn_hidden_size": m.expert_dim, "moe_num_experts": m.n_routed_experts,
                              "moe_top_k": k, "moe_normalize_expert_weights": 1.0,
                              "moe_loss_weight": hf_aux}}
    return out
