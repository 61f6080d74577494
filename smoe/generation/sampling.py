"""Choosing the next token from the logits: greedy below a temperature, else a draw from the top-k / top-p filtered
softmax, and the check of those settings before any work.

Legend: B batch, V vocabulary.
"""

from __future__ import annotations

import torch

# A temperature below this is greedy (vLLM's _SAMPLING_EPS): dividing the logits by less overflows to inf, and the
# softmax of inf is NaN, which no draw can sample from.
GREEDY_BELOW = 1e-5


def sample(logits_BV: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token per row: argmax at a temperature below ``GREEDY_BELOW``, else a draw from the (top-k, top-p)
    filtered softmax."""
    if temperature < GREEDY_BELOW:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        # Drop a token once the more likely ones already reach top_p; the most likely one always stays.
        drop_BV = probs_BV.cumsum(-1) - probs_BV >= top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise naming the first out-of-range generation argument."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature: must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    if top_p is not None and torch.tensor(top_p, dtype=torch.float32) == 0:  # the sampler compares in fp32
        raise ValueError(f"top_p: {top_p} rounds to 0 in float32, which keeps no token")
