"""This CPU as ``smoe cost`` prices it: smoe.hardware's measurements plus the rates of smoe's int8 / int4 kernels,
which run below the fp32 GEMM's peak (int8 widens every weight to fp32 before the multiply-add, int4 unpacks its
nibbles and scales every block): a 16-row int8 decode step is compute-bound on a CPU where fp32's is memory-bound
(docs/cost.md)."""

from __future__ import annotations

from dataclasses import replace

import torch

from smoe import hardware
from smoe.config import QuantConfig
from smoe.kernels import quantized
from smoe.quant.format import quantize_weight


def quantized_matmul_flops(scheme: str, rows: int = 16, size: int = 1024, seconds: float = 0.1,
                           windows: int = 5) -> float:
    """FLOP/s of ``rows`` fp32 rows times a ``size`` x ``size`` weight quantised to ``scheme`` (int8, or int4 in
    groups of 64) with the kernels ``smoe.quantize`` runs here (smoe.kernels.quantized): a weight small enough to
    stay in cache, so the multiply-adds and the widening of the weights bound it, not memory. The best window, as
    ``smoe.hardware.matmul_flops``."""
    w = quantize_weight(torch.randn(size, size), QuantConfig(scheme, 64 if scheme == "int4" else None))
    x = torch.randn(rows, size)
    linear = quantized("auto", x.device).linear
    return hardware.best_rate(lambda: linear(x, w), 2 * rows * size**2, seconds, windows)


def cpu_profile() -> hardware.Hardware:
    """``smoe.hardware.measure_cpu()`` with the int8 and int4 rates of a 16-row decode batch through smoe's
    kernels (``quantized_matmul_flops``) among its peaks."""
    cpu = hardware.measure_cpu()
    peaks = {**cpu.peak_flops, **{scheme: quantized_matmul_flops(scheme) for scheme in ("int8", "int4")}}
    return replace(cpu, peak_flops=peaks, source=f"{cpu.source}; 16 rows x 1024^2 int8 / int4 weights through "
                                                    f"smoe's quantised kernels")
