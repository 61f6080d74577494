"""Scalar summaries of router behaviour and language-model quality."""

from __future__ import annotations

import math

import torch


def router_summary(load_E: torch.Tensor, dropped: float, entropy: float) -> dict[str, float]:
    """Per-layer balance summary from the step's expert load (assignments per expert, summed over micro-batches).

    load_cv: coefficient of variation of the load (0 = perfectly balanced); max_mean: the hottest expert's load
    over the mean; dropped_frac: assignments dropped over capacity; dead: experts that received nothing.
    """
    load = load_E.double()
    mean = load.mean().item()
    total = load.sum().item()
    return {
        "load_cv": load.std(unbiased=False).item() / mean if mean > 0 else 0.0,
        "max_mean": load.max().item() / mean if mean > 0 else 0.0,
        "dropped_frac": dropped / total if total > 0 else 0.0,
        "dead": int((load == 0).sum().item()),
        "entropy": entropy,
        "load": [int(x) for x in load_E.tolist()],
    }


def perplexity(loss_nats: float) -> float:
    return math.exp(min(loss_nats, 50.0))


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Total code length of the text in bits divided by its UTF-8 byte count: tokenizer-independent."""
    return loss_nats * n_tokens / (math.log(2) * n_bytes)
