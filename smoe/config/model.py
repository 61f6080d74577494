"""The model's config tree: ModelConfig and the configs it holds besides the token mixers' (MoEConfig, LayoutConfig,
ResidualConfig, QuantConfig), JSON round-trip and dotted-path overrides. Part of smoe.config, which re-exports every
name here; no torch import.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from smoe.config.attention import AttentionConfig, LinearAttentionConfig, MLAConfig, RopeScaling
from smoe.config.rules import check_types, fail, non_negative, one_of, positive

ScoreFunc = Literal["softmax", "sigmoid"]
Balance = Literal["aux", "seq_aux", "aux_free", "none"]
Routing = Literal["token_choice", "expert_choice", "hash"]
CapacityPriority = Literal["choice", "token"]
SecondExpert = Literal["always", "random"]
GroupScore = Literal["max", "top2_sum"]
Activation = Literal["silu", "gelu"]
Norm = Literal["rmsnorm", "layernorm"]
QuantScheme = Literal["int8", "int4"]
LayerType = Literal["full_attention", "linear_attention"]
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP = 64  # within 0.5% perplexity of fp32 on the trained models of docs/quantization.md


@dataclass(frozen=True)
class MoEConfig:
    """A sparse MoE FFN. Field names are a public contract: scripts outside the package set them."""

    n_routed_experts: int = 8
    top_k: int = 2
    expert_dim: int = 256  # hidden size of one routed expert
    n_shared_experts: int = 0
    shared_expert_dim: int | None = None  # hidden size of one shared expert; None: expert_dim
    shared_expert_gate: bool = False  # Qwen-MoE: shared output scaled by sigmoid(x . w)
    score_func: ScoreFunc = "softmax"
    norm_topk_prob: bool = True  # renormalise the selected scores to sum to one (at top_k 1: see gate_is_constant)
    routed_scaling_factor: float = 1.0
    # Group-limited routing: experts split into n_group contiguous groups and only the best topk_group are eligible.
    # The groups are DeepSeek-V2's devices (device-limited routing, M = topk_group) or V3's nodes (node-limited);
    # under expert parallelism they map onto EP ranks (smoe.parallel.max_ranks_per_token).
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "top2_sum"  # how a group is scored: DeepSeek-V3 sums its top 2, V2 takes the max
    capacity_factor: float | None = None  # None: dropless
    # Which assignments an expert over capacity keeps. "choice": every token's first choice before any second
    # choice, each round in token order (GShard Algorithm 1, DeepSpeed top-2 gating); "token": in token order,
    # so an earlier token's second choice can displace a later token's first.
    capacity_priority: CapacityPriority = "choice"
    # GShard §2.2's random routing at top-2: in training, a token's second expert gets it only with probability
    # min(1, 2 g2), g2 its share of the two weights (otherwise the first expert alone, at its unchanged weight);
    # evaluation and decoding always dispatch both. "always": plain top-2.
    second_expert: SecondExpert = "always"
    balance: Balance = "aux"
    aux_loss_coef: float = 0.01  # Switch/GShard expert-level loss, used when balance == "aux"
    # DeepSeek-V3 sequence-wise loss: the balance when balance == "seq_aux", and V3's complementary loss beside the
    # bias when balance == "aux_free" (0 turns it off there).
    seq_aux_loss_coef: float = 1e-4
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    device_balance_loss_coef: float = 0.0  # DeepSeek-V2 §3.2.2 device-level loss over the n_group groups
    bias_update_rate: float = 1e-3  # aux-free bias step (gamma), used when balance == "aux_free"
    # expert_choice sees future tokens: for training studies, not decoding. hash: Roller et al. 2021's Hash Layer, a
    # fixed function of the token id (no router weights), top-1.
    routing: Routing = "token_choice"
    router_bias: bool = False  # an additive bias on router logits (GPT-OSS style), distinct from the aux-free bias

    @property
    def resolved_shared_expert_dim(self) -> int:
        return self.shared_expert_dim if self.shared_expert_dim is not None else self.expert_dim

    @property
    def gate_is_constant(self) -> bool:
        """Top-1 token choice renormalised: every routed weight is exactly routed_scaling_factor, so the LM loss
        has no path to the router and only the balance terms train it. Legal, because Hugging Face families that
        renormalise at k = 1 (Mixtral, Qwen, OLMoE, DBRX, MiniMax) run this way, but not an architecture to train
        from scratch; Switch multiplies by the router probability instead (norm_topk_prob=False)."""
        return self.routing == "token_choice" and self.top_k == 1 and self.norm_topk_prob

    @property
    def has_expert_bias(self) -> bool:
        """The selection-only bias of aux-loss-free balancing (DeepSeek-V3 ``e_score_correction_bias``)."""
        return self.balance == "aux_free"

    def validate(self, prefix: str = "moe.") -> None:
        check_types(self, prefix)
        positive(prefix + "n_routed_experts", self.n_routed_experts)
        positive(prefix + "top_k", self.top_k)
        if self.top_k > self.n_routed_experts:
            fail(prefix + "top_k", f"must not exceed n_routed_experts ({self.n_routed_experts}), got {self.top_k}")
        positive(prefix + "expert_dim", self.expert_dim)
        non_negative(prefix + "n_shared_experts", self.n_shared_experts)
        positive(prefix + "shared_expert_dim", self.shared_expert_dim, allow_none=True)
        if self.shared_expert_gate and self.n_shared_experts == 0:
            fail(prefix + "shared_expert_gate", "needs n_shared_experts >= 1")
        one_of(prefix + "score_func", self.score_func, typing.get_args(ScoreFunc))
        positive(prefix + "routed_scaling_factor", self.routed_scaling_factor)
        positive(prefix + "n_group", self.n_group)
        positive(prefix + "topk_group", self.topk_group)
        if self.n_routed_experts % self.n_group:
            fail(prefix + "n_group", f"must divide n_routed_experts ({self.n_routed_experts}), got {self.n_group}")
        if self.topk_group > self.n_group:
            fail(prefix + "topk_group", f"must not exceed n_group ({self.n_group}), got {self.topk_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1:
            if self.group_score == "top2_sum" and per_group < 2:
                fail(prefix + "group_score", f"'top2_sum' needs >= 2 experts per group, got {per_group}")
            if self.topk_group * per_group < self.top_k:
                fail(
                    prefix + "topk_group",
                    f"the {self.topk_group} selected groups hold {self.topk_group * per_group} experts, "
                    f"fewer than top_k ({self.top_k})",
                )
            if self.routing == "expert_choice":
                fail(prefix + "n_group", "group-limited routing applies to token_choice routing only")
        one_of(prefix + "group_score", self.group_score, typing.get_args(GroupScore))
        positive(prefix + "capacity_factor", self.capacity_factor, allow_none=True)
        one_of(prefix + "capacity_priority", self.capacity_priority, typing.get_args(CapacityPriority))
        one_of(prefix + "second_expert", self.second_expert, typing.get_args(SecondExpert))
        if self.second_expert == "random" and (self.top_k != 2 or self.routing != "token_choice"):
            fail(prefix + "second_expert", f"'random' is GShard's top-2 token-choice rule; top_k is {self.top_k} and "
                                           f"routing {self.routing!r}")
        one_of(prefix + "balance", self.balance, typing.get_args(Balance))
        non_negative(prefix + "aux_loss_coef", self.aux_loss_coef)
        non_negative(prefix + "seq_aux_loss_coef", self.seq_aux_loss_coef)
        non_negative(prefix + "z_loss_coef", self.z_loss_coef)
        non_negative(prefix + "device_balance_loss_coef", self.device_balance_loss_coef)
        if self.device_balance_loss_coef > 0 and self.n_group < 2:
            fail(prefix + "device_balance_loss_coef", "needs n_group >= 2: the devices are the n_group expert groups")
        non_negative(prefix + "bias_update_rate", self.bias_update_rate)
        one_of(prefix + "routing", self.routing, typing.get_args(Routing))
        if self.routing == "expert_choice" and self.balance != "none":
            fail(prefix + "balance", "must be 'none' with expert_choice routing, which is balanced by construction")
        if self.routing == "hash":
            if self.balance != "none":
                fail(prefix + "balance", "must be 'none' with hash routing: a fixed assignment cannot be balanced")
            if self.top_k != 1 or self.n_group > 1 or self.router_bias:
                fail(prefix + "routing", "hash routing (Roller et al.'s Hash Layer) is top-1, with no groups or "
                                          "router bias")


@dataclass(frozen=True)
class LayoutConfig:
    """Which layers are MoE, and the extras some families add around them."""

    first_k_dense: int = 0  # the first k layers use a dense FFN (DeepSeek)
    moe_layer_freq: int = 1  # after those, layer i is MoE when i % moe_layer_freq == 0
    moe_layers: tuple[int, ...] | None = None  # an explicit list overrides the two fields above (Qwen sparse steps)
    dense_residual: bool = False  # a dense FFN in parallel with every MoE FFN (Snowflake Arctic)
    n_mtp_modules: int = 0  # DeepSeek-V3 multi-token prediction depth
    mtp_loss_coef: float = 0.3  # lambda of the MTP loss (DeepSeek-V3 §2.2 uses 0.3, then 0.1)
    # Each layer's token mixer, as transformers spells it: "full_attention" (the attention config: GQA or MLA) or
    # "linear_attention" (ModelConfig.linear_attention). None: full attention everywhere. hybrid_layer_types builds
    # the usual patterns.
    layer_types: tuple[LayerType, ...] | None = None

    def is_linear(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "linear_attention"

    @property
    def n_linear(self) -> int:
        """How many layers are linear attention (counted from the list: a config may claim 10^9 layers)."""
        return 0 if self.layer_types is None else self.layer_types.count("linear_attention")

    def is_moe(self, layer: int) -> bool:
        if self.moe_layers is not None:
            return layer in self.moe_layers
        return layer >= self.first_k_dense and layer % self.moe_layer_freq == 0

    def n_moe(self, n_layers: int) -> int:
        """How many of ``n_layers`` layers ``is_moe``, counted without visiting each (a config may claim many)."""
        if self.moe_layers is not None:
            return len(self.moe_layers)
        # the multiples of moe_layer_freq in [first_k_dense, n_layers)
        return max(0, -(-n_layers // self.moe_layer_freq) - -(-self.first_k_dense // self.moe_layer_freq))

    def validate(self, n_layers: int, prefix: str = "layout.") -> None:
        check_types(self, prefix)
        non_negative(prefix + "first_k_dense", self.first_k_dense)
        if self.first_k_dense > n_layers:
            fail(prefix + "first_k_dense", f"must not exceed n_layers ({n_layers}), got {self.first_k_dense}")
        positive(prefix + "moe_layer_freq", self.moe_layer_freq)
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < n_layers]
            if bad:
                fail(prefix + "moe_layers", f"indices must lie in [0, {n_layers}), got {bad}")
            if len(set(self.moe_layers)) != len(self.moe_layers):
                fail(prefix + "moe_layers", "must not repeat a layer")
        non_negative(prefix + "n_mtp_modules", self.n_mtp_modules)
        non_negative(prefix + "mtp_loss_coef", self.mtp_loss_coef)
        if self.layer_types is not None:
            if len(self.layer_types) != n_layers:
                fail(prefix + "layer_types", f"needs one entry per layer ({n_layers}), got {len(self.layer_types)}")
            for kind in self.layer_types:
                one_of(prefix + "layer_types", kind, typing.get_args(LayerType))


def hybrid_layer_types(n_layers: int, full_every: int) -> tuple[LayerType, ...]:
    """Every ``full_every``-th layer full attention and the others linear, ending on a full one when n_layers is a
    multiple (MiniMax-01: 8, Qwen3-Next: 4). ``full_every=1`` is full attention everywhere."""
    if full_every < 1:
        fail("full_every", f"must be >= 1, got {full_every}")
    return tuple("full_attention" if (i + 1) % full_every == 0 else "linear_attention" for i in range(n_layers))


@dataclass(frozen=True)
class ResidualConfig:
    """MiniMax-01's residual: a sublayer f adds to its normalised input, x <- alpha * norm(x) + beta * f(norm(x)),
    instead of x <- x + f(norm(x)), with (alpha, beta) per kind of sublayer (MiniMax-Text-01 sets every alpha to
    (2 n_layers)^(1/4), DeepNet's scaling, and every beta to 1)."""

    attention_alpha: float = 1.0
    attention_beta: float = 1.0
    linear_attention_alpha: float = 1.0
    linear_attention_beta: float = 1.0
    ffn_alpha: float = 1.0
    ffn_beta: float = 1.0

    def validate(self, prefix: str = "residual.") -> None:
        check_types(self, prefix)
        for f in fields(self):
            positive(prefix + f.name, getattr(self, f.name))


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantisation of the linear layers and routed experts, for inference (smoe.quant,
    docs/quantization.md). ``int8``: symmetric, one scale per output channel. ``int4``: asymmetric (a scale and an
    offset) per group of ``group_size`` consecutive inputs, two values per byte."""

    scheme: QuantScheme = "int8"
    group_size: int | None = None  # int4 only: inputs per scale and offset, one of INT4_GROUP_SIZES

    def validate(self, prefix: str = "quantization.") -> None:
        check_types(self, prefix)
        one_of(prefix + "scheme", self.scheme, typing.get_args(QuantScheme))
        if self.scheme == "int8" and self.group_size is not None:
            fail(prefix + "group_size", f"int8 has one scale per output channel, so no group size; got "
                                        f"{self.group_size}")
        if self.scheme == "int4" and self.group_size not in INT4_GROUP_SIZES:
            fail(prefix + "group_size", f"int4 needs one of {', '.join(map(str, INT4_GROUP_SIZES))}, got "
                                        f"{self.group_size!r}")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    ffn_dim: int = 1024  # hidden size of dense FFNs (dense layers, Arctic's residual)
    activation: Activation = "silu"  # of the gated FFNs: silu -> SwiGLU, gelu -> GeGLU (Grok-1)
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    max_seq_len: int = 2048
    attention: AttentionConfig | MLAConfig = field(default_factory=AttentionConfig)
    linear_attention: LinearAttentionConfig | None = None  # the layers layout.layer_types makes linear
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    residual: ResidualConfig | None = None  # None: pre-norm, x + f(norm(x))
    quantization: QuantConfig | None = None
    name: str = "custom"

    @property
    def moe_layer_ids(self) -> list[int]:
        if self.moe is None:
            return []
        return [i for i in range(self.n_layers) if self.layout.is_moe(i)]

    @property
    def n_moe_layers(self) -> int:
        return 0 if self.moe is None else self.layout.n_moe(self.n_layers)

    def validate(self) -> "ModelConfig":
        """Check the whole tree; returns self so ``cfg = ModelConfig(...).validate()`` reads naturally."""
        check_types(self, "")
        positive("vocab_size", self.vocab_size)
        positive("dim", self.dim)
        positive("n_layers", self.n_layers)
        positive("ffn_dim", self.ffn_dim)
        one_of("activation", self.activation, typing.get_args(Activation))
        one_of("norm", self.norm, typing.get_args(Norm))
        positive("norm_eps", self.norm_eps)
        positive("init_std", self.init_std)
        positive("max_seq_len", self.max_seq_len)
        if not isinstance(self.attention, (AttentionConfig, MLAConfig)):
            fail("attention", "must be an AttentionConfig or an MLAConfig")
        self.attention.validate(self.dim)
        if self.moe is not None:
            self.moe.validate()
        self.layout.validate(self.n_layers)
        n_linear = self.layout.n_linear
        if n_linear and self.linear_attention is None:
            fail("linear_attention", f"must be set: layout.layer_types makes {n_linear} layers linear attention")
        if self.linear_attention is not None:
            if not n_linear:
                fail("linear_attention", "is set but no layer uses it: layout.layer_types names no "
                                         "'linear_attention' layer")
            self.linear_attention.validate()
        if self.residual is not None:
            self.residual.validate()
        if self.layout.dense_residual and self.moe is None:
            fail("layout.dense_residual", "needs an MoE config")
        if self.quantization is not None:
            self.quantization.validate()
        return self

    # --- JSON round trip -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "")

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


_NESTED = {"attention": None, "moe": MoEConfig, "layout": LayoutConfig, "rope_scaling": RopeScaling,
           "quantization": QuantConfig, "linear_attention": LinearAttentionConfig, "residual": ResidualConfig}


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        fail(prefix.rstrip(".") or "config", f"must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        fail(prefix + unknown[0], f"unknown field of {cls.__name__}; known fields: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        if name == "attention" and isinstance(value, dict):
            kind = value.get("kind", "gqa")
            sub = {"gqa": AttentionConfig, "mla": MLAConfig}.get(kind)
            if sub is None:
                fail(prefix + "attention.kind", f"must be 'gqa' or 'mla', got {kind!r}")
            value = _from_dict(sub, value, prefix + "attention.")
        elif name in _NESTED and _NESTED[name] is not None and isinstance(value, dict):
            value = _from_dict(_NESTED[name], value, prefix + name + ".")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def override(config: ModelConfig, assignments: dict[str, Any]) -> ModelConfig:
    """Return ``config`` with dotted-path fields replaced, e.g. ``{"moe.top_k": 4}``; the result is validated.

    Unknown paths raise ValueError naming the path and the known fields at that level.
    """
    for path, value in assignments.items():
        config = _set_path(config, path.split("."), value, path)
    return config.validate()


def _set_path(obj: Any, parts: list[str], value: Any, path: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        fail(path, f"{'.'.join(parts)} does not name a config field")
    known = {f.name for f in fields(obj)}
    head = parts[0]
    if head not in known:
        fail(path, f"unknown field {head!r} of {type(obj).__name__}; known fields: {', '.join(sorted(known))}")
    if len(parts) == 1:
        if isinstance(value, list):
            value = tuple(value)
        return replace(obj, **{head: value})
    child = getattr(obj, head)
    if child is None:
        fail(path, f"{head} is not set in this config, so {path} cannot be changed")
    return replace(obj, **{head: _set_path(child, parts[1:], value, path)})
