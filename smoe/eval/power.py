"""The power check: can this regime show a gap of the contrasts' size at all, and what each MoE is worth in dense
compute.

The dense compute ladder (dense models of several widths on the same tokens and seeds) gives loss against training
compute. Per seed, ``log L = a + b log C`` is fitted by least squares over the rungs (Clark et al. 2022 fit log-loss
against log-size; Krajewski et al. 2024 fit a power law in compute), so a noisy rung bends the fit a little instead
of deciding a bracket. An MoE's *effective compute multiplier* on that seed is the dense compute the fit gives at the
MoE's loss over the MoE's own; outside the rungs' compute it is the fit's extrapolation, and marked as such. Its
interval over seeds is a t-interval of its logarithm, at the level its contrast against dense was given by Holm
when that contrast is pre-registered, else at 95% and labelled exploratory.

The regime is early when the ladder's ends (its smallest and largest rungs) differ by less than five times the
contrasts' detectable gap: a design whose whole ladder spans a few detectable gaps cannot place an MoE on it. Then
the gap between the ends along training (the periodic evaluations, mean over seeds) is fitted against log(step),
and the step at which it would reach five detectable gaps is the estimate of how long the runs need to be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smoe.eval.document import Block, Figure, Heading, Paragraph, Strong, Table
from smoe.eval.plots import fig_ladder
from smoe.eval.stats import ALPHA, Interval, Paired, interval

ENDS_OVER_DETECTABLE = 5.0  # the ladder's ends must differ by this many detectable gaps
MAX_EXTRAPOLATION = 100.0  # steps_needed is given up to this many times the runs' length, beyond it only a bound
Rung = tuple[float, float]  # (training FLOPs, final validation loss) of one dense model on one seed


@dataclass(frozen=True)
class LadderFit:
    """``log L = intercept + slope * log C`` over one seed's rungs."""

    intercept: float
    slope: float
    residual_sd: float  # of log L about the line
    flops: tuple[float, float]  # the rungs' smallest and largest compute

    @staticmethod
    def of(rungs: list[Rung]) -> "LadderFit":
        if len(rungs) < 2:
            raise ValueError(f"ladder: needs at least two dense rungs, got {len(rungs)}")
        x = np.log([f for f, _ in rungs])
        y = np.log([loss for _, loss in rungs])
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (intercept + slope * x)
        dof = max(len(rungs) - 2, 1)
        return LadderFit(float(intercept), float(slope), float(np.sqrt((residual ** 2).sum() / dof)),
                         (float(np.exp(x.min())), float(np.exp(x.max()))))

    @property
    def descends(self) -> bool:
        return self.slope < 0

    def flops_at(self, loss: float) -> float:
        """The dense training compute the fit gives at ``loss`` (needs a descending fit)."""
        return math.exp((math.log(loss) - self.intercept) / self.slope)


@dataclass(frozen=True)
class Multiplier:
    """One MoE's effective compute multiplier: per seed, and over seeds (on the log scale)."""

    label: str
    per_seed: tuple[float, ...]
    outside: tuple[bool, ...]  # per seed: the dense compute lies outside the rungs' (the fit extrapolated)
    spread: Interval | None  # of log(multiplier); None with one seed
    exploratory: bool

    def summary(self) -> str:
        if self.spread is None:
            return f"{self.per_seed[0]:.2f}x (one seed: no interval)"
        level = f"{100 * self.spread.level:.3g}%"
        return (f"{math.exp(self.spread.mean):.3g}x, {level} CI [{math.exp(self.spread.low):.3g}, "
                f"{math.exp(self.spread.high):.3g}]" + (" (exploratory)" if self.exploratory else ""))


