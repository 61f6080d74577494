"""The quantised weight format as the kernels read it (``QWeight``), and its spec (``dequantize``): part of the
kernels' contract, so it lives below them; smoe.quant writes it (``quantize_weight``) and re-exports these names.

int8: symmetric per output channel. ``s = max|w_o,:| / 127``, ``q = round(w / s)`` in [-127, 127] (int8), and
      ``w ~ q * s``: the error of one weight is at most ``s / 2``.
int4: asymmetric per group of G consecutive inputs (smoe.quant.format.int4_group says which G).
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
    I, H = x_BI.shape[-1], group_size // 2  # noqa: E741 (the legend's I: inputs)
    byte = torch.arange(I // 2, device=x_BI.device)
    low = byte // H * group_size + byte % H  # input in the low nibble of each packed byte
    order = torch.stack([low.view(-1, 32), low.view(-1, 32) + H], dim=1).flatten()
    x_block = x_BI.float()[..., order].unflatten(-1, (-1, ACTIVATION_BLOCK))
    top = x_block.abs().amax(-1, keepdim=True)
    inverse = torch.where(top > 0, INT8_MAX / top, 0)
    rounded = ((x_block * inverse).round() * (top / INT8_MAX)).flatten(-2)
    return torch.empty_like(rounded).index_copy_(-1, order, rounded)
