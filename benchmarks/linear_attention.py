"""Training-step time of one linear-attention layer against the softmax attention layer it replaces (issue 15), at
the hybrid suite's width: forward + backward of a (B, T, 256) batch, fp32, on this CPU. Each Gated DeltaNet row is
timed with and without the decay floor of smoe/nn/linear_attention.py (decays below exp(-60) set to 0, which keeps
the chunked form's products out of denormal numbers); the layers keep their initial decay rates.

Contenders are interleaved round by round; the table gives each one's median over rounds with the range, and the
ratio of medians to attention.

    .venv/bin/python benchmarks/linear_attention.py [--batch 8] [--seq-lens 128,512] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from smoe.config import AttentionConfig
from smoe.nn import Attention, GatedDeltaNet, KimiDeltaAttention, LightningAttention, RotaryEmbedding, linear_attention

DIM, HEADS, HEAD_DIM = 256, 4, 64


def _contenders(T: int) -> dict:
    torch.manual_seed(0)
    attention = Attention(DIM, AttentionConfig(n_heads=HEADS, n_kv_heads=HEADS), 1e-6)
    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0)(torch.arange(T))
    gdn = GatedDeltaNet(DIM, HEADS // 2, HEADS, HEAD_DIM, HEAD_DIM, chunk=64)
    kda = KimiDeltaAttention(DIM, HEADS, HEAD_DIM, chunk=64)
    lightning = LightningAttention(DIM, HEADS, HEAD_DIM, layer=0, n_layers=8, chunk=64)
    return {
        "attention (SDPA)": (lambda x: attention(x, cos, sin), None),
        "gated delta": (gdn, linear_attention._DECAY_FLOOR),
        "gated delta, no floor": (gdn, float("-inf")),
        "kimi delta": (kda, linear_attention._DECAY_FLOOR),
        "lightning": (lightning, linear_attention._DECAY_FLOOR),
    }


def _step(layer, x: torch.Tensor, floor: float | None) -> float:
    saved = linear_attention._DECAY_FLOOR
    if floor is not None:
        linear_attention._DECAY_FLOOR = floor
    try:
        leaf = x.clone().requires_grad_()
        start = time.perf_counter()
        layer(leaf).square().sum().backward()
        return time.perf_counter() - start
    finally:
        linear_attention._DECAY_FLOOR = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-lens", default="128,512")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"forward + backward of one layer, dim {DIM}, {HEADS} heads of {HEAD_DIM}, batch {args.batch}, fp32, "
          f"{args.threads} threads, torch {torch.__version__}; median ms over {args.rounds} rounds (range)")
    for T in (int(t) for t in args.seq_lens.split(",")):
        x = torch.randn(args.batch, T, DIM)
        contenders = _contenders(T)
        for layer, floor in contenders.values():
            _step(layer, x, floor)  # warm-up
        times = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, (layer, floor) in contenders.items():
                times[name].append(_step(layer, x, floor) * 1e3)
        base = np.median(times["attention (SDPA)"])
        print(f"\nT = {T}\n{'layer':<24} {'ms':>8} {'range':>15} {'x attention':>12}")
        for name, ms in times.items():
            print(f"{name:<24} {np.median(ms):>8.1f} {f'{min(ms):.1f}-{max(ms):.1f}':>15} "
                  f"{np.median(ms) / base:>11.2f}x")


if __name__ == "__main__":
    main()