@dataclass(frozen=True)
class PowerCheck:
    """The power check of a suite's runs (``check``), rendered first in its report."""

    rungs: dict[str, list[Rung]]  # label -> per seed
    span: float  # largest over smallest rung compute
    ends: Interval  # per seed, the smallest rung's loss minus the largest's
    detectable: float  # the largest detectable gap among the contrasts (NaN with one seed)
    fits: list[LadderFit]
    multipliers: list[Multiplier]
    moes: dict[str, list[Rung]] = field(default_factory=dict)
    steps_needed: int | None = None  # where the ends do not yet differ by ENDS_OVER_DETECTABLE detectable gaps
    gap_grows: bool | None = None  # whether the ends' gap widens along training (None: not estimated)
    steps: int = 0

    @property
    def enough(self) -> bool | None:
        """Whether the ladder's ends differ by ENDS_OVER_DETECTABLE detectable gaps (None with one seed)."""
        if math.isnan(self.detectable):
            return None
        return self.ends.mean >= ENDS_OVER_DETECTABLE * self.detectable

    def to_json(self) -> dict[str, Any]:
        return {"span": self.span, "ends": _interval_json(self.ends), "detectable": _finite(self.detectable),
                "enough": self.enough, "steps_needed": self.steps_needed, "gap_grows": self.gap_grows,
                "fits": [vars(f) for f in self.fits],
                "multipliers": {m.label: {"per_seed": list(m.per_seed), "outside": list(m.outside),
                                          "log": _interval_json(m.spread) if m.spread else None,
                                          "exploratory": m.exploratory} for m in self.multipliers}}

    def verdict(self) -> tuple:
        """One sentence: can the regime show a gap of the contrasts' size?"""
        ends = f"the ladder's ends differ by {self.ends.mean:.3f} nats"
        if self.ends.n > 1:
            ends += f" [{self.ends.low:.3f}, {self.ends.high:.3f}]"
        if self.enough is None:
            return ("Not checked: with one seed no detectable gap is measured (", ends, ").")
        target = ENDS_OVER_DETECTABLE * self.detectable
        if self.enough:
            return (Strong("The regime can show gaps of the contrasts' size:"),
                    f" {ends}, at least {ENDS_OVER_DETECTABLE:g} times the largest detectable gap of the contrasts "
                    f"({self.detectable:.3f} nats, so {target:.3f}).")
        if self.steps_needed is None:
            more = (" and the gap between them does not widen along these runs, so more steps alone are not the "
                    "remedy: larger rungs, more varied data or more seeds are" if self.gap_grows is False else "")
            return (Strong("The regime is too early:"), f" {ends}, less than {ENDS_OVER_DETECTABLE:g} times the "
                    f"largest detectable gap ({self.detectable:.3f} nats, so {target:.3f}){more}.")
        lead = (Strong("The regime is too early:"), f" {ends}, less than {ENDS_OVER_DETECTABLE:g} times the largest "
                f"detectable gap ({self.detectable:.3f}, so {target:.3f}); the gap between the ladder's ends along "
                f"training, fitted against log(step), reaches {target:.3f} ")
        if self.steps_needed > MAX_EXTRAPOLATION * self.steps:
            return (*lead, f"only beyond {MAX_EXTRAPOLATION:g} times these runs' {self.steps:,} steps, too far to "
                           "extrapolate: more seeds (a smaller detectable gap) are the nearer remedy.")
        return (*lead, f"at about {self.steps_needed:,} steps ({self.steps_needed / self.steps:.1f} times these "
                       "runs).")

    def blocks(self, tokens: int) -> list[Block]:
        rows = [("dense rung", "training FLOPs", "final loss (95% CI)")]
        for label, points in sorted(self.rungs.items(), key=lambda kv: np.mean([f for f, _ in kv[1]])):
            iv = interval([loss for _, loss in points])
            rows.append((label, f"{np.mean([f for f, _ in points]):.3g}",
                         f"{iv.mean:.4f}" + (f" ± {iv.half:.4f}" if iv.n > 1 else "")))
        slopes = [f.slope for f in self.fits]
        fit_line = (f"Per seed, log L = a + b log C fitted over the rungs: b from {min(slopes):.4f} to "
                    f"{max(slopes):.4f}, residual sd of log L at most {max(f.residual_sd for f in self.fits):.4f}"
                    + ("" if all(f.descends for f in self.fits) else
                       "; on some seed the fit does not descend (a larger rung did no better), so no multiplier is "
                       "read off this ladder") + ".")
        blocks: list[Block] = [Paragraph(self.verdict()),
                               Paragraph(f"Dense ladder: {len(self.rungs)} rungs spanning {self.span:.2f}x the "
                                         f"training FLOPs, each on the same {tokens:,} tokens. {fit_line}"),
                               Table(tuple(rows))]
        if self.multipliers:
            mrows = [("architecture", "effective compute multiplier", "per seed")]
            mrows += [(m.label, m.summary(), ", ".join(f"{v:.2f}x" + ("*" if o else "")
                                                       for v, o in zip(m.per_seed, m.outside, strict=True)))
                      for m in self.multipliers]
            blocks += [Heading(3, "Effective compute multipliers"),
                       Paragraph("The dense training compute the seed's fit gives at an MoE's final loss, over the "
                                 "MoE's own (Clark et al. 2022): above 1, the MoE is worth more than its compute. * "
                                 "marks a seed whose value lies outside the rungs' compute, read from the fit's "
                                 "extrapolation. The interval is taken on the logarithm, at the level of the MoE's "
                                 "pre-registered contrast against dense where there is one."),
                       Table(tuple(mrows))]
        blocks.append(Figure("ladder", "Loss against training compute", fig_ladder(self.rungs, self.moes)))
        return blocks


