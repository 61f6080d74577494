"""``smoe inspect``: parameters, FLOPs and memory of a preset, a Hugging Face config.json or a run config, and with
--max-expert-memory what an expert budget means for it (smoe.offload.budget.plan)."""

from __future__ import annotations

import argparse
import json

from smoe.cli.flags import add_model_arguments, model_config


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="parameters, FLOPs and memory of a preset or a Hugging Face config.json")
    add_model_arguments(p)
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for attention FLOPs")
    p.add_argument("--max-expert-memory", metavar="SIZE",
                   help="what an expert cache of SIZE bytes (e.g. 4GB) means for the model at fp32, bf16, int8 and "
                        "int4: experts it holds, memory resident, bytes a decoded token reads from disk")
    p.add_argument("--hit-rate", type=float, help="with --max-expert-memory: the cache's hit rate (default: its "
                                                  "share of the experts, what routing spread evenly gives)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.accounting import account, format_accounting
    from smoe.offload.budget import plan

    config = model_config(args)
    if args.hit_rate is not None and args.max_expert_memory is None:
        raise ValueError("--hit-rate: only with --max-expert-memory")
    acc = account(config, seq_len=args.seq_len)
    plans = [] if args.max_expert_memory is None else [
        plan(config, args.max_expert_memory, fmt, args.hit_rate) for fmt in ("fp32", "bf16", "int8", "int4")]
    if args.json:
        print(json.dumps({**acc.to_dict(), **({"expert_budget": [p.to_dict() for p in plans]} if plans else {})},
                         indent=2))
        return
    print(format_accounting(acc))
    if plans:
        print(f"  experts on disk behind {args.max_expert_memory} (smoe generate/serve --max-expert-memory; a token "
              f"reads its misses whole):")
        print("\n".join(f"    {p.describe()}" for p in plans))
