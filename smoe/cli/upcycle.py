"""``smoe upcycle``: a dense model -> an MoE checkpoint to continue training (smoe.upcycling, docs/upcycling.md)."""

from __future__ import annotations

import argparse

from smoe.cli.flags import add_config_arguments, given
from smoe.upcycling.spec import UpcycleSpec


def add_parser(sub) -> None:
    p = sub.add_parser("upcycle", help="a dense model -> an MoE checkpoint to continue training (copy or split its "
                                       "FFNs into experts)",
                       description="Upcycle a dense model: a Hugging Face directory of the Llama family (llama, "
                                   "mistral, qwen2) or a dense smoe checkpoint / run directory. Every FFN becomes an "
                                   "MoE layer: copies of it (sparse upcycling, Komatsuzaki et al. 2023) or its hidden "
                                   "units split into experts (LLaMA-MoE; with --shared, Qwen1.5-MoE's shared "
                                   "experts). The options are the fields of UpcycleSpec (smoe/upcycling/spec.py); "
                                   "docs/upcycling.md.")
    p.add_argument("source", metavar="SRC", help="a dense Hugging Face model directory, smoe checkpoint or run "
                                                 "directory")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    add_config_arguments(p, UpcycleSpec, required=("method", "experts", "top_k"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.accounting import account, human
    from smoe.io.checkpoint import load_config
    from smoe.upcycling.weights import upcycle_checkpoint

    out = upcycle_checkpoint(args.source, args.out, UpcycleSpec(**given(args, UpcycleSpec)).validate())
    acc = account(load_config(out))
    print(f"{args.source} -> {out}: smoe checkpoint, {human(acc.total_params)} parameters, "
          f"{human(acc.active_params)} active; continue with `smoe train --init-from {out}`")
