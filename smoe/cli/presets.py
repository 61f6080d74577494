"""``smoe presets``: the built-in presets with their total and active parameters."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list built-in presets with total/active parameters")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe import presets
    from smoe.accounting import account, human

    rows = [(name, account(presets.get(name))) for name in presets.names()]
    width = max(len(name) for name, _ in rows)
    print(f"{'preset':<{width}}  {'total':>9}  {'active':>9}  {'layers':>6}  {'experts':>11}  attention")
    for name, acc in rows:
        cfg = presets.get(name)
        experts = "dense" if cfg.moe is None else f"{cfg.moe.n_routed_experts}x top-{cfg.moe.top_k}"
        if cfg.moe is not None and cfg.moe.n_shared_experts:
            experts += f" +{cfg.moe.n_shared_experts}"
        attn = cfg.attention.kind
        print(f"{name:<{width}}  {human(acc.total_params):>9}  {human(acc.active_params):>9}  "
              f"{cfg.n_layers:>6}  {experts:>11}  {attn}")
