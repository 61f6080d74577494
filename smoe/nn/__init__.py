"""Dense building blocks: norms, rotary embeddings, attention (GQA and MLA), gated MLP."""

from smoe.nn.attention import Attention, KVCache
from smoe.nn.init import init_weights
from smoe.nn.mla import MLA, MLACache
from smoe.nn.mlp import MLP
from smoe.nn.norm import LayerNorm, RMSNorm, make_norm
from smoe.nn.rope import RotaryEmbedding, apply_rope

__all__ = [
    "MLA",
    "MLACache",
    "MLP",
    "Attention",
    "KVCache",
    "LayerNorm",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rope",
    "init_weights",
    "make_norm",
]
