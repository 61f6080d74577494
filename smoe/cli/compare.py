"""``smoe compare``: the head-to-head suites (smoe.eval.compare, docs/compare.md)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from smoe.cli.flags import add_config_arguments, given
from smoe.eval.layout import SUMMARY_FILE
from smoe.eval.settings import COMPARE_DEFAULTS, COMPARE_FIELDS, COMPARE_OWN, CompareSettings
from smoe.io.files import read_json
from smoe.train.config import DataConfig, TrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="matched-compute head-to-head of architectures: pre-registered contrasts, a "
                                       "power check, an HTML report")
    p.add_argument("--suite", help="seeds-debate (dense, mixtral-style, deepseekmoe at equal activated parameters), "
                                   "seeds-debate-total, table-1 (DeepSeekMoE Table 1 at equal total parameters, with "
                                   "a Hash Layer), granularity, shared, balance, capacity; upcycling (a dense trunk, "
                                   "then dense continued / upcycled by copy and split / the MoEs from scratch); or "
                                   "hybrid (full attention against 3:1 and 7:1 Gated DeltaNet hybrids, with decoding "
                                   "measured at --long-context tokens); each pre-registers its contrasts "
                                   "(docs/compare.md)")
    p.add_argument("--presets", help="or: comma-separated presets to compare (activated parameters without "
                                     "embeddings matched within 2%%)")
    p.add_argument("--contrasts", help="with --presets: the pre-registered contrasts, A:B for the difference A - B, "
                                       "comma-separated, 1 to 3 (default: each preset against the first)")
    add_config_arguments(p, DataConfig, only=("data", "val_data"))
    add_config_arguments(p, TrainConfig, only=COMPARE_FIELDS, shown_defaults=COMPARE_DEFAULTS)
    add_config_arguments(p, CompareSettings, only=COMPARE_OWN)
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (e.g. several per GPU, or one "
                                                       "per CPU core)")
    p.add_argument("--reuse", help="comma-separated suite directories whose finished runs with the same model, "
                                   "training, data, tokenizer and validation set are linked instead of trained again "
                                   "(the built-in suites share their dense ladder)")
    p.add_argument("--out", required=True, help="suite directory (rerun the same command to resume)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.eval.compare import run_suite

    base = CompareSettings()
    own = {k: v for k, v in given(args, CompareSettings).items() if k in COMPARE_OWN}  # not train/data
    settings = replace(base, train=replace(base.train, **given(args, TrainConfig)),
                       data=replace(base.data, **given(args, DataConfig)), **own)
    reuse = tuple(r.strip() for r in args.reuse.split(",") if r.strip()) if args.reuse else ()
    report = run_suite(args.suite, args.presets, settings, args.out, log=lambda m: print(m, flush=True),
                       jobs=args.jobs, contrasts=args.contrasts, reuse=reuse)
    summary = read_json(report.parent / SUMMARY_FILE)
    for c in summary["verdict"]["contrasts"]:
        ci = "no interval" if c["ci"][0] is None else f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
        print(f"{c['a']} − {c['b']}: {c['mean']:+.4f} nats, {ci}, "
              f"{'resolved' if c['resolved'] else 'not resolved'}")
    print(f"sample from {summary['sample']['architecture']}: {summary['sample']['text']}")
    print(f"report: {report.resolve()}")
