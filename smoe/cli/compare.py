"""``smoe compare``: the head-to-head suites (smoe.eval.compare, docs/compare.md)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from smoe.cli.flags import add_config_arguments, given
from smoe.eval.suite import COMPARE_DEFAULTS, COMPARE_FIELDS, COMPARE_OWN, CompareSettings
from smoe.train.config import DataConfig, TrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="matched-compute head-to-head of architectures, with an HTML report")
    p.add_argument("--suite", help="seeds-debate, granularity, shared, balance or capacity; at equal total "
                                   "parameters, table-1 (DeepSeekMoE Table 1, with a Hash Layer) or "
                                   "seeds-debate-total; upcycling (a dense trunk, then dense continued / upcycled "
                                   "by copy and split / the MoEs from scratch, compared by training compute); or "
                                   "hybrid (full attention against 3:1 and 7:1 Gated DeltaNet hybrids, with "
                                   "decoding measured at --long-context tokens)")
    p.add_argument("--presets", help="or: comma-separated presets to compare (activated parameters without "
                                     "embeddings matched within 2%%)")
    add_config_arguments(p, DataConfig, only=("data", "val_data"))
    add_config_arguments(p, TrainConfig, only=COMPARE_FIELDS, shown_defaults=COMPARE_DEFAULTS)
    add_config_arguments(p, CompareSettings, only=COMPARE_OWN)
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (e.g. several per GPU)")
    p.add_argument("--out", required=True, help="suite directory (rerun the same command to resume)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.eval.compare import run_suite

    base = CompareSettings()
    own = {k: v for k, v in given(args, CompareSettings).items() if k in COMPARE_OWN}  # not train/data
    settings = replace(base, train=replace(base.train, **given(args, TrainConfig)),
                       data=replace(base.data, **given(args, DataConfig)), **own)
    report = run_suite(args.suite, args.presets, settings, args.out, log=lambda m: print(m, flush=True),
                       jobs=args.jobs)
    print(f"report: {report.resolve()}")
