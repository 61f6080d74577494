"""The upcycling suite's part of the report: every run's validation loss against training compute, the extra
compute each needs to reach the dense model's final loss, and Komatsuzaki et al. 2023's comparison (arXiv
2212.05055: an upcycled model against the dense model trained on, at equal extra compute).

Compute is training FLOPs (accounting's per token x tokens), in units of the trunk's: a run that starts from the
trunk carries the trunk's 1.0 and adds its own; a run from scratch counts only its own. Where a branch's step-0
model computes the trunk's function (dense continued; an exact upcycling, smoe.upcycling.spec), its curve starts
at the trunk's final evaluation. The dense model's final loss is that of the dense run continued from the trunk, per
seed; the compute that reaches it is interpolated linearly between the two evaluations that bracket it. Where a
run's curve ends before the compared compute (an MoE cheaper per token than the dense model), its last loss is
used and the line says so: that comparison spends less compute on the MoE, not more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from smoe.eval.document import Block, Bullets, Figure, Heading, Paragraph, Table
from smoe.eval.plots import fig_curves
from smoe.eval.settings import CompareSettings
from smoe.eval.stats import compare_pairs, interval
from smoe.eval.suite import Arch

Curve = tuple[list[float], list[float]]  # (compute in trunk units, validation loss) of one seed's evaluations


@dataclass(frozen=True)
class TwoPhase:
    """A two-phase suite's trunk (collect()'s entry for it) and its runs, as the report reads them."""

    archs: list[Arch]
    trunk: dict[str, Any]
    settings: CompareSettings

    @property
    def reference(self) -> str:
        """The dense run continued from the trunk: the label whose final loss the others are measured against."""
        return next(a.label for a in self.archs if a.from_trunk and a.upcycle is None)

    def on_data_order(self, data: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``data`` with the branches' curves at their step of the data order (trunk steps + their own), the trunk's
        curve first: every run on the axis of the tokens it has seen."""
        start = self.settings.trunk_length
        shifted = {"trunk": self.trunk}
        for arch in self.archs:
            offset = start if arch.from_trunk else 0
            shifted[arch.label] = {**data[arch.label], "curves": [([s + offset for s in steps], losses)
                                                                  for steps, losses in data[arch.label]["curves"]]}
        return shifted

    def compute_curves(self, data: dict[str, dict[str, Any]]) -> dict[str, list[Curve]]:
        """Per run (the trunk first), per seed: its evaluations against training compute in trunk units."""
        t = self.settings.train
        tokens, start = t.batch_size * t.seq_len, self.settings.trunk_length
        units = [start * tokens * s["train_flops_per_token"] for s in self.trunk["summaries"]]
        curves = {"trunk": [([step * tokens * s["train_flops_per_token"] / u for step in steps], losses)
                            for (steps, losses), s, u
                            in zip(self.trunk["curves"], self.trunk["summaries"], units, strict=True)]}
        for arch in self.archs:
            entry, runs = data[arch.label], []
            for seed, ((steps, losses), summary) in enumerate(zip(entry["curves"], entry["summaries"], strict=True)):
                base = 1.0 if arch.from_trunk else 0.0  # a branch carries the trunk's compute
                x = [base + step * tokens * summary["train_flops_per_token"] / units[seed] for step in steps]
                if arch.from_trunk and (arch.upcycle is None or arch.upcycle.exact):
                    x, losses = [1.0, *x], [self.trunk["final"][seed]["val_loss"], *losses]
                runs.append((x, list(losses)))
            curves[arch.label] = runs
        return curves

    def blocks(self, data: dict[str, dict[str, Any]]) -> list[Block]:
        curves = self.compute_curves(data)
        ref = self.reference
        targets = [f["val_loss"] for f in data[ref]["final"]]
        rows = [("run", "train FLOPs/token (x dense)", "compute to reach it (x trunk)", "extra beyond the trunk",
                 "per seed (extra)")]
        dense_fpt = data[ref]["summaries"][0]["train_flops_per_token"]
        for label, runs in curves.items():
            if label == "trunk":
                continue
            reached = [_reach(x, y, target) for (x, y), target in zip(runs, targets, strict=True)]
            per_seed = ", ".join(f"{bound}{value - 1:+.2f}" for value, bound in reached)
            rows.append((label, f"{data[label]['summaries'][0]['train_flops_per_token'] / dense_fpt:.2f}",
                         _summary([v for v, _ in reached], [b for _, b in reached]),
                         _summary([v - 1 for v, _ in reached], [b for _, b in reached], sign="+"), per_seed))
        return [Heading(3, "Upcycling: loss against training compute"),
                Paragraph(self._setup_line()),
                Figure("compute", "Validation loss against training compute", fig_curves(
                    {label: {"curves": runs} for label, runs in curves.items()},
                    xlabel="training compute (x the trunk's)")),
                Paragraph(f"Training compute at which each run's validation curve first reaches the {ref} model's "
                          "final loss (its own seed's), in units of the trunk's compute; \"extra\" is beyond the "
                          "trunk (negative for a run from scratch that gets there with less than the trunk used). "
                          "> : not reached within the run (its compute is shown); <= : reached by its first "
                          "evaluation. Mean and 95% t-interval over seeds:"),
                Table(tuple(rows)), *self._equal_compute(curves, data)]

    def _setup_line(self) -> str:
        t, start = self.settings.train, self.settings.trunk_length
        return (f"The dense trunk trained the first {start} steps of a {start + t.steps}-step schedule; the "
                f"{', '.join(a.label for a in self.archs if a.from_trunk)} runs then continued it from the trunk's "
                f"checkpoint (a fresh optimizer) on steps {start + 1}-{start + t.steps} of the same data order, and "
                f"{', '.join(a.label for a in self.archs if not a.from_trunk)} trained all {start + t.steps} steps "
                "from scratch: every run saw the same tokens and learning rates, seed by seed.")

    def _equal_compute(self, curves: dict[str, list[Curve]], data: dict[str, dict[str, Any]]) -> list[Block]:
        """Every other run's loss at the compute the dense continuation ends with, paired against its final loss
        (Holm-corrected over these comparisons), and whether Komatsuzaki et al.'s result holds here."""
        ref = self.reference
        ends = [x[-1] for x, _ in curves[ref]]
        at = {ref: [f["val_loss"] for f in data[ref]["final"]]}
        short = {}
        for label in (a.label for a in self.archs if a.label != ref):
            at[label] = [float(np.interp(end, x, y)) for (x, y), end in zip(curves[label], ends, strict=True)]
            short[label] = any(x[-1] < end for (x, _), end in zip(curves[label], ends, strict=True))
        results = compare_pairs([(label, ref) for label in at if label != ref], at)
        items, upcycled = [], {a.label for a in self.archs if a.from_trunk and a.upcycle is not None}
        for p in results:
            gap = (f"{p.a} − {ref}: {p.mean:+.3f} nats" + ("" if p.n < 2 else
                   f", {100 * (1 - p.level):.3g}% CI [{p.ci[0]:+.3f}, {p.ci[1]:+.3f}], "
                   f"{'resolved' if p.resolved else 'not resolved'}"))
            if short[p.a]:
                gap += f" (its run ends before that compute: its final loss, at less compute than {ref}'s)"
            if p.a in upcycled:
                gap += ": " + _komatsuzaki(p, short[p.a])
            items.append(gap + ".")
        return [Paragraph(f"At the compute the {ref} run ends with (its final loss against each run's loss there, "
                          "paired by seed, Holm-corrected over these comparisons; Komatsuzaki et al. 2023 find the "
                          "upcycled model ahead of the dense one trained on from about +10-50% of the original "
                          "compute):"), Bullets(tuple(items))]


