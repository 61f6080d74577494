"""Multi-head latent attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

Keys and values are reconstructed from a compressed latent c_kv (kv_lora_rank) plus one rotary key shared by all
heads; queries optionally go through their own low-rank latent (q_lora_rank). Decoding caches only c_kv and the
rotary key.

Legend: B batch, T sequence, D model dim, H heads, N no-rope head dim, R rope head dim, V value head dim,
C kv_lora_rank.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.config import MLAConfig
from smoe.nn.attention import attend
from smoe.nn.norm import RMSNorm
from smoe.nn.rope import apply_rope, yarn_mscale


class MLA(nn.Module):
    def __init__(self, dim: int, config: MLAConfig, norm_eps: float):
        super().__init__()
        self.config = config
        H, qk = config.n_heads, config.qk_head_dim
        if config.q_lora_rank is None:
            self.wq = nn.Linear(dim, H * qk, bias=False)
        else:
            self.wq_a = nn.Linear(dim, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, norm_eps)
            self.wq_b = nn.Linear(config.q_lora_rank, H * qk, bias=False)
        self.wkv_a = nn.Linear(dim, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(config.kv_lora_rank, norm_eps)
        self.wkv_b = nn.Linear(config.kv_lora_rank, H * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.wo = nn.Linear(H * config.v_head_dim, dim, bias=False)
        self.scale = qk**-0.5
        scaling = config.rope_scaling
        if scaling is not None and scaling.type == "yarn" and scaling.mscale_all_dim:
            # DeepSeek folds YaRN's temperature into the softmax scale as well as into cos/sin.
            self.scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        cfg = self.config
        H, N, R, V = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = self.wq(x_BTD) if cfg.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x_BTD)))
        q_nope_BTHN, q_rope_BTHR = q.view(B, T, H, N + R).split([N, R], dim=-1)
        ckv_BTC, k_rope_BTR = self.wkv_a(x_BTD).split([cfg.kv_lora_rank, R], dim=-1)
        kv = self.wkv_b(self.kv_norm(ckv_BTC)).view(B, T, H, N + V)
        k_nope_BTHN, v_BTHV = kv.split([N, V], dim=-1)
        q_rope_BTHR = apply_rope(q_rope_BTHR, cos, sin, interleaved=cfg.rope_interleave)
        k_rope_BT1R = apply_rope(k_rope_BTR.view(B, T, 1, R), cos, sin, interleaved=cfg.rope_interleave)
        q = torch.cat([q_nope_BTHN, q_rope_BTHR], dim=-1)
        k = torch.cat([k_nope_BTHN, k_rope_BT1R.expand(B, T, H, R)], dim=-1)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v_BTHV.transpose(1, 2), None, scale=self.scale)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * V))
