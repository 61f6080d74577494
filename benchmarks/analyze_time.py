"""Wall time of smoe.eval.analysis.analyze on an untrained head-to-head model, the cost `make demo` pays per
architecture: the preset (default deepseekmoe: 4 layers, d 256, 64 experts top-6 + 2 shared) over BATCHES batches
of 8 x 256 tokens from two sources, with one earlier checkpoint (another random init) for saturation. Random
weights route differently from trained ones, but the work done (forward passes, trace statistics) is the same.
The machine is shared, so the best of --repeats runs is reported.

    .venv/bin/python benchmarks/analyze_time.py [--preset deepseekmoe] [--batches 8] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from smoe import presets
from smoe.eval.analysis import analyze
from smoe.models import build_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="deepseekmoe")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = presets.get(args.preset)
    model, earlier = build_model(config), build_model(config)
    tokens = torch.randint(0, config.vocab_size, (args.batches * 8, 257))
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens.split(8)]
    sources = [i % 2 for i in range(tokens.shape[0])]
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        analyze(model, batches, sources, ["a", "b"], earlier=[(0, earlier)])
        times.append(time.perf_counter() - start)
    print(f"{args.preset}: analyze {min(times):.1f} s (best of {args.repeats}: "
          f"{', '.join(f'{t:.1f}' for t in times)}) on {args.batches} x 8 x 256 tokens, {args.threads} threads")


if __name__ == "__main__":
    main()
