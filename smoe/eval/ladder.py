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
from typing import Any

import numpy as np

from smoe.eval.collect import ladder_rungs
from smoe.eval.document import Block, Figure, Heading, Paragraph, Table
from smoe.eval.plots import fig_ladder
from smoe.eval.stats import interval
from smoe.eval.suite import CompareSettings

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


def compute_ladder(data: dict[str, dict[str, Any]], matched: dict[str, dict[str, Any]],
                   ladder: dict[str, dict[str, Any]] | None, settings: CompareSettings) -> list[Block]:
    """Each MoE's effective compute multiplier (smoe.eval.ladder) from the dense models of the suite and its
    ladder, per seed, with the interval over seeds taken on its logarithm."""
    if not ladder:
        return []
    t = settings.train
    tokens = t.steps * t.batch_size * t.seq_len
    dense = {label: e for label, e in data.items() if not matched[label].get("moe", False)}
    rungs = ladder_rungs({**dense, **ladder}, tokens)
    moes = ladder_rungs({label: e for label, e in data.items() if label not in dense}, tokens)
    rows = [("architecture", "multiplier (95% CI)", "per seed")]
    for label, points in moes.items():
        per_seed = [multiplier(f, loss, [r[s] for r in rungs.values()]) for s, (f, loss) in enumerate(points)]
        if any(m.bound for m in per_seed) or len(per_seed) < 2:
            summary = "outside the ladder on some seed: bounds only" if any(m.bound for m in per_seed) else \
                f"{per_seed[0]} (one seed: no interval)"
        else:
            iv = interval([float(np.log(m.value)) for m in per_seed])
            summary = f"{np.exp(iv.mean):.2f}x [{np.exp(iv.low):.2f}, {np.exp(iv.high):.2f}]"
        rows.append((label, summary, ", ".join(str(m) for m in per_seed)))
    return [Heading(3, "Compute ladder"),
            Paragraph(f"Dense models of {len(rungs)} widths ({', '.join(rungs)}) trained on the same {tokens:,} "
                      "tokens give loss against training FLOPs; an MoE's effective compute multiplier is the dense "
                      "training compute that reaches its loss, over its own (interpolated in log-FLOPs between the "
                      "two bracketing rungs of the same seed; Clark et al. 2022). Outside the ladder only a bound "
                      "(> or <) is known."),
            Table(tuple(rows)), Figure("ladder", "Loss against training compute", fig_ladder(rungs, moes))]
