"""``smoe inspect``: parameters, FLOPs and memory of a preset, a Hugging Face config.json or a run config."""

from __future__ import annotations

import argparse
import json

from smoe.cli.flags import add_model_arguments, model_config


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="parameters, FLOPs and memory of a preset or a Hugging Face config.json")
    add_model_arguments(p)
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for attention FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.accounting import account, format_accounting

    acc = account(model_config(args), seq_len=args.seq_len)
    print(json.dumps(acc.to_dict(), indent=2) if args.json else format_accounting(acc))
