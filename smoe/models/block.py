"""A transformer block (pre-norm: x + attn(norm(x)), then x + ffn(norm(x))) and DeepSeek-V3's multi-token prediction
module around one. The token mixer is GQA or MLA per the attention config, or, in the layers layout.layer_types makes
linear, a linear-attention layer (smoe.nn.linear_layers), each called the same way (smoe.nn.mixer); the FFN is a dense
MLP, an MoE layer, or (Arctic) an MoE layer plus a dense MLP in parallel; MiniMax-01 adds to the normalised input
instead (config.residual).

Legend: B batch, T sequence (new tokens), S slots (cached + new), D model dim.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe.config import MLAConfig, ModelConfig
from smoe.kernels import BackendRequest
from smoe.moe import MoELayer, RouterStats, RouterStatsMode
from smoe.nn import MLA, MLP, Attention, LayerCache, MixerStep, make_linear_attention, make_norm


class Block(nn.Module):
    """Layer ``layer`` of the model (None: an MTP module's block, full attention)."""

    def __init__(self, config: ModelConfig, moe: bool, layer: int | None = None):
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.attn_norm = make_norm(config.norm, dim, eps)
        attn = config.attention
        self.is_linear = layer is not None and config.layout.is_linear(layer)
        if self.is_linear:
            self.attn = make_linear_attention(dim, config.linear_attention, layer, config.n_layers, eps)
        else:
            self.attn = MLA(dim, attn, eps) if isinstance(attn, MLAConfig) else Attention(dim, attn, eps)
        res = config.residual
        # (alpha, beta) of each sublayer's residual, None for the plain x + f(norm(x))
        self.attn_scale = self.ffn_scale = None
        if res is not None:
            self.attn_scale = ((res.linear_attention_alpha, res.linear_attention_beta) if self.is_linear
                               else (res.attention_alpha, res.attention_beta))
            self.ffn_scale = (res.ffn_alpha, res.ffn_beta)
        self.ffn_norm = make_norm(config.norm, dim, eps)
        self.is_moe = moe
        if moe:
            self.ffn = MoELayer(dim, config.moe, config.activation, config.init_std)
        else:
            self.ffn = MLP(dim, config.ffn_dim, config.activation)
        self.residual_norm = self.residual_ffn = None
        if moe and config.layout.dense_residual:
            self.residual_norm = make_norm(config.norm, dim, eps)
            self.residual_ffn = MLP(dim, config.ffn_dim, config.activation)

    def forward(self, x_BTD: torch.Tensor, step: MixerStep, *, cache: LayerCache | None = None,
                token_ids_BT: torch.Tensor | None = None, router_stats: RouterStatsMode = RouterStatsMode.ALL,
                expert_backend: str | BackendRequest | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        """The block over ``x_BTD``: its mixer gets ``step`` and this layer's ``cache`` (smoe.nn.mixer), the MoE FFN
        routes the real tokens (``step.real_BT``) by ``token_ids_BT`` (hash routing) on ``expert_backend`` (default:
        the layer's) and reports ``router_stats``."""
        h_BTD = self.attn_norm(x_BTD)
        x_BTD = _residual(x_BTD, h_BTD, self.attn(h_BTD, step, cache), self.attn_scale)
        stats = None
        h_BTD = self.ffn_norm(x_BTD)
        if self.is_moe:
            ffn_BTD, stats = self.ffn(h_BTD, token_ids_BT, stats=router_stats, keep=step.real_BT,
                                      backend=expert_backend)
        else:
            ffn_BTD = self.ffn(h_BTD)
        if self.residual_ffn is not None:
            ffn_BTD = ffn_BTD + self.residual_ffn(self.residual_norm(x_BTD))
        return _residual(x_BTD, h_BTD, ffn_BTD, self.ffn_scale), stats


def _residual(x_BTD, normed_BTD, out_BTD, scale: tuple[float, float] | None) -> torch.Tensor:
    """x + f(norm(x)), or with MiniMax-01's scale (alpha, beta): alpha * norm(x) + beta * f(norm(x))."""
    if scale is None:
        return x_BTD + out_BTD
    alpha, beta = scale
    return alpha * normed_BTD + beta * out_BTD


class MTPModule(nn.Module):
    """DeepSeek-V3 §2.2 multi-token prediction: combine the previous depth's hidden state at position t with the
    embedding of token t+d, run one block, and predict token t+d+1 through the shared head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.hidden_norm = make_norm(config.norm, dim, eps)
        self.embed_norm = make_norm(config.norm, dim, eps)
        self.proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = Block(config, moe=config.moe is not None and config.layout.is_moe(config.n_layers - 1))
        self.norm = make_norm(config.norm, dim, eps)

    def forward(self, h_BTD: torch.Tensor, emb_BTD: torch.Tensor, step: MixerStep,
                token_ids_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        x = self.proj(torch.cat([self.hidden_norm(h_BTD), self.embed_norm(emb_BTD)], dim=-1))
        return self.block(x, step, token_ids_BT=token_ids_BT)