def _komatsuzaki(p, short: bool) -> str:
    if p.n < 2 or not p.resolved:
        return "neither supports nor contradicts Komatsuzaki et al.'s result at this scale"
    if p.mean < 0:
        return "Komatsuzaki et al.'s result holds at this scale (upcycled ahead of dense continuation)"
    if short:
        return "behind the dense continuation, though with less compute: equal compute is not reached"
    return "Komatsuzaki et al.'s result does not hold at this scale (the dense continuation is ahead)"


def _reach(x: list[float], y: list[float], target: float) -> tuple[float, str]:
    """The compute where the curve first reaches ``target``, interpolated between its bracketing evaluations;
    with ">" the curve's last compute when it never does, with "<=" its first when it starts there."""
    for i, loss in enumerate(y):
        if loss <= target:
            if i == 0:
                return x[0], "<="
            w = (y[i - 1] - target) / (y[i - 1] - loss)
            return x[i - 1] + w * (x[i] - x[i - 1]), ""
    return x[-1], ">"


def _summary(values: list[float], bounds: list[str], sign: str = "") -> str:
    if any(bounds):
        return "bounds only: " + ", ".join(f"{b}{v:{sign}.2f}" for v, b in zip(values, bounds, strict=True))
    iv = interval(values)
    if iv.n < 2:
        return f"{iv.mean:{sign}.2f} (one seed)"
    return f"{iv.mean:{sign}.2f} [{iv.low:{sign}.2f}, {iv.high:{sign}.2f}]"
