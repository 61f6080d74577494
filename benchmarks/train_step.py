"""Training-step throughput of the `make demo` architectures against the dense one, in one run.

Each model takes the steps `smoe train` takes (forward, backward, clipping, fused AdamW; smoe.train.loop with its
allocator setting) on random tokens of the demo's shape (8 x 128). Contenders are interleaved round by round and
the median step time is kept, so load from other tenants hits all alike. Prints tokens/s and the ratio to dense.

    .venv/bin/python benchmarks/train_step.py [--presets dense,switch,...] [--rounds 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smoe import presets
from smoe.models import build_model
from smoe.train.loop import _clip, reuse_freed_memory
from smoe.train.optim import build_optimizer

DEMO = "dense,switch,gshard,mixtral-style,deepseekmoe,deepseek-v3-style"


def _stepper(name: str, batch: int, seq_len: int):
    torch.manual_seed(0)
    config = presets.get(name)
    model = build_model(config).train()
    optimizer = build_optimizer(model, 2e-3, 0.1, (0.9, 0.95), 1e-8)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1))

    def step() -> float:
        t = time.perf_counter()
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        _clip(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=DEMO, help="the first is the reference (default: the demo's six)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (the demo's runs use 1 each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    steps = {n: _stepper(n, args.batch_size, args.seq_len) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.warmup + args.rounds):
        for n in names:
            t = steps[n]()
            if r >= args.warmup:
                times[n].append(t)
    tokens = args.batch_size * args.seq_len
    ref = statistics.median(times[names[0]])
    print(f"{'model':<20} {'ms/step':>8} {'spread':>14} {'tokens/s':>9} {'vs ' + names[0]:>10}")
    for n in names:
        med = statistics.median(times[n])
        lo, hi = min(times[n]), max(times[n])
        print(f"{n:<20} {med * 1e3:>8.0f} {f'{lo * 1e3:.0f}-{hi * 1e3:.0f}':>14} {tokens / med:>9,.0f} "
              f"{ref / med:>10.2f}")


if __name__ == "__main__":
    main()
