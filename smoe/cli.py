"""The ``smoe`` command line: parse arguments, call library functions, print.

User errors (bad preset, field, file) print one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _cmd_presets(args: argparse.Namespace) -> None:
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


def _cmd_inspect(args: argparse.Namespace) -> None:
    from smoe import presets
    from smoe.accounting import account, format_accounting

    if (args.name is None) == (args.hf_config is None):
        raise ValueError("inspect: give a preset NAME or --hf-config PATH (exactly one)")
    if args.hf_config is not None:
        from smoe.interop.hf_config import load_hf_config

        config = load_hf_config(args.hf_config)
    else:
        config = presets.get(args.name)
    acc = account(config, seq_len=args.seq_len)
    print(json.dumps(acc.to_dict(), indent=2) if args.json else format_accounting(acc))


def _cmd_smoke(args: argparse.Namespace) -> None:
    import torch

    from smoe import presets
    from smoe.models import build_model

    names = args.presets.split(",") if args.presets else [n for n in presets.names() if n.endswith("-tiny")]
    configs = [presets.get(n) for n in names]  # resolve every name before any work
    torch.manual_seed(0)
    print(f"{'preset':<18}  {'params':>8}  {'loss':>7}  {'fwd+bwd ms':>10}")
    for name, config in zip(names, configs):
        model = build_model(config)
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
        start = time.perf_counter()
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        ms = (time.perf_counter() - start) * 1e3
        if not torch.isfinite(out.loss):
            raise RuntimeError(f"{name}: non-finite loss {out.loss.item()}")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<18}  {n_params / 1e6:>7.2f}M  {out.loss.item():>7.3f}  {ms:>10.1f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoe", description="Sparse Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list built-in presets with total/active parameters")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("inspect", help="parameters, FLOPs and memory of a preset or a Hugging Face config.json")
    p.add_argument("name", nargs="?", help="preset name (see `smoe presets`)")
    p.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json, or a directory holding one")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for attention FLOPs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("smoke", help="forward + backward of the tiny presets on CPU (a quick health check)")
    p.add_argument("--presets", help="comma-separated preset names (default: every *-tiny preset)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.set_defaults(func=_cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"smoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
