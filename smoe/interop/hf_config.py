"""Hugging Face ``config.json`` <-> ModelConfig, one mapping function per family (no torch import).

Reading: the keys that fix a model's size (``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``; DBRX's ``d_model``, ``n_layers``, ``n_heads``) are required; any other absent key takes the
default of that family's transformers config class, as transformers itself would. What our config cannot express
(a bias on the attention output, sliding windows on some layers only) raises naming the key instead of being dropped.

Balance coefficients: transformers' Switch-style loss (``router_aux_loss_coef``, DBRX ``moe_loss_weight``) pools the
router statistics of all L MoE layers into one loss and counts f_i per token, so it is top_k times our per-layer
loss and spread over L layers, while ours is summed over layers (smoe.moe.balance). ``aux_loss_coef =
router_aux_loss_coef * top_k / L`` gives every router the same gradient. DeepSeek's ``aux_loss_alpha`` is already
per layer and per assignment, so it maps unchanged.

Top-1 renormalisation: Mixtral, MiniMax-M2 and DBRX (``moe_normalize_expert_weights``) always renormalise the
top-k weights, Qwen, OLMoE and transformers' DeepseekV3 when ``norm_topk_prob``, at k = 1 too, where every weight is
then a constant. We keep that exactly, for logit parity, though the LM loss cannot train such a router
(``MoEConfig.gate_is_constant``). DeepSeek's own code (DeepSeekMoE, V2, Kimi K2's copy of V3) renormalises only when
``top_k > 1 and norm_topk_prob`` and transformers' DeepseekV2 never does, so at k = 1 those map to
``norm_topk_prob=False``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from smoe.config import AttentionConfig, LayoutConfig, MLAConfig, ModelConfig, MoEConfig, RopeScaling
from smoe.io.files import read_json


class _Reader:
    """Reads keys from one config dict; a missing required key raises naming the file and the key."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data, self.source = data, source

    def req(self, key: str) -> Any:
        if self.data.get(key) is None:
            raise ValueError(f"{self.source}: missing required key {key!r} for model_type "
                             f"{self.data.get('model_type')!r}")
        return self.data[key]

    def opt(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def first(self, keys: tuple[str, ...], default: Any = None) -> Any:
        """The first present key among aliases (transformers versions save some keys under other names)."""
        return next((self.data[k] for k in keys if self.data.get(k) is not None), default)

    def sub(self, key: str) -> "_Reader":
        return _Reader(self.opt(key, {}), f"{self.source} [{key}]")

    def reject(self, *keys: str, why: str) -> None:
        """Raise if any of ``keys`` is set truthy: a feature our config does not have."""
        for key in keys:
            if self.opt(key, False):
                raise ValueError(f"{self.source}: {key}={self.data[key]!r} is not supported ({why})")


def _rope(r: _Reader, default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
    params = r.opt("rope_parameters", {}) or {}
    theta = float(r.opt("rope_theta", params.get("rope_theta", default_theta)))
    scaling = r.opt("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=float(scaling["factor"]))
    if kind == "yarn":
        return theta, RopeScaling(
            type="yarn", factor=float(scaling["factor"]),
            original_max_seq_len=int(scaling.get("original_max_position_embeddings", 4096)),
            beta_fast=float(scaling.get("beta_fast", 32.0)), beta_slow=float(scaling.get("beta_slow", 1.0)),
            mscale=float(scaling.get("mscale", 1.0)), mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0)),
        )
    raise ValueError(f"{r.source}: rope scaling type {kind!r} is not supported (supported: default, linear, yarn)")


def _common(r: _Reader, *, eps: float, max_pos: int) -> dict[str, Any]:
    """The fields every GQA/MLA family spells the same way; ``eps`` and ``max_pos`` are the family's defaults."""
    return dict(
        vocab_size=int(r.req("vocab_size")),
        dim=int(r.req("hidden_size")),
        n_layers=int(r.req("num_hidden_layers")),
        norm_eps=float(r.opt("rms_norm_eps", eps)),
        tie_embeddings=bool(r.opt("tie_word_embeddings", False)),
        init_std=float(r.opt("initializer_range", 0.02)),
        max_seq_len=int(r.opt("max_position_embeddings", max_pos)),
        activation=_activation(r.opt("hidden_act", "silu"), r.source),
        name=r.data["model_type"],
    )


def _head_dim(r: _Reader, heads: int) -> int | None:
    """head_dim as our config holds it: None when it is simply hidden_size / heads."""
    head_dim = r.opt("head_dim")
    return None if head_dim is None or head_dim * heads == r.req("hidden_size") else int(head_dim)


def _activation(act: str, source: str) -> str:
    if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh"):
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (silu, gelu)")
    return "silu" if act in ("silu", "swish") else "gelu"


def _with_hf_aux(config: ModelConfig, hf_coef: float) -> ModelConfig:
    """Set aux_loss_coef from transformers' pooled Switch loss coefficient (see the module docstring)."""
    n_moe = max(config.n_moe_layers, 1)
    return replace(config, moe=replace(config.moe, aux_loss_coef=hf_coef * config.moe.top_k / n_moe))


def _sliding(r: _Reader, *, qwen2: bool = False) -> int | None:
    if not r.opt("use_sliding_window", False):
        return None
    if qwen2:  # Qwen2-MoE slides on every other layer below max_window_layers: a per-layer choice we cannot hold
        n = int(r.req("num_hidden_layers"))
        types = r.opt("layer_types") or ["sliding_attention" if (i + 1) % 2 and i < int(r.opt("max_window_layers", 28))
                                         else "full_attention" for i in range(n)]
        if any(t != "sliding_attention" for t in types):
            raise ValueError(f"{r.source}: use_sliding_window=true with full attention on some layers is not "
                             "supported (one sliding window for every layer only)")
    return int(r.opt("sliding_window", 4096))


def _mixtral(r: _Reader) -> ModelConfig:
    theta, scaling = _rope(r, 1e6)
    heads = int(r.req("num_attention_heads"))
    config = ModelConfig(
        **_common(r, eps=1e-5, max_pos=4096 * 32),
        ffn_dim=int(r.opt("intermediate_size", 14336)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", 8)),
                                  head_dim=_head_dim(r, heads), rope_theta=theta, rope_scaling=scaling,
                                  sliding_window=r.opt("sliding_window")),
        moe=MoEConfig(n_routed_experts=int(r.first(("num_local_experts", "num_experts"), 8)),
                      top_k=int(r.opt("num_experts_per_tok", 2)), expert_dim=int(r.opt("intermediate_size", 14336))),
    )
    return _with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.001)))


