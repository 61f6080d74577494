"""Grouped-query attention via scaled_dot_product_attention (causal, optional sliding window).

Legend: B batch, T sequence, D model dim, H query heads, G key/value heads, K head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import AttentionConfig
from smoe.nn.norm import RMSNorm
from smoe.nn.rope import apply_rope


def causal_mask(T: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """None when plain causal attention suffices (SDPA's is_causal), else a boolean (T, T) mask."""
    if window is None or window >= T:
        return None
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j < window)


def attend(q_BHTK, k_BGTK, v_BGTV, window: int | None, scale: float | None = None) -> torch.Tensor:
    T = q_BHTK.shape[2]
    mask = causal_mask(T, window, q_BHTK.device)
    gqa = k_BGTK.shape[1] != q_BHTK.shape[1]
    return F.scaled_dot_product_attention(
        q_BHTK, k_BGTK, v_BGTV, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
    )


class Attention(nn.Module):
    def __init__(self, dim: int, config: AttentionConfig, norm_eps: float):
        super().__init__()
        self.config = config
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.resolved_head_dim(dim)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(dim, q_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(dim, kv_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(dim, kv_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(q_dim, dim, bias=False)
        if config.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, norm_eps), RMSNorm(self.head_dim, norm_eps)
        elif config.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(q_dim, norm_eps), RMSNorm(kv_dim, norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        cfg = self.config
        q, k, v = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:  # after the full qk-norm, as OLMoE applies them
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cfg.sliding_window)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))
