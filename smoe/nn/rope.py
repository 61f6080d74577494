"""Rotary position embeddings with linear and YaRN context extension.

Pairs are (i, i + d/2) ("rotate half", the Hugging Face layout). DeepSeek checkpoints store the rotary part
interleaved as (2i, 2i + 1); ``apply_rope(..., interleaved=True)`` permutes to the half layout first, which gives
the same attention scores.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smoe.config import RopeScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(rot_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rot_dim / 2,) and the factor applied to cos/sin (YaRN's attention temperature)."""
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim
    inv_freq = 1.0 / theta**exponents
    if scaling is None or scaling.type == "default":
        return inv_freq.float(), 1.0
    if scaling.type == "linear":
        return (inv_freq / scaling.factor).float(), 1.0

    # YaRN (Peng et al. 2023, §3): interpolate low frequencies, keep high ones, blend linearly in between.
    def correction_dim(rotations: float) -> float:
        return rot_dim * math.log(scaling.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), rot_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate
    inv_freq = inv_freq / scaling.factor * (1 - keep) + inv_freq * keep
    if scaling.mscale and scaling.mscale_all_dim:
        attn = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    else:
        attn = yarn_mscale(scaling.factor)
    return inv_freq.float(), attn


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape (*positions.shape, rot_dim): (T, R) for shared positions, (B, T, R) for
    per-row positions (left-padded batches). Holds no learned state."""

    def __init__(self, rot_dim: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        self.rot_dim, self.theta, self.scaling = rot_dim, theta, scaling
        self.register_buffer("inv_freq", torch.empty(rot_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the frequencies, e.g. after ``to_empty()`` on a model built on the meta device."""
        inv_freq, self.attention_factor = rope_frequencies(self.rot_dim, self.theta, self.scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BTHR: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor, interleaved: bool = False):
    """Rotate the first R = cos.shape[-1] channels of each head; the rest pass through (partial rotary).
    cos/sin are (T, R), or (B, T, R) when each row has its own positions."""
    rot = cos_TR.shape[-1]
    partial = rot < x_BTHR.shape[-1]
    x_rot = x_BTHR[..., :rot] if partial else x_BTHR
    if interleaved:
        *lead, r = x_rot.shape
        x_rot = x_rot.reshape(*lead, r // 2, 2).transpose(-1, -2).reshape(*lead, r)
    cos, sin = cos_TR[..., None, :], sin_TR[..., None, :]
    if cos.dtype != x_BTHR.dtype:
        cos, sin = cos.to(x_BTHR.dtype), sin.to(x_BTHR.dtype)
    x_rot = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat([x_rot, x_BTHR[..., rot:]], dim=-1) if partial else x_rot
