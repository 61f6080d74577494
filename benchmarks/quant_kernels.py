"""The kernel choice for quantised weights, by measurement: one weight-only matmul of a few rows (decode) in each
candidate torch offers and in smoe's kernels, against fp32 ``linear`` on the same weights, in one run.

Candidates: fp32 ``F.linear`` (the peer); torch's ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu``;
dequantise + ``linear`` (smoe's reference, the last fallback); smoe's C++ int8 and int4 kernels (``auto`` where
they build) and its numba ones (the fallback without a compiler). Calls are interleaved
round by round and each contender's median is reported, as time per call, as weight bytes read per second, and as
a speed-up over fp32 (> 1: faster).

    .venv/bin/python benchmarks/quant_kernels.py [--rows 1,4,16] [--shapes 3072x512,512x1536,32000x512]
        [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from smoe import kernels
from smoe.config import QuantConfig
from smoe.kernels import cpp_build, cpp_quant
from smoe.quant.format import dequantize, quantize_weight, unpack_int4


def contenders(x: torch.Tensor, w: torch.Tensor, group: int) -> dict[str, tuple]:
    """name -> (call, weight bytes it reads)."""
    O, I = w.shape
    q8, q4 = quantize_weight(w, QuantConfig("int8")), quantize_weight(w, QuantConfig("int4", group))
    int4_bytes = O * I // 2 + 2 * 4 * O * (I // group)
    # torch's int4 layout: the same values repacked by torch, with (scale, zero) where w = (q - 8) * scale + zero
    q_OI = unpack_int4(q4.qweight, group).flatten(-2).int()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_OI, 1)
    scale_zero = torch.stack([q4.scale, q4.offset + 8 * q4.scale], dim=-1).transpose(0, 1).contiguous()
    out = {"fp32 linear": (lambda: F.linear(x, w), 4 * O * I),
           "torch int8pack_mm": (lambda: torch.ops.aten._weight_int8pack_mm(x, q8.qweight, q8.scale), O * I),
           "torch int4pack_mm": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zero),
                                 int4_bytes),
           "dequantise+linear int8": (lambda: F.linear(x, dequantize(q8)), O * I)}
    if cpp_quant.build() is None:
        cpp = kernels.quantized("cpp", torch.device("cpu"))
        out["smoe cpp int8"] = (lambda: cpp.linear(x, q8), O * I)
        out["smoe cpp int4"] = (lambda: cpp.linear(x, q4), int4_bytes)
    if kernels.HAS_NUMBA:
        numba = kernels.quantized("numba", torch.device("cpu"))
        out["smoe numba int8"] = (lambda: numba.linear(x, q8), O * I)
        out["smoe numba int4"] = (lambda: numba.linear(x, q4), int4_bytes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--shapes", default="3072x512,512x1536,32000x512", help="OUTxIN weights")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--streamed", type=int, default=0, metavar="MB",
                        help="cycle through distinct copies of each weight, at least MB of fp32 weights in all, so "
                             "every call reads its weight from memory as in a model's step, not from cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"median us per call (GB/s of weights, speed-up over fp32 linear), {args.threads} threads, "
          f"{f'weights streamed from {args.streamed} MB of copies' if args.streamed else 'weights hot in cache'}, "
          f"torch {torch.__version__}, C++ kernels {cpp_build.instruction_set()}")
    for B in [int(b) for b in args.rows.split(",")]:
        for shape in args.shapes.split(","):
            O, I = (int(n) for n in shape.split("x"))
            x = torch.randn(B, I)
            copies = [contenders(x, torch.randn(O, I), args.group_size)
                      for _ in range(max(1, -(-args.streamed * 2**20 // (4 * O * I))))]
            calls = copies[0]
            times: dict[str, list[float]] = {k: [] for k in calls}
            repeat = max(3, int(5e7 / (4 * O * I)), len(copies))
            for fn, _ in calls.values():
                fn()
            for _ in range(args.rounds):
                for key in calls:
                    fns = [copy[key][0] for copy in copies]
                    start = time.perf_counter()
                    for i in range(repeat):
                        fns[i % len(fns)]()
                    times[key].append((time.perf_counter() - start) / repeat)
            med = {k: statistics.median(v) for k, v in times.items()}
            cells = [f"{k} {med[k] * 1e6:.0f} ({calls[k][1] / med[k] / 1e9:.1f}, {med['fp32 linear'] / med[k]:.2f}x)"
                     for k in calls]
            print(f"rows {B:>2} {O}x{I}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
