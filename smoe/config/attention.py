"""The token mixers' configs: grouped-query attention, multi-head latent attention, and the linear attentions of
hybrid models, with their rotary embeddings. Part of smoe.config (which re-exports every name here); no torch import.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from smoe.config.rules import check_types, fail, non_negative, one_of, positive

QKNorm = Literal["none", "head", "full"]
RopeType = Literal["default", "linear", "yarn"]
LinearKind = Literal["lightning", "gated_delta", "kda"]


@dataclass(frozen=True)
class RopeScaling:
    """Context extension of rotary embeddings. ``yarn`` follows Peng et al. 2023 as DeepSeek-V2/V3 use it."""

    type: RopeType = "yarn"
    factor: float = 1.0
    original_max_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def validate(self, prefix: str = "rope_scaling.") -> None:
        check_types(self, prefix)
        one_of(prefix + "type", self.type, typing.get_args(RopeType))
        positive(prefix + "factor", self.factor)
        positive(prefix + "original_max_seq_len", self.original_max_seq_len)
        positive(prefix + "beta_slow", self.beta_slow)
        if self.beta_fast < self.beta_slow:  # equal is legal: Kimi K2 ships beta_fast = beta_slow = 1
            fail(prefix + "beta_fast", f"must be >= beta_slow ({self.beta_slow}), got {self.beta_fast}")
        non_negative(prefix + "mscale", self.mscale)
        non_negative(prefix + "mscale_all_dim", self.mscale_all_dim)


@dataclass(frozen=True)
class AttentionConfig:
    """Grouped-query attention (MHA when n_kv_heads == n_heads)."""

    kind: Literal["gqa"] = "gqa"
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int | None = None  # None: dim // n_heads
    rotary_dim: int | None = None  # None: the whole head is rotated (MiniMax-M2 rotates a part)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    qkv_bias: bool = False
    qk_norm: QKNorm = "none"  # "head": RMSNorm per head (Qwen3); "full": over all heads (OLMoE, MiniMax-M2)
    clip_qkv: float | None = None  # DBRX clamps q, k, v to [-clip, clip]
    # Qwen3-Next's gated attention: the heads' output times sigmoid(W_g x), elementwise, before the output projection
    output_gate: bool = False

    def resolved_head_dim(self, dim: int) -> int:
        return self.head_dim if self.head_dim is not None else dim // self.n_heads

    def validate(self, dim: int, prefix: str = "attention.") -> None:
        check_types(self, prefix)
        positive(prefix + "n_heads", self.n_heads)
        positive(prefix + "n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            fail(prefix + "n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.head_dim is None and dim % self.n_heads:
            fail(prefix + "n_heads", f"must divide dim ({dim}) when head_dim is not set, got {self.n_heads}")
        positive(prefix + "head_dim", self.head_dim, allow_none=True)
        head_dim = self.resolved_head_dim(dim)
        if head_dim % 2:
            fail(prefix + "head_dim", f"must be even for rotary embeddings, got {head_dim}")
        if self.rotary_dim is not None:
            if not 0 < self.rotary_dim <= head_dim or self.rotary_dim % 2:
                fail(prefix + "rotary_dim", f"must be even and in (0, head_dim={head_dim}], got {self.rotary_dim}")
        positive(prefix + "rope_theta", self.rope_theta)
        if self.rope_scaling is not None:
            self.rope_scaling.validate(prefix + "rope_scaling.")
        positive(prefix + "sliding_window", self.sliding_window, allow_none=True)
        one_of(prefix + "qk_norm", self.qk_norm, typing.get_args(QKNorm))
        positive(prefix + "clip_qkv", self.clip_qkv, allow_none=True)


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 §2.1): keys and values through a low-rank latent."""

    kind: Literal["mla"] = "mla"
    n_heads: int = 8
    q_lora_rank: int | None = None  # None: queries are projected directly (DeepSeek-V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True  # DeepSeek checkpoints store rotary pairs interleaved
    rotary: bool = True  # False: no position embedding at all, the rope part is a plain shared key (Kimi Linear)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self, dim: int, prefix: str = "attention.") -> None:
        check_types(self, prefix)
        positive(prefix + "n_heads", self.n_heads)
        positive(prefix + "q_lora_rank", self.q_lora_rank, allow_none=True)
        positive(prefix + "kv_lora_rank", self.kv_lora_rank)
        positive(prefix + "qk_nope_head_dim", self.qk_nope_head_dim)
        positive(prefix + "qk_rope_head_dim", self.qk_rope_head_dim)
        if self.qk_rope_head_dim % 2:
            fail(prefix + "qk_rope_head_dim", f"must be even for rotary embeddings, got {self.qk_rope_head_dim}")
        positive(prefix + "v_head_dim", self.v_head_dim)
        positive(prefix + "rope_theta", self.rope_theta)
        if self.rope_scaling is not None:
            self.rope_scaling.validate(prefix + "rope_scaling.")


@dataclass(frozen=True)
class LinearAttentionConfig:
    """The linear-attention layers of a hybrid model (docs/linear_attention.md); layout.layer_types says which layers
    they are. ``lightning``: MiniMax-01's decayed linear attention (a fixed decay per head and layer, no convolution).
    ``gated_delta``: Qwen3-Next's Gated DeltaNet (gated delta rule, short convolution, SiLU output gate; key heads may
    be fewer than value heads). ``kda``: Kimi Linear's Kimi Delta Attention (a decay per key channel)."""

    kind: LinearKind = "gated_delta"
    n_heads: int = 8  # value heads (lightning and kda: the heads)
    n_k_heads: int | None = None  # gated_delta: key heads, dividing n_heads; None: n_heads
    head_dim: int = 64  # key head dim (lightning and kda: also the value head dim)
    v_head_dim: int | None = None  # gated_delta: value head dim; None: head_dim
    conv_kernel: int = 4  # taps of the causal short convolution over q, k, v (not lightning's)
    chunk: int = 64  # the chunked recurrence's chunk length in training and prefill (a speed knob, not a weight)

    @property
    def resolved_n_k_heads(self) -> int:
        return self.n_heads if self.n_k_heads is None else self.n_k_heads

    @property
    def resolved_v_head_dim(self) -> int:
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    def validate(self, prefix: str = "linear_attention.") -> None:
        check_types(self, prefix)
        one_of(prefix + "kind", self.kind, typing.get_args(LinearKind))
        positive(prefix + "n_heads", self.n_heads)
        positive(prefix + "head_dim", self.head_dim)
        positive(prefix + "chunk", self.chunk)
        if self.kind != "gated_delta":
            for name in ("n_k_heads", "v_head_dim"):
                if getattr(self, name) is not None:
                    fail(prefix + name, f"only 'gated_delta' sets it ({self.kind!r} has as many key heads as "
                                        f"value heads, of one head_dim); got {getattr(self, name)}")
        positive(prefix + "n_k_heads", self.n_k_heads, allow_none=True)
        if self.n_heads % self.resolved_n_k_heads:
            fail(prefix + "n_k_heads", f"must divide n_heads ({self.n_heads}), got {self.n_k_heads}")
        positive(prefix + "v_head_dim", self.v_head_dim, allow_none=True)
        positive(prefix + "conv_kernel", self.conv_kernel)
