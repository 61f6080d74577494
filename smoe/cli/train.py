"""``smoe train``: train a model on text (smoe.train, docs/training.md); its flags are TrainConfig's and DataConfig's
fields."""

from __future__ import annotations

import argparse
import json
import sys

from smoe.cli.flags import add_config_arguments, given
from smoe.train.config import DataConfig, TrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a preset on text data (checkpoints, metrics.jsonl, exact --resume)",
                       description="Train a preset (or the configs of a run config file, or --init-from's model) "
                                   "on text data. Every option below --quiet is a field of TrainConfig or DataConfig "
                                   "(smoe/train/config.py); with --config, the options given override the file's.")
    p.add_argument("--preset", help="preset name (see `smoe presets`)")
    p.add_argument("--config", metavar="FILE", help="a run config: JSON with model_config and optionally "
                                                    "train_config and data_config (a run's run.json is one)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field by dotted path, e.g. --set moe.top_k=4 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/PRESET); must be new, empty or a smoe run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest intact "
                                                         "checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p, DataConfig)
    add_config_arguments(p, TrainConfig)
    p.set_defaults(func=run)


def parse_assignments(items: list[str]) -> dict:
    """``--set moe.top_k=4 --set moe.capacity_factor=null`` -> {"moe.top_k": 4, "moe.capacity_factor": None}.
    Values are JSON when they parse as JSON (numbers, true/false/null, lists), else strings."""
    result = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. moe.top_k=4")
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
        except RecursionError:
            raise ValueError(f"--set {key}: the value is nested too deep") from None
    return result


def run(args: argparse.Namespace) -> None:
    from smoe.parallel import is_main_process
    from smoe.train import train_model
    from smoe.train.checkpoint import initial_config
    from smoe.train.rundir import read_run_config

    given_model = [m for m in (args.preset, args.config) if m is not None]
    if len(given_model) > 1 or not given_model and args.init_from is None:
        raise ValueError("train: give --preset NAME or --config FILE (exactly one), or --init-from DIR alone to "
                         "continue training its model")
    if args.config is not None:
        model, train_config, data_config = read_run_config(args.config)
    else:  # a preset, or the model of the checkpoint --init-from names
        model = args.preset if args.preset is not None else initial_config(args.init_from)
        train_config, data_config = TrainConfig(), DataConfig()
    name = model if isinstance(model, str) else model.name
    data = {**vars(data_config), **given(args, DataConfig)}
    train = {**vars(train_config), **given(args, TrainConfig)}
    result = train_model(
        model, out=args.out or f"runs/{name}", overrides=parse_assignments(args.set), resume=args.resume,
        progress=False if args.quiet else None, log=lambda m: print(m, file=sys.stderr), **data, **train,
    )
    final = result.final_eval or {}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    if is_main_process():
        print(f"trained {result.step} steps ({result.skipped_steps} skipped); {summary}")
        print(f"checkpoint: {result.checkpoint}")
