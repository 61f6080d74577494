"""``smoe eval``: loss, perplexity and bits per byte of a checkpoint on text (smoe.train.evaluate_checkpoint)."""

from __future__ import annotations

import argparse
import json

from smoe.cli.flags import add_config_arguments
from smoe.train.config import TrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits/byte of a checkpoint on text data")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--data", required=True, help="text to evaluate on (same spec as train --data); all of it")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=50)
    p.add_argument("--text-field", default="text")
    p.add_argument("--json", action="store_true")
    add_config_arguments(p, TrainConfig, only=("document_boundaries",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.train import evaluate_checkpoint

    documents = {} if args.document_boundaries is None else {"document_boundaries": args.document_boundaries}
    result = evaluate_checkpoint(args.checkpoint, data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_batches=args.max_batches, text_field=args.text_field, **documents)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['checkpoint']}: loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}, "
              f"bits/byte {result['val_bpb']:.4f} over {result['tokens']:,} tokens")
