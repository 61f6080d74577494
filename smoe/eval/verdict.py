"""The verdict of a suite: its pre-registered contrasts, Holm-corrected over them alone; every other comparison
labelled exploratory (uncorrected 95%); and the papers' published orders, tested with the contrast's corrected
interval where the pair is pre-registered and exploratory otherwise (smoe.eval.stats for the statistics).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from smoe.eval.document import Block, Bullets, Paragraph, Strong
from smoe.eval.stats import ALPHA, POWER, Paired, compare_pairs, seeds_needed
from smoe.eval.suite import Contrast

# Published validation losses whose order a suite can check, by architecture label.
PAPERS = {
    # DeepSeekMoE (arXiv 2401.06066) Table 1: ~2B total parameters, 100B tokens, Pile validation loss
    "DeepSeekMoE Table 1": {"dense": 2.060, "hash": 1.932, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808},
    # DeepSeek-V3 (arXiv 2412.19437) §4.5.3: 1B MoE, sequence-wise aux loss against aux-loss-free balancing
    "DeepSeek-V3 §4.5.3": {"seq-aux": 2.258, "aux-free": 2.253},
}
MATCHING_WORDS = {"active": "equal activated parameters", "total": "equal total parameters",
                  "tokens": "equal training tokens"}


@dataclass(frozen=True)
class Claim:
    """A published order between two architectures present: ``result`` is better − worse by the paper."""

    source: str
    result: Paired
    registered: bool  # the pair is a pre-registered contrast (its interval is Holm-corrected)


@dataclass(frozen=True)
class Verdict:
    contrasts: list[tuple[Contrast, Paired]]
    exploratory: list[Paired]
    claims: list[Claim]
    target_gap: float

    @property
    def seeds(self) -> int:
        return min(p.n for _, p in self.contrasts)

    def needed(self, p: Paired) -> int | None:
        """Seeds this contrast's measured spread needs to detect ``target_gap`` at Holm's first-step level."""
        if p.n < 2 or math.isnan(p.sd):
            return None
        return seeds_needed(p.sd, self.target_gap, ALPHA / len(self.contrasts))

    def blocks(self) -> list[Block]:
        m, n = len(self.contrasts), self.seeds
        if n < 2:
            lead = (f"{m} contrast{'s' if m > 1 else ''} pre-registered; 1 seed: no interval, nothing resolved, "
                    "seed-to-seed noise not measured.")
        else:
            lead = (f"{m} contrast{'s' if m > 1 else ''}, declared in the suite before any run (suite.json), each "
                    f"the mean over {n} seeds of the paired difference in final validation loss (seed s gives "
                    f"every architecture the same data order; every run is evaluated on the same validation "
                    f"tokens), with a t-interval on {n - 1} degrees of freedom, Holm-corrected over these "
                    f"{m} alone at a family-wise {100 * ALPHA:g}%. A gap is ", Strong("resolved"), " only when its "
                    f"corrected interval excludes 0. \"Detectable\" is the smallest true gap these seeds resolve "
                    f"with {100 * POWER:g}% power at the contrast's level, from the measured spread; \"needs\" is "
                    f"the seeds that spread would take to detect {self.target_gap:g} nats.")
        items = []
        for c, p in self.contrasts:
            needed = self.needed(p)
            need = "" if needed is None else f"; {self.target_gap:g} nats needs {needed} seeds at this spread"
            items.append((f"{c.name} ({MATCHING_WORDS[c.matching]}; {c.why}): {gap_text(p)}{need}",))
        blocks: list[Block] = [Paragraph(lead), Bullets(tuple(items))]
        if self.exploratory:
            blocks += [Paragraph("Exploratory, not part of the verdict: every other architecture against the lowest "
                                 "mean, each with its own uncorrected 95% interval (with this many comparisons some "
                                 "will exclude 0 by chance)."),
                       Bullets(tuple(f"{p.a} − {p.b}: {gap_text(p)}" for p in self.exploratory))]
        return blocks

    def paper_blocks(self) -> list[Block]:
        if not self.claims:
            known = "; ".join(f"{source}: {', '.join(paper)}" for source, paper in PAPERS.items())
            return [Paragraph(f"No two architectures here have a published order to check ({known}).")]
        items = []
        for claim in self.claims:
            p, paper = claim.result, PAPERS[claim.source]
            said = (f"{claim.source}: {p.a} below {p.b} ({paper[p.a]:.3f} against {paper[p.b]:.3f}, "
                    f"{paper[p.a] - paper[p.b]:+.3f}). Ours, {p.a} − {p.b}"
                    f"{'' if claim.registered else ' (exploratory)'}: {gap_text(p)}")
            if not p.resolved:
                items.append(said + ": neither supports nor contradicts the paper.")
            elif p.mean < 0:
                items.append(said + ": agrees with the paper.")
            else:
                items.append(said + ": the opposite order to the paper's.")
        return [Paragraph("The papers' models are far larger and trained far longer; only the order of each pair is "
                          "tested, not the size of its gap. A pair that is a pre-registered contrast carries its "
                          "corrected interval; any other is exploratory (uncorrected 95%)."),
                Bullets(tuple(items))]

    def to_json(self) -> dict[str, Any]:
        return {"contrasts": [{**_paired_json(p), "matching": c.matching, "why": c.why, "seeds_needed": self.needed(p)}
                              for c, p in self.contrasts],
                "target_gap": self.target_gap, "alpha": ALPHA,
                "exploratory": [_paired_json(p) for p in self.exploratory],
                "papers": [{"source": c.source, **_paired_json(c.result), "registered": c.registered}
                           for c in self.claims]}


def judge(contrasts: tuple[Contrast, ...], losses: dict[str, list[float]], target_gap: float) -> Verdict:
    """The verdict on final losses (label -> per seed): the contrasts Holm-corrected together, the rest
    exploratory."""
    registered = compare_pairs([(c.a, c.b) for c in contrasts], losses)
    by_pair = {(p.a, p.b): p for p in registered}
    best = min(losses, key=lambda k: np.mean(losses[k]))
    exploratory = [compare_pairs([(label, best)], losses)[0] for label in losses
                   if label != best and not _among((label, best), by_pair)]
    claims = []
    for source, paper in PAPERS.items():
        present = sorted((k for k in paper if k in losses), key=lambda k: paper[k])  # best first
        for better, worse in itertools.pairwise(present):
            found = _among((better, worse), by_pair)
            if found is None:
                claims.append(Claim(source, compare_pairs([(better, worse)], losses)[0], False))
            else:
                claims.append(Claim(source, found if found.a == better else _flip(found), True))
    return Verdict(list(zip(contrasts, registered, strict=True)), exploratory, claims, target_gap)


def gap_text(p: Paired) -> str:
    """``+0.006 nats, 97.5% CI [-0.100, +0.090], not resolved (detectable at 12 seeds: 0.120)``"""
    if p.n < 2:
        return f"{p.mean:+.3f} nats (1 seed: no interval, nothing resolved)"
    return (f"{p.mean:+.3f} nats, {100 * (1 - p.level):.3g}% CI [{p.ci[0]:+.3f}, {p.ci[1]:+.3f}], "
            f"{'resolved' if p.resolved else 'not resolved'} (detectable at {p.n} seeds: {p.mdd:.3f})")


def _among(pair: tuple[str, str], by_pair: dict[tuple[str, str], Paired]) -> Paired | None:
    return by_pair.get(pair) or by_pair.get(pair[::-1])


def _flip(p: Paired) -> Paired:
    return replace(p, a=p.b, b=p.a, diffs=tuple(-d for d in p.diffs), mean=-p.mean, ci=(-p.ci[1], -p.ci[0]))


def _paired_json(p: Paired) -> dict[str, Any]:
    def finite(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {"a": p.a, "b": p.b, "diffs": list(p.diffs), "mean": p.mean, "sd": finite(p.sd), "p": finite(p.p),
            "ci": [finite(p.ci[0]), finite(p.ci[1])], "level": p.level, "detectable": finite(p.mdd),
            "resolved": p.resolved}
