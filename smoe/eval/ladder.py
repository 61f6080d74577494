"""The compute ladder: dense models of several widths trained on the same tokens give validation loss against
training compute, and an MoE's *effective compute multiplier* is the dense training compute that would reach its
loss, over its own (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models"; Krajewski et al. 2024).

Per seed (the rungs and the MoE share the data order), the dense compute at the MoE's loss is interpolated linearly
in log-FLOPs between the two rungs, in order of compute, whose losses bracket it. A loss below every rung's (or
above) lies outside the ladder and gives only a bound: more than the largest rung's compute ratio (or less than
the smallest's). The multiplier's interval over seeds is taken on its logarithm (smoe.eval.stats), since it is a
ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Rung = tuple[float, float]  # (training FLOPs, final validation loss) of one dense model on one seed


@dataclass(frozen=True)
class Multiplier:
    value: float  # dense FLOPs at the MoE's loss over the MoE's FLOPs; a bound when ``bound`` is set
    bound: str | None = None  # ">" (the MoE beats the largest rung) or "<" (it trails the smallest), else None

    def __str__(self) -> str:
        return f"{self.bound or ''}{self.value:.2f}x"


def dense_flops_at(loss: float, rungs: list[Rung]) -> tuple[float, str | None]:
    """The dense training FLOPs that reach ``loss`` on this ladder, and None; or, outside it, the nearest rung's
    FLOPs and the direction (">": more compute than the largest rung, "<": less than the smallest)."""
    if len(rungs) < 2:
        raise ValueError(f"ladder: needs at least two dense rungs, got {len(rungs)}")
    pts = sorted(rungs)
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if min(l0, l1) <= loss <= max(l0, l1):
            if l0 == l1:
                return f0, None
            w = (loss - l0) / (l1 - l0)
            return math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0))), None
    best = min(pts, key=lambda p: p[1])
    if loss < best[1]:
        return max(f for f, _ in pts), ">"
    return min(f for f, _ in pts), "<"


def multiplier(moe_flops: float, moe_loss: float, rungs: list[Rung]) -> Multiplier:
    flops, bound = dense_flops_at(moe_loss, rungs)
    return Multiplier(flops / moe_flops, bound)