def _qwen_layout(r: _Reader, n_layers: int) -> LayoutConfig:
    step = int(r.opt("decoder_sparse_step", 1))
    dense = set(r.opt("mlp_only_layers", []))
    if step == 1 and not dense:
        return LayoutConfig()
    return LayoutConfig(moe_layers=tuple(i for i in range(n_layers) if i not in dense and (i + 1) % step == 0))


def _qwen2_moe(r: _Reader) -> ModelConfig:
    theta, scaling = _rope(r)
    common = _common(r, eps=1e-6, max_pos=32768)
    shared = int(r.opt("shared_expert_intermediate_size", 5632))
    config = ModelConfig(
        **common,
        ffn_dim=int(r.opt("intermediate_size", 5632)),
        attention=AttentionConfig(n_heads=int(r.req("num_attention_heads")),
                                  n_kv_heads=int(r.opt("num_key_value_heads", 16)), rope_theta=theta,
                                  rope_scaling=scaling, qkv_bias=bool(r.opt("qkv_bias", True)),
                                  sliding_window=_sliding(r, qwen2=True)),
        moe=MoEConfig(n_routed_experts=int(r.first(("num_experts", "num_local_experts"), 60)),
                      top_k=int(r.opt("num_experts_per_tok", 4)), expert_dim=int(r.opt("moe_intermediate_size", 1408)),
                      n_shared_experts=1 if shared else 0, shared_expert_dim=shared or None,
                      shared_expert_gate=bool(shared), norm_topk_prob=bool(r.opt("norm_topk_prob", False))),
        layout=_qwen_layout(r, common["n_layers"]),
    )
    return _with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.001)))


