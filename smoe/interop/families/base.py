"""What several Hugging Face families share: ``Family`` (what a family module defines); ``Reader`` and the readers
of keys many families spell alike; the writers and checks of the other direction; ``KeyMap``, ``Piece`` and the
tensor names many families share. No torch import.

Balance coefficients: transformers' Switch-style loss (``router_aux_loss_coef``, DBRX ``moe_loss_weight``) pools the
router statistics of all L MoE layers into one loss and counts f_i per token, so it is top_k times our per-layer
loss and spread over L layers, while ours is summed over layers (smoe.moe.balance). ``aux_loss_coef =
router_aux_loss_coef * top_k / L`` gives every router the same gradient (``with_hf_aux``, ``pooled_aux_coef``).
DeepSeek's ``aux_loss_alpha`` is already per layer and per assignment, so it maps unchanged.

Tensors: every tensor of our model is assembled from *pieces*: a piece copies one Hugging Face tensor (or a view of
it: a row block of a fused QKV, an expert of a fused expert tensor, a transposed expert) into a region of one of our
tensors. Importing runs the pieces forwards, exporting backwards (smoe.interop.pieces, smoe.interop.hf), so the two
directions cannot disagree. The pieces come from a family's ``KeyMap``: renames of modules or tensors inside a
block, the block prefix, and the per-expert names that are stacked into our ``w_gate_up (E, 2F, D)`` (gate rows
first) and ``w_down (E, D, F)``.

Legend: E routed experts, F expert hidden dim, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from smoe.config import AttentionConfig, LayoutConfig, ModelConfig, MoEConfig, RopeScaling

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Family:
    """One Hugging Face ``model_type``: ``read`` maps its config.json (through a ``Reader``) to a ModelConfig;
    ``key_map`` names its tensors; ``write`` maps a ModelConfig back, raising naming the field the family cannot
    express, and ``architecture`` is transformers' class for it (both None: transformers has no such model, so
    nothing is exported as it)."""

    model_type: str
    read: Callable[[Reader], ModelConfig]
    key_map: KeyMap
    write: Callable[[ModelConfig], dict[str, Any]] | None = None
    architecture: str | None = None

    def __post_init__(self):
        if (self.write is None) != (self.architecture is None):  # a family-module bug, not a user error
            raise AssertionError(f"{self.model_type}: write and architecture come together (export writes both)")


# --- tensor names ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyMap:
    """How one family names its tensors. ``block`` maps our module (or tensor) names inside a transformer block to
    theirs, the longest matching prefix wins; ``experts`` are the per-expert tensor names (gate, up, down) with
    ``{e}``; ``fused`` builds pieces for tensors that are not plain renames (DBRX)."""

    top: dict[str, str]
    layer: str  # the block prefix, with {i}
    block: dict[str, str]
    experts: tuple[str, str, str] | None = None
    mtp: dict[str, str] = field(default_factory=dict)  # DeepSeek-V3 multi-token-prediction extras, per MTP layer
    fused: Callable[[ModelConfig, int, str], list[Piece]] | None = None
    shifted: str | None = None
    ignore: str | None = None
    aliases: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Piece:
    """``ours[index]`` <-> ``view(theirs)``: the unit both directions of a conversion are made of."""

    hf: str
    ours: str
    index: tuple = ()
    view: Callable[[torch.Tensor], torch.Tensor] | None = None
    load: bool = True  # False: a duplicate the checkpoint repeats (DeepSeek-V3's MTP embedding and head)
    shape: tuple[int, ...] | None = None  # theirs, when it is not ours[index]'s (a view's source, for export)
    offset: float = 0.0  # ours = theirs + offset (KeyMap.shifted)

    def source(self, t: torch.Tensor) -> torch.Tensor:
        return self.view(t) if self.view is not None else t


NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GQA = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
       "attn.wo": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
DENSE_MLP = {"ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj", "ffn.down": "mlp.down_proj"}
ROUTED_MLP = {**DENSE_MLP, "ffn.router": "mlp.gate"}  # dense layers' FFN and MoE layers' router, both under mlp.
MLA = {"attn.wq": "self_attn.q_proj", "attn.wq_a": "self_attn.q_a_proj", "attn.q_norm": "self_attn.q_a_layernorm",
       "attn.wq_b": "self_attn.q_b_proj", "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
       "attn.kv_norm": "self_attn.kv_a_layernorm", "attn.wkv_b": "self_attn.kv_b_proj", "attn.wo": "self_attn.o_proj"}
MLP_EXPERTS = tuple(f"mlp.experts.{{e}}.{w}_proj.weight" for w in ("gate", "up", "down"))
W_EXPERTS = tuple(f"block_sparse_moe.experts.{{e}}.{w}.weight" for w in ("w1", "w3", "w2"))  # Mixtral's


def interleaved(hf: str, parts: tuple[tuple[str, int], ...], groups: int, cols: tuple[int, ...]) -> list[Piece]:
    """The pieces of a fused weight whose rows repeat ``parts`` (our tensor, rows) once per group, in order: group
    g's rows of part ``(ours, n)`` are rows g n .. (g + 1) n of ``ours`` (Qwen3-Next's query and gate per head, its
    q, k, v, z and b, a per key head; MiniMax-01's q, k, v per head). ``cols``: the weight's other dims."""
    width = sum(n for _, n in parts)
    shape, pieces, start = (groups * width, *cols), [], 0
    for g in range(groups):
        for ours, n in parts:
            pieces.append(Piece(hf, ours, (slice(g * n, (g + 1) * n),), lambda t, a=start, b=start + n: t[a:b],
                                shape=shape))
            start += n
    return pieces


def llama_key_map(attention: dict[str, str], ffn: dict[str, str], experts: tuple[str, str, str] | None = None,
                  mtp: dict[str, str] | None = None) -> KeyMap:
    """Llama's names (``model.embed_tokens``, ``model.layers.{i}.`` with its two norms, ``lm_head``), which every
    family here but DBRX keeps, around the family's attention and FFN names."""
    return KeyMap({"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}, "model.layers.{i}.",
                  {**NORMS, **attention, **ffn}, experts, mtp or {})


# --- config.json -> ModelConfig ----------------------------------------------------------------------------------


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


O_BIAS = "our attention has biases on q, k, v only, not on the output projection"


def read_rope(r: Reader, default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
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


def read_common(r: Reader, *, eps: float, max_pos: int) -> dict[str, Any]:
    """The fields every GQA/MLA family spells the same way; ``eps`` and ``max_pos`` are the family's defaults."""
    return dict(
        vocab_size=int(r.req("vocab_size")),
        dim=int(r.req("hidden_size")),
        n_layers=int(r.req("num_hidden_layers")),
        norm_eps=float(r.opt("rms_norm_eps", eps)),
        tie_embeddings=bool(r.opt("tie_word_embeddings", False)),
        init_std=float(r.opt("initializer_range", 0.02)),
        max_seq_len=int(r.opt("max_position_embeddings", max_pos)),
        activation=read_activation(r.opt("hidden_act", "silu"), r.source),
        name=r.data["model_type"],
    )


def read_head_dim(r: Reader, heads: int) -> int | None:
    """head_dim as our config holds it: None when it is simply hidden_size / heads."""
    head_dim = r.opt("head_dim")
    return None if head_dim is None or head_dim * heads == r.req("hidden_size") else int(head_dim)


def read_activation(act: str, source: str) -> str:
    if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh"):
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (silu, gelu)")
    return "silu" if act in ("silu", "swish") else "gelu"


def read_sliding(r: Reader, slides: Callable[[int], bool] | None = None) -> int | None:
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


def sparse_step_layout(r: Reader, n_layers: int) -> LayoutConfig:
    """Qwen's MoE layers: every ``decoder_sparse_step``-th, except ``mlp_only_layers``."""
    step = int(r.opt("decoder_sparse_step", 1))
    dense = set(r.opt("mlp_only_layers", []))
    if step == 1 and not dense:
        return LayoutConfig()
    return LayoutConfig(moe_layers=tuple(i for i in range(n_layers) if i not in dense and (i + 1) % step == 0))


def read_layer_types(r: Reader, n_layers: int, default: Callable[[int], bool]) -> tuple[str, ...] | None:
    """``layer_types`` (transformers' spelling), else layer i is full attention where ``default(i)``; None when no
    layer is linear (our config then holds no linear-attention settings)."""
    types = r.opt("layer_types") or ["full_attention" if default(i) else "linear_attention" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers:
        raise ValueError(f"{r.source}: layer_types must list one type per layer ({n_layers}), got {types!r}")
    for kind in types:
        if kind not in ("full_attention", "linear_attention"):
            raise ValueError(f"{r.source}: layer_types entry {kind!r} is not supported (full_attention, "
                             "linear_attention)")
    return tuple(types) if "linear_attention" in types else None


def read_silu(r: Reader, why: str) -> None:
    """Families whose linear layers apply SiLU whatever ``hidden_act`` names (ours always do)."""
    if r.opt("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{r.source}: hidden_act={r.data['hidden_act']!r} is not supported ({why})")


def with_hf_aux(config: ModelConfig, hf_coef: float) -> ModelConfig:
    """Set aux_loss_coef from transformers' pooled Switch loss coefficient (see the module docstring)."""
    n_moe = max(config.n_moe_layers, 1)
    return replace(config, moe=replace(config.moe, aux_loss_coef=hf_coef * config.moe.top_k / n_moe))


# --- ModelConfig -> config.json ----------------------------------------------------------------------------------


def unsupported(model_type: str, path: str, why: str) -> None:
    raise ValueError(f"{path}: cannot be expressed as a Hugging Face {model_type} config ({why})")


def require(model_type: str, ok: bool, path: str, why: str) -> None:
    if not ok:
        unsupported(model_type, path, why)


def rope_out(attn) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_theta": attn.rope_theta}
    s = attn.rope_scaling
    if s is not None and s.type != "default":
        scaling: dict[str, Any] = {"rope_type": s.type, "type": s.type, "factor": s.factor}
        if s.type == "yarn":
            scaling.update(original_max_position_embeddings=s.original_max_seq_len, beta_fast=s.beta_fast,
                           beta_slow=s.beta_slow, mscale=s.mscale, mscale_all_dim=s.mscale_all_dim)
        out["rope_scaling"] = scaling
    return out


def base_out(c: ModelConfig, model_type: str, *, dense: bool = False, rms_norm: bool = True, hybrid: bool = False
             ) -> dict[str, Any]:
    """The keys every Llama-style config.json has, after refusing what no family here expresses. ``rms_norm``
    False: the family checks its norm itself (DBRX's LayerNorm); ``hybrid``: the family has linear-attention layers
    and checks them, and its residual, itself."""
    if (c.moe is None) != dense:
        unsupported(model_type, "moe", "a dense family: no experts" if dense else "a dense model")
    if c.activation != "silu":
        unsupported(model_type, "activation", f"{c.activation!r}; the family uses silu")
    if c.norm != "rmsnorm" and rms_norm:
        unsupported(model_type, "norm", "the family uses RMSNorm")
    if not hybrid and (c.linear_attention is not None or c.layout.layer_types is not None):
        unsupported(model_type, "linear_attention", "no linear-attention layers in this family")
    if not hybrid and c.residual is not None:
        unsupported(model_type, "residual", "the family's residual is the plain pre-norm one")
    m = c.moe
    if dense and c.layout.n_mtp_modules:
        unsupported(model_type, "layout.n_mtp_modules", "no multi-token prediction in this family")
    elif not dense and c.layout.dense_residual:
        unsupported(model_type, "layout.dense_residual", "no dense residual FFN in this family")
    elif not dense and (m.routing != "token_choice" or m.capacity_factor is not None or m.router_bias):
        unsupported(model_type, "moe", "only dropless token-choice routing without a router logit bias")
    return {"model_type": model_type, "vocab_size": c.vocab_size, "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers, "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
            "initializer_range": c.init_std, "max_position_embeddings": c.max_seq_len, "hidden_act": "silu"}


def moe_out(c: ModelConfig, model_type: str, *, shared_experts: bool = False, dense_layers: bool = False,
            aux_free: bool = False, rms_norm: bool = True, hybrid: bool = False) -> dict[str, Any]:
    """``base_out`` for an MoE family, refusing next what the family lacks unless allowed: shared experts, dense
    layers among the MoE ones, the aux-free selection bias."""
    out = base_out(c, model_type, rms_norm=rms_norm, hybrid=hybrid)
    m, lay = c.moe, c.layout
    if not shared_experts:
        require(model_type, m.n_shared_experts == 0, "moe.n_shared_experts", "no shared experts in this family")
    if not dense_layers:
        require(model_type, lay.first_k_dense == 0 and lay.moe_layer_freq == 1 and lay.moe_layers is None,
                "layout", "every layer is MoE in this family")
    if not aux_free:
        require(model_type, m.balance != "aux_free", "moe.balance", "no expert selection bias in this family")
    return out


def gqa_out(c: ModelConfig, model_type: str, qk_norm: str, bias: bool | None, *, clip_qkv: bool = False,
            partial_rotary: bool = False, output_gate: bool = False) -> dict[str, Any]:
    """The attention keys of a GQA family; ``bias`` None: either; ``clip_qkv``, ``partial_rotary``, ``output_gate``:
    the family has them."""
    a = c.attention
    if not isinstance(a, AttentionConfig):
        unsupported(model_type, "attention", "the family uses GQA, not MLA")
    if a.qk_norm != qk_norm:
        unsupported(model_type, "attention.qk_norm", f"the family uses {qk_norm!r}")
    if bias is not None and a.qkv_bias != bias:
        unsupported(model_type, "attention.qkv_bias", f"the family uses {bias}")
    if a.clip_qkv is not None and not clip_qkv:
        unsupported(model_type, "attention.clip_qkv", "not in this family")
    if a.rotary_dim is not None and not partial_rotary:
        unsupported(model_type, "attention.rotary_dim", "partial rotary is not in this family")
    if a.output_gate != output_gate:
        unsupported(model_type, "attention.output_gate",
                    "the family gates the attention output" if output_gate else "no output gate in this family")
    return {"num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
            "head_dim": a.resolved_head_dim(c.dim), **rope_out(a)}


def hybrid_out(c: ModelConfig, model_type: str, kind: str) -> dict[str, Any]:
    """``layer_types``, after refusing linear layers of another kind than the family's."""
    la = c.linear_attention
    if la is not None and la.kind != kind:
        unsupported(model_type, "linear_attention.kind", f"the family's linear layers are {kind!r}")
    return {"layer_types": list(c.layout.layer_types or ("full_attention",) * c.n_layers)}


def pooled_aux_coef(c: ModelConfig) -> float:
    """transformers' pooled loss coefficient (module docstring); 12 digits keep 0.001 from printing as 0.00099..."""
    return float(f"{c.moe.aux_loss_coef * max(c.n_moe_layers, 1) / c.moe.top_k:.12g}")


def softmax_plain(m: MoEConfig) -> bool:
    """Softmax routing without expert groups."""
    return m.score_func == "softmax" and m.n_group == 1
