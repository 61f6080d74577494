"""``smoe smoke``: forward and backward of the tiny presets on the CPU, a quick health check."""

from __future__ import annotations

import argparse
import time


def add_parser(sub) -> None:
    p = sub.add_parser("smoke", help="forward + backward of the tiny presets on CPU (a quick health check)")
    p.add_argument("--presets", help="comma-separated preset names (default: every *-tiny preset)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from smoe import presets
    from smoe.models import build_model

    names = args.presets.split(",") if args.presets else [n for n in presets.names() if n.endswith("-tiny")]
    configs = [presets.get(n) for n in names]  # resolve every name before any work
    torch.manual_seed(0)
    print(f"{'preset':<18}  {'params':>8}  {'loss':>7}  {'fwd+bwd ms':>10}")
    for name, config in zip(names, configs, strict=True):
        model = build_model(config)
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
        start = time.perf_counter()
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        ms = (time.perf_counter() - start) * 1e3
        if not torch.isfinite(out.loss):
            raise RuntimeError(f"{name}: non-finite loss {out.loss.item()}")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<18}  {n_params / 1e6:>7.2f}M  {out.loss.item():>7.3f}  {ms:>10.1f}")
