"""Validation loss at step 0 of models upcycled from one trained dense checkpoint (docs/upcycling.md): how much a
split with top_k < experts loses before any continued training, per partition and seed, beside the dense model
and the exact constructions (copy; split with every expert active). ``--llama-moe-scale`` also evaluates each
split with LLaMA-MoE's own factor E/K on the renormalised weights instead of ours, E (smoe/upcycling/spec.py).

    .venv/bin/python benchmarks/upcycle_step0.py runs/dense --data valid.txt [--seeds 0,1,2] [--batches 20]
        [--splits 16:16,16:8,16:4,16:2,8:2] [--copies 8:2] [--llama-moe-scale]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

import smoe
from smoe.device import autocast_context
from smoe.io.checkpoint import resolve_checkpoint
from smoe.io.tokenizer import load_tokenizer
from smoe.models import empty_model
from smoe.train.data import token_byte_lengths, tokenize_documents, val_batches
from smoe.train.loop import evaluate


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]


def _rescaled(model, scale: float):
    """The same weights under another routed_scaling_factor."""
    config = replace(model.config, moe=replace(model.config.moe, routed_scaling_factor=scale))
    out = empty_model(config, model.embed.weight.dtype, model.embed.weight.device)
    out.load_state_dict(model.state_dict())
    return out.eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint", help="a dense smoe checkpoint or run directory")
    p.add_argument("--data", required=True, help="validation text")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batches", type=int, default=20, help="batches of 8 x seq-len tokens")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--splits", default="16:16,16:8,16:4,16:2,8:2", help="experts:top_k of the splits")
    p.add_argument("--copies", default="8:2", help="experts:top_k of the copies")
    p.add_argument("--llama-moe-scale", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    path = resolve_checkpoint(args.checkpoint)
    dense = smoe.load_pretrained(path, dtype=torch.float32)
    split = tokenize_documents(args.data, load_tokenizer(path / "tokenizer.json"))
    batches = val_batches(split, args.seq_len, 8, args.batches)
    lengths = torch.from_numpy(token_byte_lengths(load_tokenizer(path / "tokenizer.json")))
    n_bytes = int(sum(lengths[t].sum() for _, t in batches))

    cpu = torch.device("cpu")

    def loss(model) -> float:
        return evaluate(model, batches, n_bytes, cpu, autocast_context(cpu, "fp32"))["val_loss"]

    base = loss(dense)
    print(f"dense: {base:.4f} nats over {sum(t.numel() for _, t in batches):,} tokens\n")
    print("| model | experts | top_k | partition | scale | val loss (mean ± sd over seeds) | minus dense |")
    print("|---|---|---|---|---|---|---|")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [("copy", e, k, "random") for e, k in _pairs(args.copies)]
    rows += [("split", e, k, part) for e, k in _pairs(args.splits) for part in ("random", "clustering")]
    for method, experts, top_k, partition in rows:
        scales = [None] + ([experts / top_k] if args.llama_moe_scale and method == "split" and top_k < experts else [])
        for scale in scales:
            values = []
            for seed in seeds:
                model = smoe.upcycle(dense, method=method, experts=experts, top_k=top_k, partition=partition,
                                     seed=seed).eval()
                values.append(loss(model if scale is None else _rescaled(model, scale)))
            mean, sd = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            shown = f"{experts}" if scale is None and method == "split" else ("1" if scale is None else f"{scale:g}")
            print(f"| {method} | {experts} | {top_k} | {partition if method == 'split' else '-'} | {shown} | "
                  f"{mean:.4f} ± {sd:.4f} | {mean - base:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
