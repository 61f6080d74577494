"""Weight initialisation shared by every module: N(0, std) matrices, zero biases, unit norm weights; the
linear-attention layers' decays, convolutions and norms by their own ``reset_parameters``."""

from __future__ import annotations

import torch
from torch import nn

from smoe.nn.linear_layers import GatedDeltaNet, LightningAttention
from smoe.nn.norm import LayerNorm, RMSNorm


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (RMSNorm, LayerNorm)):
            m.weight.fill_(1.0)
            continue
        if isinstance(m, (GatedDeltaNet, LightningAttention)):  # its projections are visited as modules of their own
            m.reset_parameters()
            continue
        for p in m.parameters(recurse=False):
            if p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, std)
