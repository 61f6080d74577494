"""Hugging Face ``config.json`` -> ModelConfig: one reading function per family, keyed by ``model_type``
(smoe.interop.hf_config dispatches, bounds-checks first, and writes the other direction). No torch import. The MoE
families, and the dense Llama family (``DENSE_FAMILIES``: Llama, Mistral, Qwen2), which dense-to-MoE upcycling
starts from (smoe.upcycling).

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
from typing import Any, Callable

from smoe.config import AttentionConfig, LayoutConfig, MLAConfig, ModelConfig, MoEConfig, RopeScaling


class Reader:
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

    def sub(self, key: str) -> "Reader":
        return Reader(self.opt(key, {}), f"{self.source} [{key}]")

    def reject(self, *keys: str, why: str) -> None:
        """Raise if any of ``keys`` is set truthy: a feature our config does not have."""
        for key in keys:
            if self.opt(key, False):
                raise ValueError(f"{self.source}: {key}={self.data[key]!r} is not supported ({why})")


def _rope(r: Reader, default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
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


def _common(r: Reader, *, eps: float, max_pos: int) -> dict[str, Any]:
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


def _head_dim(r: Reader, heads: int) -> int | None:
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


def _sliding(r: Reader, slides: Callable[[int], bool] | None = None) -> int | None:
    """The window of ``use_sliding_window``. ``slides(i)``: whether layer i slides when config.json lists no
    ``layer_types`` (the family's rule, from its transformers config class); None: every layer does."""
    if not r.opt("use_sliding_window", False):
        return None
    if slides is not None:  # a per-layer choice we cannot hold unless it picks every layer
        n = int(r.req("num_hidden_layers"))
        types = r.opt("layer_types") or ["sliding_attention" if slides(i) else "full_attention" for i in range(n)]
        if any(t != "sliding_attention" for t in types):
            raise ValueError(f"{r.source}: use_sliding_window=true with full attention on some layers is not "
                             "supported (one sliding window for every layer only)")
    return int(r.opt("sliding_window", 4096))


def _mixtral(r: Reader) -> ModelConfig:
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


def _qwen_layout(r: Reader, n_layers: int) -> LayoutConfig:
    step = int(r.opt("decoder_sparse_step", 1))
    dense = set(r.opt("mlp_only_layers", []))
    if step == 1 and not dense:
        return LayoutConfig()
    return LayoutConfig(moe_layers=tuple(i for i in range(n_layers) if i not in dense and (i + 1) % step == 0))


def _qwen2_moe(r: Reader) -> ModelConfig:
    theta, scaling = _rope(r)
    common = _common(r, eps=1e-6, max_pos=32768)
    shared = int(r.opt("shared_expert_intermediate_size", 5632))
    config = ModelConfig(
        **common,
        ffn_dim=int(r.opt("intermediate_size", 5632)),
        attention=AttentionConfig(n_heads=int(r.req("num_attention_heads")),
                                  n_kv_heads=int(r.opt("num_key_value_heads", 16)), rope_theta=theta,
                                  rope_scaling=scaling, qkv_bias=bool(r.opt("qkv_bias", True)),
                                  sliding_window=_sliding(r, lambda i: bool((i + 1) % 2) and i < int(
                                      r.opt("max_window_layers", 28)))),  # every other layer, below it
        moe=MoEConfig(n_routed_experts=int(r.first(("num_experts", "num_local_experts"), 60)),
                      top_k=int(r.opt("num_experts_per_tok", 4)), expert_dim=int(r.opt("moe_intermediate_size", 1408)),
                      n_shared_experts=1 if shared else 0, shared_expert_dim=shared or None,
                      shared_expert_gate=bool(shared), norm_topk_prob=bool(r.opt("norm_topk_prob", False))),
        layout=_qwen_layout(r, common["n_layers"]),
    )
    return _with_hf_aux(config, float(r.opt("router_aux_loss_coef", 0.001)))


_O_BIAS = "our attention has biases on q, k, v only, not on the output projection"


def _qwen3_moe(r: Reader) -> ModelConfig:
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


def _deepseek(r: Reader, version: int, renorm_top1: bool = False) -> ModelConfig:
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


def _olmoe(r: Reader) -> ModelConfig:
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


def _dbrx(r: Reader) -> ModelConfig:
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


def _minimax_m2(r: Reader) -> ModelConfig:
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


def _dense(r: Reader, *, ffn_dim: int, kv_heads: int | None, max_pos: int, qkv_bias: bool = False,
           sliding: int | None = None) -> ModelConfig:
    """The dense Llama family (Llama, Mistral, Qwen2): GQA with RoPE and a SwiGLU FFN in every layer, no MoE.
    ``kv_heads`` None: as many as the query heads (Llama's default)."""
    theta, scaling = _rope(r)
    heads = int(r.req("num_attention_heads"))
    return ModelConfig(
        **_common(r, eps=1e-6, max_pos=max_pos),
        ffn_dim=int(r.opt("intermediate_size", ffn_dim)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", kv_heads or heads)),
                                  head_dim=_head_dim(r, heads), rope_theta=theta, rope_scaling=scaling,
                                  qkv_bias=qkv_bias, sliding_window=sliding),
        moe=None,
    )


def _llama(r: Reader) -> ModelConfig:
    r.reject("attention_bias", "mlp_bias", why="Llama's optional biases (ours: on q, k, v only, none on the MLP)")
    return _dense(r, ffn_dim=11008, kv_heads=None, max_pos=2048)


def _mistral(r: Reader) -> ModelConfig:
    # MistralConfig's sliding_window defaults to 4096 when the key is absent; null (v0.2 on) turns it off.
    window = r.data["sliding_window"] if "sliding_window" in r.data else 4096
    return _dense(r, ffn_dim=14336, kv_heads=8, max_pos=4096 * 32, sliding=None if window is None else int(window))


def _qwen2(r: Reader) -> ModelConfig:
    # Qwen2 always biases q, k and v (not o); its sliding layers are those from max_window_layers on.
    window = _sliding(r, lambda i: i >= int(r.opt("max_window_layers", 28)))
    return _dense(r, ffn_dim=22016, kv_heads=32, max_pos=32768, qkv_bias=True, sliding=window)


FAMILIES: dict[str, Callable[[Reader], ModelConfig]] = {
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
    "llama": _llama,  # the dense families: what smoe.upcycle starts from
    "mistral": _mistral,
    "qwen2": _qwen2,
}
DENSE_FAMILIES = ("llama", "mistral", "qwen2")
TRANSFORMERS_FAMILIES = tuple(t for t in FAMILIES if t not in ("deepseek", "kimi_k2"))  # built into transformers
