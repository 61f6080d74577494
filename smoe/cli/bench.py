"""``smoe bench``: a benchmark packaged in smoe.bench (the others are scripts in benchmarks/)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="a benchmark from benchmarks/ (moe-layer: smoe vs transformers' MoE block)")
    p.add_argument("name", choices=["moe-layer"])
    p.add_argument("options", nargs=argparse.REMAINDER, help="passed to the benchmark (see its --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Runs ``smoe.bench.<name>``'s main, passing the options through."""
    import importlib

    module = importlib.import_module(f"smoe.bench.{args.name.replace('-', '_')}")
    try:
        module.main(args.options)
    except ModuleNotFoundError as err:  # a peer the benchmark measures against is an optional dependency
        raise ValueError(f"{args.name}: needs {err.name}, which is not installed "
                         f"(pip install -U {err.name.split('.')[0]})") from None
