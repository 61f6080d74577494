"""The ``cpp`` backend's float kernels: the routed experts' forward and backward in C++ (cpp_experts.cpp, whose
header says how), for fp32 on the CPU, registered as ``torch.ops.smoe_experts`` and compiled on first use with the
other C++ kernels (cpp_build.py).

Why (docs/benchmarks.md has the numbers): each expert is one task on one thread, its GEMMs and gated activation back
to back, and the threads share the experts out, instead of every small GEMM being split over the threads with a
barrier each and every op being a Python call. Other dtypes are computed in fp32 and cast back (on a CPU with native
bf16 GEMMs ``auto`` keeps ``expert_loop``, which uses them).

Legend: N tokens, A = N*K token-major assignments, R rows sorted by expert, D model dim, E experts, F expert hidden
dim.
"""

from __future__ import annotations

import torch

from smoe.kernels import cpp_build
from smoe.kernels.registry import Assignments, Kernels


def _register_shapes() -> None:
    """Output shapes of the ops for tracing (torch.compile, fake tensors); the kernels stay opaque to it."""
    @torch.library.register_fake("smoe_experts::forward")
    def _(x, offs, w_gate_up, w_down, gelu):
        return x.new_empty(x.shape), x.new_empty(x.shape[0], w_gate_up.shape[1])

    @torch.library.register_fake("smoe_experts::backward")
    def _(dy, x, h, offs, w_gate_up, w_down, gelu, need_x, need_gate_up, need_down):
        return (x.new_empty(x.shape if need_x else (0,)), x.new_empty(w_gate_up.shape if need_gate_up else (0,)),
                x.new_empty(w_down.shape if need_down else (0,)))

    @torch.library.register_fake("smoe_experts::forward_tokens")
    def _(x, weights, order, offs, w_gate_up, w_down, gelu):
        R = order.shape[0]
        return x.new_empty(x.shape), x.new_empty(R, w_gate_up.shape[1]), x.new_empty(R, x.shape[1])

    @torch.library.register_fake("smoe_experts::backward_tokens")
    def _(dy, x, weights, order, offs, h, y, w_gate_up, w_down, gelu, need_x, need_weights, need_gate_up,
          need_down):
        return (x.new_empty(x.shape if need_x else (0,)), x.new_empty(weights.shape if need_weights else (0,)),
                x.new_empty(w_gate_up.shape if need_gate_up else (0,)),
                x.new_empty(w_down.shape if need_down else (0,)))


# Compiles (or loads) the C++ kernels on first call (smoe.kernels.cpp_build); None when these ops are ready.
build = cpp_build.ops_builder(_register_shapes)


class _CppExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w_gate_up_E2FD, w_down_EDF, offs_E1, gelu):
        y_RD, h_R2F = torch.ops.smoe_experts.forward(x_RD, offs_E1, w_gate_up_E2FD, w_down_EDF, gelu)
        ctx.save_for_backward(x_RD, w_gate_up_E2FD, w_down_EDF, offs_E1, h_R2F)
        ctx.gelu = gelu
        return y_RD

    @staticmethod
    def backward(ctx, dy_RD):
        x_RD, w_gate_up_E2FD, w_down_EDF, offs_E1, h_R2F = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads = torch.ops.smoe_experts.backward(dy_RD.contiguous(), x_RD, h_R2F, offs_E1, w_gate_up_E2FD,
                                                w_down_EDF, ctx.gelu, *needs)
        return *(g if need else None for g, need in zip(grads, needs, strict=True)), None, None


class _CppExpertsTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weights_A, w_gate_up_E2FD, w_down_EDF, order_R, offs_E1, gelu):
        y_ND, h_R2F, y_RD = torch.ops.smoe_experts.forward_tokens(x_ND, weights_A, order_R, offs_E1,
                                                                  w_gate_up_E2FD, w_down_EDF, gelu)
        ctx.save_for_backward(x_ND, weights_A, w_gate_up_E2FD, w_down_EDF, order_R, offs_E1, h_R2F, y_RD)
        ctx.gelu = gelu
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, weights_A, w_gate_up_E2FD, w_down_EDF, order_R, offs_E1, h_R2F, y_RD = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        grads = torch.ops.smoe_experts.backward_tokens(dy_ND.contiguous(), x_ND, weights_A, order_R, offs_E1, h_R2F,
                                                       y_RD, w_gate_up_E2FD, w_down_EDF, ctx.gelu, *needs)
        return *(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None


def experts(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation):
    fp32 = [t.float().contiguous() for t in (x_RD, w_gate_up_E2FD, w_down_EDF)]
    return _CppExperts.apply(*fp32, cpp_build.row_offsets(counts_E), activation == "gelu").to(x_RD.dtype)


def tokens(x_ND, assignments: Assignments, w_gate_up_E2FD, w_down_EDF, activation):
    """From the unsorted tokens, by the caller's sort: each task gathers its expert's token rows itself."""
    fp32 = [t.float().contiguous() for t in (x_ND, assignments.weights_A, w_gate_up_E2FD, w_down_EDF)]
    return _CppExpertsTokens.apply(*fp32, assignments.order_R.contiguous(), cpp_build.row_offsets(assignments.counts_E),
                                   activation == "gelu").to(x_ND.dtype)


KERNELS = Kernels(experts, tokens)