_O_BIAS = "our attention has biases on q, k, v only, not on the output projection"


def _qwen3_moe(r: _Reader) -> ModelConfig:
    r.reject("attention_bias", why=_O_BIAS)
    theta, scaling = _rope(r)
    common = _common(r, eps=1e-6, max_pos=32768)
    heads = int(r.req("num_attention_heads"))
    config = ModelConfig(
        **common,
        ffn_dim=int(r.opt("intermediate_size", 6144)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", 4)),
                                  head_dim=_head_dim(r, heads), rope_theta=theta, rope_scaling=scaling,
                                  qk_norm="head", sliding_window=_sliding(r)),
        moe=MoEConfig(n_routed_experts=int(r.first(("num_experts", "num_local_experts"), 128)),
                      top_k=int(r.opt("num_experts_per_tok", 8)), expert_dim=int(r.opt("moe_intermediate_size", 768)),
                      norm_topk_prob=bool(r.opt("norm_topk_prob", False))),
        layout=_qwen_layout(r, common["n_layers"]),
    )
    return _with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.001)))


def _deepseek(r: _Reader, version: int, renorm_top1: bool = False) -> ModelConfig:
    """DeepSeekMoE (version 1, remote-code ``deepseek``: MHA), DeepSeek-V2 and V3 (MLA). Defaults are those of
    transformers' DeepseekV2/V3 configs, and of DeepSeek's own configuration_deepseek.py for version 1.
    ``renorm_top1``: the code that runs this model_type renormalises at top_k = 1 (module docstring)."""
    r.reject("attention_bias", "mlp_bias", why="DeepSeek's biases on the attention and MLP projections")
    v3 = version == 3
    theta, scaling = _rope(r)
    common = _common(r, eps=1e-6, max_pos=4096 if v3 else 2048)
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


def _olmoe(r: _Reader) -> ModelConfig:
    r.reject("attention_bias", why=_O_BIAS)
    theta, scaling = _rope(r)
    heads = int(r.req("num_attention_heads"))
    config = ModelConfig(
        **_common(r, eps=1e-5, max_pos=4096),
        ffn_dim=int(r.opt("intermediate_size", 2048)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", heads)),
                                  rope_theta=theta, rope_scaling=scaling, qk_norm="full", clip_qkv=r.opt("clip_qkv")),
        moe=MoEConfig(n_routed_experts=int(r.first(("num_experts", "num_local_experts"), 64)),
                      top_k=int(r.opt("num_experts_per_tok", 8)), expert_dim=int(r.opt("intermediate_size", 2048)),
                      norm_topk_prob=bool(r.opt("norm_topk_prob", False)),
                      z_loss_coef=float(r.opt("router_z_loss_coef", 0.0))),
    )
    return _with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.01)))


def _dbrx(r: _Reader) -> ModelConfig:
    attn, ffn = r.sub("attn_config"), r.sub("ffn_config")
    theta, scaling = _rope(attn if "rope_theta" in attn.data else r)
    normalize = ffn.opt("moe_normalize_expert_weights", 1.0)
    if normalize not in (None, 1, 1.0):
        raise ValueError(f"{ffn.source}: moe_normalize_expert_weights={normalize} is not supported (1 or null)")
    hidden = int(ffn.opt("ffn_hidden_size", 3584))
    config = ModelConfig(
        vocab_size=int(r.req("vocab_size")), dim=int(r.req("d_model")), n_layers=int(r.req("n_layers")),
        ffn_dim=hidden, activation=_activation((ffn.opt("ffn_act_fn") or {}).get("name", "silu"), ffn.source),
        norm="layernorm", norm_eps=1e-5, tie_embeddings=bool(r.opt("tie_word_embeddings", False)),
        init_std=float(r.opt("initializer_range", 0.02)), max_seq_len=int(r.opt("max_seq_len", 2048)),
        attention=AttentionConfig(n_heads=int(r.req("n_heads")), n_kv_heads=int(attn.opt("kv_n_heads", 1)),
                                  rope_theta=theta, rope_scaling=scaling, clip_qkv=attn.opt("clip_qkv")),
        moe=MoEConfig(n_routed_experts=int(ffn.opt("moe_num_experts", 4)), top_k=int(ffn.opt("moe_top_k", 1)),
                      expert_dim=hidden, norm_topk_prob=normalize is not None),
        name="dbrx",
    )
    return _with_hf_aux(config, float(ffn.opt("moe_loss_weight", 0.01)))


