"""The spec: a plain loop over experts. Every faster backend is tested against this one."""

from __future__ import annotations

import torch

from smoe.nn.mlp import gated_act


def reference_experts(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation):
    outputs = []
    for e, rows in enumerate(torch.split(x_RD, counts_E.tolist())):
        gate, up = (rows @ w_gate_up_E2FD[e].t()).chunk(2, dim=-1)
        outputs.append(gated_act(gate, up, activation) @ w_down_EDF[e].t())
    return torch.cat(outputs) if outputs else x_RD.new_zeros(0, w_down_EDF.shape[1])
