"""Weight-only int8 / int4 kernels for CPU decode, compiled by numba (LLVM) on first use and cached on disk: the
``numba`` backend's kernels for quantised weights, checked against the dequantise-then-matmul spec
(quantized_reference.py) in tests/test_quant.py. The only module that imports numba.

Why numba (docs/quantization.md has the measurements): decoding multiplies a few rows by each weight, so its time
is the weight bytes read. On this CPU torch's ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu``,
torchao's eager int8 and dequantise + ``linear`` all ran slower than fp32 ``linear``; a loop LLVM vectorises reads
int8 weights at about copy bandwidth, as fast as the same loop built as a C++ op, with no compiler at run time.

The tile: four output channels times four rows per pass over the inputs, so each weight loaded feeds four rows
and each input four channels; int8 weights become fp32 in registers and a channel's scale is applied once, at the
end. int4 rows are first dequantised (scale and offset per group) into an fp32 scratch of four rows, which the same
tile reads: the unpacking is paid once per weight, not once per row. The activations int4 multiplies are first
rounded to int8 per block where the format says so (smoe.kernels.qweight.int8_activations), as the spec does. With
several torch threads, large calls split the blocks of four output channels over as many numba threads
(``_build``); otherwise a serial build runs.

Legend: B rows, I inputs, O outputs, G group size, E experts, F expert hidden dim, R rows sorted by expert.
"""

from __future__ import annotations

import math
import types

import numba
import numpy as np
import torch
from numba import float32, njit, prange

from smoe.kernels.qweight import QWeight, int8_activations, quantize_activations
from smoe.kernels.registry import Kernels

# Reassociation lets LLVM vectorise the dot products; no "nnan"/"ninf", so silu's exp may still overflow to inf.
_JIT = {"fastmath": {"reassoc", "contract", "nsz", "arcp"}, "nogil": True, "cache": True}
TILE = 4
GELU_C = math.sqrt(2 / math.pi)


@njit(**_JIT)
def _tile(x_BI, r0, r1, w_nI, s_n, out_BO, o):
    """out[r, o + j] = s[j] * (x[r] . w[j]) for rows r in [r0, r1) and the n <= 4 rows j of w."""
    n, I = w_nI.shape  # noqa: E741 (the legend's I: inputs)
    if n < TILE:
        for j in range(n):
            for r in range(r0, r1):
                acc = float32(0.0)
                for i in range(I):
                    acc += x_BI[r, i] * float32(w_nI[j, i])
                out_BO[r, o + j] = acc * s_n[j]
        return
    w0, w1, w2, w3 = w_nI[0], w_nI[1], w_nI[2], w_nI[3]
    r = r0
    while r + TILE <= r1:
        x0, x1, x2, x3 = x_BI[r], x_BI[r + 1], x_BI[r + 2], x_BI[r + 3]
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = float32(0.0)
        a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = float32(0.0)
        for i in range(I):
            f0, f1, f2, f3 = float32(w0[i]), float32(w1[i]), float32(w2[i]), float32(w3[i])
            a00 += x0[i] * f0; a01 += x0[i] * f1; a02 += x0[i] * f2; a03 += x0[i] * f3  # noqa: E702
            a10 += x1[i] * f0; a11 += x1[i] * f1; a12 += x1[i] * f2; a13 += x1[i] * f3  # noqa: E702
            a20 += x2[i] * f0; a21 += x2[i] * f1; a22 += x2[i] * f2; a23 += x2[i] * f3  # noqa: E702
            a30 += x3[i] * f0; a31 += x3[i] * f1; a32 += x3[i] * f2; a33 += x3[i] * f3  # noqa: E702
        _store4(out_BO, r, o, a00, a01, a02, a03, s_n)
        _store4(out_BO, r + 1, o, a10, a11, a12, a13, s_n)
        _store4(out_BO, r + 2, o, a20, a21, a22, a23, s_n)
        _store4(out_BO, r + 3, o, a30, a31, a32, a33, s_n)
        r += TILE
    while r < r1:
        xr = x_BI[r]
        a0 = a1 = a2 = a3 = float32(0.0)
        for i in range(I):
            a0 += xr[i] * float32(w0[i]); a1 += xr[i] * float32(w1[i])  # noqa: E702
            a2 += xr[i] * float32(w2[i]); a3 += xr[i] * float32(w3[i])  # noqa: E702
        _store4(out_BO, r, o, a0, a1, a2, a3, s_n)
        r += 1


@njit(**_JIT)
def _store4(out_BO, r, o, a0, a1, a2, a3, s_n):
    out_BO[r, o] = a0 * s_n[0]
    out_BO[r, o + 1] = a1 * s_n[1]
    out_BO[r, o + 2] = a2 * s_n[2]
    out_BO[r, o + 3] = a3 * s_n[3]


