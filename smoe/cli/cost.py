"""``smoe cost``: the inference roofline of a model on hardware profiles (smoe.cost, docs/cost.md); its flags are
CostSettings'."""

from __future__ import annotations

import argparse
import json

from smoe.cli.flags import add_config_arguments, add_model_arguments, given, model_config
from smoe.cost import CostSettings


def add_parser(sub) -> None:
    p = sub.add_parser("cost", help="roofline inference cost: tokens/s, cache and all-to-all bytes, $ per M tokens",
                       description="Decode and prefill tokens/s, cache, all-to-all and memory per device, $ per million"
                                   " tokens, from a roofline: a step takes max(bytes / bandwidth, FLOPs / peak). "
                                   "Formulas: smoe/cost.py, docs/cost.md.")
    add_model_arguments(p)
    add_config_arguments(p, CostSettings)
    p.add_argument("--json", action="store_true", help="print a JSON list, one report per hardware profile")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.cost import CostSettings, check_model, estimate, format_cost
    from smoe.hardware import HARDWARE, MEASURED_CPU
    from smoe.quant.measure import cpu_profile

    settings = CostSettings(**given(args, CostSettings)).validate()
    config = model_config(args)
    check_model(config, settings)  # before measuring anything
    hardware = [cpu_profile() if name == MEASURED_CPU else HARDWARE[name] for name in settings.hardware]
    reports = [estimate(config, hw, settings) for hw in hardware]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print("\n\n".join(format_cost(r) for r in reports))
