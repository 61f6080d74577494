"""Dense building blocks: norms, rotary embeddings, the token mixers (GQA and MLA attention, the linear-attention
layers; one contract, smoe.nn.mixer), linear-attention recurrences, gated MLP."""

from smoe.nn.attention import Attention, KVCache
from smoe.nn.init import init_weights
from smoe.nn.linear_attention import chunked_gated_delta_rule, gated_delta_rule, gated_delta_step_
from smoe.nn.linear_layers import (
    GatedDeltaNet,
    KimiDeltaAttention,
    LightningAttention,
    RecurrentState,
    fp32_parameters,
    make_linear_attention,
)
from smoe.nn.mixer import CacheMode, LayerCache, MixerStep, TokenMixer
from smoe.nn.mla import MLA, MLACache
from smoe.nn.mlp import MLP
from smoe.nn.norm import LayerNorm, RMSNorm, make_norm
from smoe.nn.rope import RotaryEmbedding, apply_rope

__all__ = [
    "CacheMode",
    "LayerCache",
    "MixerStep",
    "TokenMixer",
    "MLA",
    "MLACache",
    "MLP",
    "GatedDeltaNet",
    "KimiDeltaAttention",
    "LightningAttention",
    "RecurrentState",
    "Attention",
    "KVCache",
    "LayerNorm",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rope",
    "chunked_gated_delta_rule",
    "fp32_parameters",
    "gated_delta_rule",
    "gated_delta_step_",
    "init_weights",
    "make_linear_attention",
    "make_norm",
]
