"""Quantising weights into the format the kernels read (smoe/kernels/qweight.py describes it: ``QWeight``, int8 per
output channel, int4 per group of inputs, and ``dequantize``, the spec). The format's names are re-exported here,
so the names users imported from here keep working.
"""

from __future__ import annotations

import torch

from smoe.config import QuantConfig
from smoe.kernels.qweight import (
    ACTIVATION_BLOCK,
    INT4_LEVELS,
    INT8_MAX,
    QWeight,
    dequantize,
    int8_activations,
    pack_int4,
    quantize_activations,
    unpack_int4,
)

__all__ = ["ACTIVATION_BLOCK", "INT4_LEVELS", "INT8_MAX", "QWeight", "dequantize", "int4_group", "int8_activations",
           "pack_int4", "quantize_activations", "quantize_weight", "unpack_int4"]


def quantize_weight(w: torch.Tensor, config: QuantConfig) -> QWeight:
    """Quantise a (..., O, I) float weight; I must be a multiple of the group size for int4."""
    w = w.detach().float()
    if config.scheme == "int8":
        scale = w.abs().amax(-1) / INT8_MAX
        q = torch.where(scale[..., None] > 0, w / scale[..., None].clamp_min(torch.finfo(torch.float32).tiny), 0)
        return QWeight(q.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale, None, None)
    G = int4_group(w.shape[-1], config.group_size)
    w_g = w.unflatten(-1, (w.shape[-1] // G, G))
    low, high = w_g.amin(-1), w_g.amax(-1)
    scale = (high - low) / INT4_LEVELS
    q = torch.where(scale[..., None] > 0, (w_g - low[..., None]) / scale[..., None].clamp_min(
        torch.finfo(torch.float32).tiny), 0)
    return QWeight(pack_int4(q.round().clamp(0, INT4_LEVELS).to(torch.uint8)), scale, low, G)


def int4_group(in_features: int, group_size: int) -> int:
    """The group size of an int4 weight with ``in_features`` inputs: ``group_size`` when it divides them, else the
    largest even divisor below it (e.g. 48 for MLA's q_lora_rank 96 at 64), so every group is whole and packs into
    bytes. An odd input count has none."""
    G = next((g for g in range(min(group_size, in_features), 1, -1) if in_features % g == 0 and g % 2 == 0), None)
    if G is None:
        raise ValueError(f"quantization: int4 packs two inputs per byte, so a weight needs an even number of "
                         f"inputs; got {in_features}")
    return G