def check(rungs: dict[str, list[Rung]], moes: dict[str, list[Rung]], contrasts: list[Paired],
          end_curves: tuple[list[list[tuple[int, float]]], list[list[tuple[int, float]]]] | None, steps: int,
          dense_label: str | None) -> PowerCheck:
    """The power check from the rungs (label -> per seed (FLOPs, loss)), the MoEs (the same), the pre-registered
    contrasts' results, the curves of the smallest and largest rungs per seed (``end_curves``: (step, loss)
    points) and the runs' length. ``dense_label``: the suite's dense architecture, whose contrasts with an MoE
    set that MoE's multiplier interval level."""
    seeds = min(len(v) for v in rungs.values())
    by_flops = sorted(rungs, key=lambda label: np.mean([f for f, _ in rungs[label]]))
    small, large = rungs[by_flops[0]], rungs[by_flops[-1]]
    span = float(np.mean([f for f, _ in large]) / np.mean([f for f, _ in small]))
    ends = interval([small[s][1] - large[s][1] for s in range(seeds)])
    detectable = max((p.mdd for p in contrasts), default=math.nan)
    fits = [LadderFit.of([points[s] for points in rungs.values()]) for s in range(seeds)]
    levels = {(p.a if p.b == dense_label else p.b): p.level for p in contrasts if dense_label in (p.a, p.b)}
    multipliers = [_multiplier(label, points[:seeds], fits, levels.get(label)) for label, points in moes.items()]
    multipliers = [m for m in multipliers if m is not None]
    result = PowerCheck(dict(rungs), span, ends, detectable, fits, multipliers, dict(moes), steps=steps)
    if result.enough is False and end_curves is not None:
        needed, grows = _steps_needed(*end_curves, ENDS_OVER_DETECTABLE * detectable)
        result = PowerCheck(**{**vars(result), "steps_needed": needed, "gap_grows": grows})
    return result


def _multiplier(label: str, points: list[Rung], fits: list[LadderFit], level: float | None) -> Multiplier | None:
    values, outside = [], []
    for (flops, loss), fit in zip(points, fits, strict=True):
        if not fit.descends:
            return None
        dense = fit.flops_at(loss)
        values.append(dense / flops)
        outside.append(not fit.flops[0] <= dense <= fit.flops[1])
    spread = interval(np.log(values), 1 - (level if level is not None else ALPHA)) if len(values) > 1 else None
    return Multiplier(label, tuple(values), tuple(outside), spread, exploratory=level is None)


def _steps_needed(small: list[list[tuple[int, float]]], large: list[list[tuple[int, float]]], target: float
                  ) -> tuple[int | None, bool]:
    """From the smallest and largest rungs' curves (per seed, (step, loss) points at the same steps), the step at
    which the mean gap between them, fitted against log(step) over the second half of training, reaches
    ``target``; and whether the gap grows at all."""
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in small + large]))
    if len(steps) < 3:
        return None, False
    gap = [np.mean([dict(a)[s] - dict(b)[s] for a, b in zip(small, large, strict=True)]) for s in steps]
    half = steps[len(steps) // 2 - 1:] if len(steps) >= 4 else steps
    ys = gap[len(gap) - len(half):]
    slope, intercept = np.polyfit(np.log(half), ys, 1)
    if slope <= 1e-9:  # flat, up to rounding
        return None, False
    exponent = (target - intercept) / slope
    return (int(math.ceil(math.exp(exponent))) if exponent < 40 else 10**17), True


def _interval_json(iv: Interval) -> dict[str, Any]:
    return {"mean": iv.mean, "sd": _finite(iv.sd), "low": _finite(iv.low), "high": _finite(iv.high),
            "level": iv.level, "n": iv.n}


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x