@njit(**_JIT)
def _dequantize_int4(q_nH, scale_nN, offset_nN, G, w_nI):
    """w[j] = row j of the packed int4 rows q, dequantised (smoe.kernels.qweight)."""
    H = G // 2
    for j in range(q_nH.shape[0]):
        for g in range(scale_nN.shape[1]):
            s, z = scale_nN[j, g], offset_nN[j, g]
            low, high, q = w_nI[j, g * G : g * G + H], w_nI[j, g * G + H : (g + 1) * G], q_nH[j, g * H : (g + 1) * H]
            for k in range(H):
                v = np.int32(q[k])  # 32-bit lanes: numba would widen uint8 arithmetic to int64
                low[k] = float32(v & 15) * s + z
                high[k] = float32(v >> 4) * s + z


@njit(**_JIT)
def _int4_block(x_BI, r0, r1, q_OH, scale_ON, offset_ON, G, out_BO, o, ones):
    n = min(TILE, q_OH.shape[0] - o)
    w_nI = np.empty((n, x_BI.shape[1]), np.float32)
    _dequantize_int4(q_OH[o : o + n], scale_ON[o : o + n], offset_ON[o : o + n], G, w_nI)
    _tile(x_BI, r0, r1, w_nI, ones, out_BO, o)


def _int8_linear(x_BI, q_OI, scale_O, out_BO):
    for block in prange((q_OI.shape[0] + TILE - 1) // TILE):
        o = block * TILE
        _tile(x_BI, 0, x_BI.shape[0], q_OI[o : o + TILE], scale_O[o : o + TILE], out_BO, o)


def _int4_linear(x_BI, q_OH, scale_ON, offset_ON, G, out_BO):
    ones = np.ones(TILE, np.float32)
    for block in prange((q_OH.shape[0] + TILE - 1) // TILE):
        _int4_block(x_BI, 0, x_BI.shape[0], q_OH, scale_ON, offset_ON, G, out_BO, block * TILE, ones)


@njit(**_JIT)
def _gated(h_R2F, r0, r1, gelu, a_RF):
    """a = act(gate) * up on rows [r0, r1): silu, or gelu's tanh approximation."""
    F = a_RF.shape[1]
    for r in range(r0, r1):
        for j in range(F):
            g = h_R2F[r, j]
            if gelu:
                inner = float32(GELU_C) * (g + float32(0.044715) * g * g * g)
                act = float32(0.5) * g * (float32(1.0) + math.tanh(inner))
            else:
                act = g / (float32(1.0) + math.exp(-g))
            a_RF[r, j] = act * h_R2F[r, F + j]


def _int8_experts(x_RD, offs, gu_q, gu_s, down_q, down_s, gelu, h_R2F, a_RF, y_RD):
    for e in range(offs.shape[0] - 1):
        r0, r1 = offs[e], offs[e + 1]
        if r0 == r1:
            continue
        for block in prange((gu_q.shape[1] + TILE - 1) // TILE):
            o = block * TILE
            _tile(x_RD, r0, r1, gu_q[e, o : o + TILE], gu_s[e, o : o + TILE], h_R2F, o)
        _gated(h_R2F, r0, r1, gelu, a_RF)
        for block in prange((down_q.shape[1] + TILE - 1) // TILE):
            o = block * TILE
            _tile(a_RF, r0, r1, down_q[e, o : o + TILE], down_s[e, o : o + TILE], y_RD, o)


@njit(**_JIT)
def _round_activations(x_RI, r0, r1, G):
    """Rows [r0, r1) of x rounded to int8 per block of 64 inputs in place (smoe.kernels.qweight.quantize_activations,
    the spec: block b holds the inputs of packed bytes 32b .. 32b + 31, low nibbles' then high nibbles'; a block
    holding inf or NaN becomes NaN throughout)."""
    H = G // 2
    for r in range(r0, r1):
        for b in range(x_RI.shape[1] // 64):
            top = float32(0.0)
            finite = True
            for k in range(32):
                p = 32 * b + k
                at = p // H * G + p % H
                top = max(top, abs(x_RI[r, at]), abs(x_RI[r, at + H]))
                finite = finite and np.isfinite(x_RI[r, at]) and np.isfinite(x_RI[r, at + H])
            if top == 0:
                continue
            inverse, scale = (float32(127.0) / top, top / float32(127.0)) if finite else (float32(0.0), np.nan)
            for k in range(32):
                p = 32 * b + k
                at = p // H * G + p % H
                x_RI[r, at] = np.rint(x_RI[r, at] * inverse) * scale
                x_RI[r, at + H] = np.rint(x_RI[r, at + H] * inverse) * scale


def _int4_experts(x_RD, offs, gu_q, gu_s, gu_z, gu_G, down_q, down_s, down_z, down_G, gelu, h_R2F, a_RF, y_RD,
                  round_down):
    ones = np.ones(TILE, np.float32)
    for e in range(offs.shape[0] - 1):
        r0, r1 = offs[e], offs[e + 1]
        if r0 == r1:
            continue
        for block in prange((gu_q.shape[1] + TILE - 1) // TILE):
            _int4_block(x_RD, r0, r1, gu_q[e], gu_s[e], gu_z[e], gu_G, h_R2F, block * TILE, ones)
        _gated(h_R2F, r0, r1, gelu, a_RF)
        if round_down:
            _round_activations(a_RF, r0, r1, down_G)
        for block in prange((down_q.shape[1] + TILE - 1) // TILE):
            _int4_block(a_RF, r0, r1, down_q[e], down_s[e], down_z[e], down_G, y_RD, block * TILE, ones)


def _compiled(fn):
    """(serial, parallel) builds of ``fn``; ``prange`` is a plain ``range`` in the first. The serial copy gets its
    own name, so the two builds are cached on disk under different entries."""
    serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial")
    serial.__qualname__ = fn.__qualname__ + "_serial"
    return njit(**_JIT)(serial), njit(parallel=True, **_JIT)(fn)


_INT8_LINEAR, _INT4_LINEAR = _compiled(_int8_linear), _compiled(_int4_linear)
_INT8_EXPERTS, _INT4_EXPERTS = _compiled(_int8_experts), _compiled(_int4_experts)

# Multiply-adds below which a call runs serially even when torch has several threads. A parallel region hands the
# work to numba's thread pool, whose threads wait or spin between calls and take the core the next torch op needs:
# on one thread a decode step of the benchmark's Mixtral-like model took 35 ms with the parallel build against 18 ms
# serially (557 against 68 ms under numba's OpenMP layer on a busy VM), and a call of a 64 x 64 linear 6 ms.
SERIAL_BELOW = 2**18


def _build(kernel, macs: int):
    """The build of ``kernel`` for a call of ``macs`` multiply-adds: serial on one torch thread or for small calls,
    else parallel on as many numba threads as torch uses."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads == 1 or macs < SERIAL_BELOW:
        return kernel[0]
    numba.set_num_threads(threads)
    return kernel[1]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _rounded(x_BI: torch.Tensor, w: QWeight) -> torch.Tensor:
    """x as int4 weight w multiplies it: rounded to int8 per block where the format says so."""
    return quantize_activations(x_BI, w.group_size) if int8_activations(w) else x_BI


def linear(x_BI: torch.Tensor, w: QWeight) -> torch.Tensor:
    out_BO = torch.empty(x_BI.shape[0], w.qweight.shape[0])
    macs = out_BO.numel() * x_BI.shape[1]
    if w.offset is None:
        _build(_INT8_LINEAR, macs)(_np(x_BI), _np(w.qweight), _np(w.scale), out_BO.numpy())
    else:
        _build(_INT4_LINEAR, macs)(_np(_rounded(x_BI, w)), _np(w.qweight), _np(w.scale), _np(w.offset),
                                   w.group_size, out_BO.numpy())
    return out_BO


def experts(x_RD: torch.Tensor, counts_E: torch.Tensor, w_gate_up: QWeight, w_down: QWeight, activation: str
            ) -> torch.Tensor:
    R, F = x_RD.shape[0], w_down.in_features
    macs = R * 3 * F * x_RD.shape[1]
    offs = np.zeros(counts_E.shape[0] + 1, np.int64)
    np.cumsum(counts_E.cpu().numpy(), out=offs[1:])
    h_R2F, a_RF = np.empty((R, 2 * F), np.float32), np.empty((R, F), np.float32)
    y_RD = torch.empty(R, w_down.qweight.shape[-2])
    gelu = activation == "gelu"
    if w_gate_up.offset is None:
        _build(_INT8_EXPERTS, macs)(_np(x_RD), offs, _np(w_gate_up.qweight), _np(w_gate_up.scale),
                                    _np(w_down.qweight), _np(w_down.scale), gelu, h_R2F, a_RF, y_RD.numpy())
    else:
        _build(_INT4_EXPERTS, macs)(_np(_rounded(x_RD, w_gate_up)), offs, _np(w_gate_up.qweight),
                                    _np(w_gate_up.scale), _np(w_gate_up.offset), w_gate_up.group_size,
                                    _np(w_down.qweight), _np(w_down.scale), _np(w_down.offset), w_down.group_size,
                                    gelu, h_R2F, a_RF, y_RD.numpy(), int8_activations(w_down))
    return y_RD


KERNELS = Kernels(experts, linear=linear)
