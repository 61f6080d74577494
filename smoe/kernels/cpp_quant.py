"""The ``cpp`` backend's kernels for quantised weights: weight-only int8 / int4 kernels in C++ (cpp_quant.cpp, whose
header says how they work), compiled on first use with the other C++ kernels (cpp_build.py) and registered as
``torch.ops.smoe_quant``.

Why a compiled op (docs/quantization.md has the numbers): its loops run on torch's own thread pool
(``at::parallel_for``), so several threads speed up decode instead of competing with the next torch op for the
cores as numba's pool does; it prefetches the next channels' weights, which doubles the rate at which one thread
streams them from memory; and it unpacks int4 nibbles in registers instead of into a scratch buffer.

``build()`` compiles or loads them and returns None, or says why it cannot (no compiler, a failed build): then
``auto`` runs numba or the reference (smoe.kernels.quantized).

Legend: B rows, I inputs, O outputs, R rows sorted by expert, D model dim, E experts.
"""

from __future__ import annotations

import torch

from smoe.kernels import cpp_build
from smoe.kernels.qweight import QWeight
from smoe.kernels.registry import Assignments, Kernels


def _register_shapes() -> None:
    """Output shapes of the ops for tracing (torch.compile, fake tensors); the kernels stay opaque to it."""
    @torch.library.register_fake("smoe_quant::linear")
    def _(x, q, scale, offset, group):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("smoe_quant::experts")
    def _(x, offs, gu_q, gu_s, gu_z, gu_group, down_q, down_s, down_z, down_group, gelu):
        return x.new_empty(x.shape[0], down_q.shape[1])

    @torch.library.register_fake("smoe_quant::moe")
    def _(x, ids, weights, gu_q, gu_s, gu_z, gu_group, down_q, down_s, down_z, down_group, gelu):
        return x.new_empty(x.shape[0], down_q.shape[1])


# Compiles (or loads) the C++ kernels on first call (smoe.kernels.cpp_build); None when these ops are ready.
build = cpp_build.ops_builder(_register_shapes)


def _offset(w: QWeight) -> tuple[torch.Tensor | None, int]:
    return w.offset, w.group_size or 0


def linear(x_BI: torch.Tensor, w: QWeight) -> torch.Tensor:
    return torch.ops.smoe_quant.linear(x_BI.contiguous(), w.qweight, w.scale, *_offset(w))


def experts(x_RD: torch.Tensor, counts_E: torch.Tensor, w_gate_up: QWeight, w_down: QWeight, activation: str
            ) -> torch.Tensor:
    return torch.ops.smoe_quant.experts(x_RD.contiguous(), cpp_build.row_offsets(counts_E), w_gate_up.qweight,
                                        w_gate_up.scale, *_offset(w_gate_up), w_down.qweight, w_down.scale,
                                        *_offset(w_down), activation == "gelu")


def tokens(x_ND: torch.Tensor, assignments: Assignments, w_gate_up: QWeight, w_down: QWeight, activation: str
           ) -> torch.Tensor:
    """From the unsorted tokens: the op groups the assignments by expert with a counting sort."""
    weights_A = assignments.weights_A.to(torch.float32).contiguous()
    return torch.ops.smoe_quant.moe(x_ND.contiguous(), assignments.expert_ids_A.contiguous(), weights_A,
                                    w_gate_up.qweight, w_gate_up.scale, *_offset(w_gate_up), w_down.qweight,
                                    w_down.scale, *_offset(w_down), activation == "gelu")


# Row independent: the build's -ffp-contract=off and tiles that compute a row alike whatever their shape
# (docs/quantization.md, "Row independence").
KERNELS = Kernels(experts, tokens, sorts_tokens=True, linear=linear, row_independent=True)
