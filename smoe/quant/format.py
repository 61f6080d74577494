"""The quantised weight format: what a checkpoint stores and what the kernels read.

int8: symmetric per output channel. ``s = max|w_o,:| / 127``, ``q = round(w / s)`` in [-127, 127] (int8), and
      ``w ~ q * s``: the error of one weight is at most ``s / 2``.
int4: asymmetric per group of G consecutive inputs (the configured group size, or for a weight whose input count
      it does not divide, the largest even divisor of that count below it: ``int4_group``).
      ``s = (max - min) / 15``, ``q = round((w - min) / s)`` in [0, 15], and ``w ~ q * s + offset`` with
      ``offset = min``: the error is at most ``s / 2``. Two values per
      byte (uint8): byte j of a group holds input j in its low nibble and input j + G/2 in its high nibble, so a
      kernel unpacks a group's two halves from one contiguous run of bytes into two contiguous runs of inputs.

Scales and offsets are fp32. ``dequantize`` is the spec of the weights: every kernel computes
``x @ dequantize(w).T``, where for int4 weights whose group is a multiple of 32 inputs and whose input count a
multiple of 64 (``int8_activations``: all but odd shapes) ``x`` is first rounded to int8 per block of 64 inputs
(``quantize_activations``), as llama.cpp's Q4_0 dot product does: the C++ kernel then multiplies nibbles by int8
activations with one instruction per 32 (smoe/kernels/cpp_quant.cpp), where widening each nibble to fp32 cost
more than reading it. A block's rounding error is at most ``max|x_block| / 254`` per input.

Legend: O outputs, I inputs, G group size, ... leading dims (E experts for stacked expert weights).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from smoe.config import QuantConfig

INT8_MAX = 127
INT4_LEVELS = 15
ACTIVATION_BLOCK = 64  # inputs per int8 activation scale: the 32 bytes of int4 weights the C++ tile reads at once


class QWeight(NamedTuple):
    """A quantised (..., O, I) weight as the kernels read it."""

    qweight: torch.Tensor  # int8 (..., O, I), or uint8 (..., O, I // 2) for int4
    scale: torch.Tensor  # fp32 (..., O), or (..., O, I // G) for int4
    offset: torch.Tensor | None  # int4: fp32 (..., O, I // G); int8: None
    group_size: int | None  # int4: G; int8: None

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-1] * (1 if self.offset is None else 2)

    def expert(self, e: int, keepdim: bool = False) -> "QWeight":
        """Expert ``e``'s (O, I) slice of a stacked (E, O, I) weight, or its (1, O, I) stack of one with
        ``keepdim`` (views, no copy)."""
        pick = slice(e, e + 1) if keepdim else e
        return QWeight(self.qweight[pick], self.scale[pick], None if self.offset is None else self.offset[pick],
                       self.group_size)


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


def pack_int4(q_NG: torch.Tensor) -> torch.Tensor:
    """(..., n groups, G) values in [0, 15] -> (..., n * G / 2) bytes: low nibble from the first half of each
    group, high nibble from the second."""
    low, high = q_NG.chunk(2, dim=-1)
    return (low | (high << 4)).flatten(-2)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """The inverse of ``pack_int4``: (..., I / 2) bytes -> (..., I / G, G) values in [0, 15]."""
    bytes_NH = packed.unflatten(-1, (-1, group_size // 2))
    return torch.cat([bytes_NH & 15, bytes_NH >> 4], dim=-1)


def dequantize(w: QWeight) -> torch.Tensor:
    """The fp32 (..., O, I) weight ``w`` stands for: the spec of every quantised kernel."""
    if w.offset is None:
        return w.qweight.float() * w.scale[..., None]
    q_NG = unpack_int4(w.qweight, w.group_size).float()
    return (q_NG * w.scale[..., None] + w.offset[..., None]).flatten(-2)


def int8_activations(w: QWeight) -> bool:
    """Whether the kernels multiply int4 weight ``w`` by int8 activations (``quantize_activations``): groups of a
    multiple of 32 inputs, so that every 32 bytes of a row hold one group or two whole ones, and rows of a multiple
    of 64 inputs."""
    return w.offset is not None and w.group_size % 32 == 0 and w.in_features % ACTIVATION_BLOCK == 0


def quantize_activations(x_BI: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` as int4 kernels with int8 activations multiply it: each row, in blocks of 64 inputs, rounded to the
    nearest of 255 levels, ``round(x * (127 / m)) * (m / 127)`` with ``m = max|x_block|`` (ties to even), in fp32.
    A block is the inputs of 32 consecutive packed bytes (their low nibbles', then their high nibbles'), the run a
    kernel reads at once; in fp32 arithmetic exactly as the C++ kernel rounds, so its integer dot products match.
    A block holding inf or NaN becomes NaN throughout."""
    I, H = x_BI.shape[-1], group_size // 2
    byte = torch.arange(I // 2, device=x_BI.device)
    low = byte // H * group_size + byte % H  # input in the low nibble of each packed byte
    order = torch.stack([low.view(-1, 32), low.view(-1, 32) + H], dim=1).flatten()
    x_block = x_BI.float()[..., order].unflatten(-1, (-1, ACTIVATION_BLOCK))
    top = x_block.abs().amax(-1, keepdim=True)
    inverse = torch.where(top > 0, INT8_MAX / top, 0)
    rounded = ((x_block * inverse).round() * (top / INT8_MAX)).flatten(-2)
    return torch.empty_like(rounded).index_copy_(-1, order, rounded)