def _minimax_m2(r: _Reader) -> ModelConfig:
    theta, scaling = _rope(r)
    common = _common(r, eps=1e-6, max_pos=196608)
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


FAMILIES: dict[str, Callable[[_Reader], ModelConfig]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek": lambda r: _deepseek(r, version=1),  # DeepSeekMoE 16B (remote code)
    "deepseek_v2": lambda r: _deepseek(r, version=2),
    "deepseek_v3": lambda r: _deepseek(r, version=3, renorm_top1=True),  # transformers' class
    "kimi_k2": lambda r: _deepseek(r, version=3),  # remote code with V3's architecture
    "olmoe": _olmoe,
    "dbrx": _dbrx,
    "minimax_m2": _minimax_m2,
}
TRANSFORMERS_FAMILIES = tuple(t for t in FAMILIES if t not in ("deepseek", "kimi_k2"))  # built into transformers


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
        return FAMILIES[model_type](_Reader(hf, source)).validate()
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
    if c.moe is None:
        _unsupported(model_type, "moe", "a dense model")
    if c.activation != "silu":
        _unsupported(model_type, "activation", f"{c.activation!r}; the family uses silu")
    if c.norm != "rmsnorm" and model_type != "dbrx":
        _unsupported(model_type, "norm", "the family uses RMSNorm")
    if c.layout.dense_residual:
        _unsupported(model_type, "layout.dense_residual", "no dense residual FFN in this family")
    m = c.moe
    if m.routing != "token_choice" or m.capacity_factor is not None or m.router_bias:
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


def _require(model_type: str, ok: bool, path: str, why: str) -> None:
    if not ok:
        _unsupported(model_type, path, why)


def config_to_hf(config: ModelConfig, model_type: str) -> dict[str, Any]:
    """The Hugging Face config.json of ``model_type`` describing ``config``; raises naming the field that the
    family cannot express. ``config_from_hf(config_to_hf(c, t))`` gives ``c`` back (up to name and defaults)."""
    c, m, lay = config, config.moe, config.layout
    if model_type not in TRANSFORMERS_FAMILIES:
        raise ValueError(f"model_type: unsupported {model_type!r}; supported: {', '.join(TRANSFORMERS_FAMILIES)}")
    out = _base_out(c, model_type)
    # transformers' pooled loss coefficient (module docstring); 12 digits keep 0.001 from printing as 0.00099999...
    hf_aux = float(f"{m.aux_loss_coef * max(c.n_moe_layers, 1) / m.top_k:.12g}")
    plain_layout = lay.first_k_dense == 0 and lay.moe_layer_freq == 1 and lay.moe_layers is None
    softmax_plain = m.score_func == "softmax" and m.n_group == 1 and m.routed_scaling_factor == 1.0
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
        _require(model_type, softmax_plain, "moe.score_func", "softmax routing without groups or scaling")
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
        _require(model_type, softmax_plain, "moe.score_func", "softmax routing without groups or scaling")
        out.update(_gqa_out(c, model_type, "full", False), intermediate_size=m.expert_dim,
                   num_experts=m.n_routed_experts, num_experts_per_tok=k, norm_topk_prob=m.norm_topk_prob,
                   router_aux_loss_coef=hf_aux, router_z_loss_coef=m.z_loss_coef, attention_bias=False,
                   clip_qkv=c.attention.clip_qkv)
    elif model_type == "minimax_m2":
        _require(model_type, m.score_func == "sigmoid" and m.balance == "aux_free" and m.norm_topk_prob
                 and m.n_group == 1 and m.routed_scaling_factor == 1.0, "moe",
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
