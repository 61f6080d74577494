"""Fixed-shape tiles: row independence for kernels that do not keep it by themselves, by running every GEMM with
exactly ``TILE_ROWS`` rows, whatever the routing.

Legend: R rows sorted by expert, D model dim, E experts, F expert hidden dim, c rows of one expert.

Why: a BLAS picks its kernel and its order of summation from the problem's shape (MKL computes a row of a 1-row,
a 3-row and a 64-row product differently), so with the usual backends a token's expert output changes in the last
bits with how many other tokens chose the same expert. Here expert e's c rows are padded to a multiple of
``TILE_ROWS`` and computed tile by tile, so each row meets the same GEMM shape every time; within one shape a row's
result does not depend on the other rows (tests/test_backends.py checks it row by row, tests/test_generate.py end to
end). What the decode engine gets when it asks for row independence (smoe.kernels.ROW_INDEPENDENT). Float weights
run the spec's maths tile by tile (``spec_tiles``; calling a backend's kernels once per tile adds several ops per
expert to every decode step); quantised weights run the backend's own kernels, one tile per call
(``kernel_tiles``). The cost: up to ``TILE_ROWS - 1`` padding rows per active expert, and one Python iteration per
tile.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.nn.functional as F

from smoe.kernels.qweight import QWeight
from smoe.kernels.registry import Backend, ExpertBackend, Kernels
from smoe.nn.mlp import gated_act

# Small: a decode step gives each active expert a row or a few, so this bounds the padding, and larger tiles only
# pay off in prefills, which the engine runs with the fast backends.
TILE_ROWS = 4


def spec_tiles(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation):
    """The reference's maths (smoe.kernels.reference) on each expert's rows, one tile at a time."""
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


def kernel_tiles(experts: ExpertBackend, x_RD: torch.Tensor, counts_E: torch.Tensor, w_gate_up: QWeight,
                 w_down: QWeight, activation: str) -> torch.Tensor:
    """Quantised ``experts`` on each expert's rows, padded to whole tiles, one tile per call with that expert's
    stack of one."""
    one_tile = torch.tensor([TILE_ROWS])
    y_RD = x_RD.new_zeros(x_RD.shape[0], w_down.qweight.shape[-2])
    start = 0
    for e, c in enumerate(counts_E.tolist()):
        if c:
            tiles = F.pad(x_RD[start : start + c], (0, 0, 0, -c % TILE_ROWS)).split(TILE_ROWS)
            gate_up_e, down_e = w_gate_up.expert(e, keepdim=True), w_down.expert(e, keepdim=True)
            y_RD[start : start + c] = torch.cat([experts(tile, one_tile, gate_up_e, down_e, activation)
                                                 for tile in tiles])[:c]
        start += c
    return y_RD


SPEC_TILES = Kernels(spec_tiles, row_independent=True)


@functools.cache
def fixed_shape(backend: Backend) -> Backend:
    """``backend`` with row independence (``tiled(name)``): its kernels that keep it as they are; float weights
    otherwise run the spec in tiles (so ``smoe.kernels`` makes float weights row independent with
    ``fixed_shape(reference)``), quantised weights its own kernels one tile per call. Rows sorted by expert only (no
    ``tokens``)."""
    floating, quantized = backend.floating, backend.quantized
    if floating is not None and not floating.row_independent:
        floating = SPEC_TILES
    if quantized is not None and not quantized.row_independent:
        quantized = Kernels(functools.partial(kernel_tiles, quantized.experts), linear=quantized.linear,
                            row_independent=True)
    return replace(backend, name=f"tiled({backend.name})", floating=floating, quantized=quantized)
