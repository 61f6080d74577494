"""The ``smoe`` command line: parse arguments, call library functions, print.

Each command is one module here with ``add_parser(sub)`` (its flags) and ``run(args)`` (the work); ``flags.py`` makes
flags from the config dataclasses. User errors (bad preset, field, file) print one line and exit with code 2, never
a traceback.
"""

from __future__ import annotations

import argparse
import sys

from smoe.cli import (
    analyze,
    bench,
    compare,
    convert,
    cost,
    evaluate,
    generate,
    inspect,
    presets,
    serve,
    smoke,
    train,
    upcycle,
)
from smoe.cli.flags import user_message
from smoe.cli.train import parse_assignments
from smoe.errors import TrainingError

__all__ = ["build_parser", "main", "parse_assignments", "user_message"]

# In the order `smoe --help` lists them.
COMMANDS = (presets, inspect, cost, smoke, train, evaluate, compare, upcycle, bench, analyze, generate, serve, convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoe", description="Sparse Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"smoe {args.command}: error: {user_message(err)}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"smoe {args.command}: stopped: {user_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
