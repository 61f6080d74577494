"""Fixed-shape expert backend: every GEMM has exactly ``TILE_ROWS`` rows, whatever the routing.

Legend: R rows sorted by expert, D model dim, E experts, F expert hidden dim, c rows of one expert.

Why: a BLAS picks its kernel and its order of summation from the problem's shape (MKL computes a row of a 1-row,
a 3-row and a 64-row product differently), so with the usual backends a token's expert output changes in the last
bits with how many other tokens chose the same expert. Here expert e's c rows are padded to a multiple of
``TILE_ROWS`` and computed tile by tile, so each row meets the same GEMM shape every time; within one shape a row's
result does not depend on the other rows (tests/test_generate.py checks it end to end). The decode engine
(smoe.generation) runs its steps with this backend, so a request's tokens never depend on its neighbours. The cost:
up to ``TILE_ROWS - 1`` padding rows per active expert, and one Python iteration per tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoe.kernels.registry import register
from smoe.nn.mlp import gated_act

# Small: a decode step gives each active expert a row or a few, so this bounds the padding, and larger tiles only
# pay off in prefills, which the engine runs with the fast backends.
TILE_ROWS = 4


@register("tiled")
def tiled_experts(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation):
    outputs = []
    for e, rows_cD in enumerate(torch.split(x_RD, counts_E.tolist())):
        c = rows_cD.shape[0]
        # An idle expert's empty product keeps the output connected to every input, as the reference's is.
        tiles = F.pad(rows_cD, (0, 0, 0, -c % TILE_ROWS)).split(TILE_ROWS) if c else [rows_cD]
        for tile in tiles:
            gate, up = (tile @ w_gate_up_E2FD[e].t()).chunk(2, dim=-1)
            outputs.append(gated_act(gate, up, activation) @ w_down_EDF[e].t())
        if c % TILE_ROWS:
            outputs[-1] = outputs[-1][: c % TILE_ROWS]
    return torch.cat(outputs)
