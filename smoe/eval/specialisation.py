"""The specialisation analyses in the report: every MoE's final checkpoint of every seed (smoe.eval.analysis), each
finding's section (one class per finding, listed in ``FINDINGS``) rendered from the per-seed results
(smoe.eval.findings)."""

from __future__ import annotations

import math

import numpy as np

from smoe.eval.document import Block, Bullets, Code, Figure, Heading, Paragraph, Table
from smoe.eval.findings import Analysis, Runs
from smoe.eval.plots import fig_affinity, fig_bars, fig_redundancy
from smoe.eval.stats import ci_text, compare_pairs, interval, spread_note
from smoe.eval.verdict import gap_text

# Redundancy contrasts a paper makes: DeepSeekMoE §4.5 (Fig. 4) finds its experts less redundant than GShard's.
REDUNDANCY_PAIRS = (("deepseekmoe", "gshard"),)


def _ci(values, digits: int, sign: str = "") -> str:
    return ci_text(list(values), digits, sign)


def _half(values) -> float:
    iv = interval(list(values))
    return iv.half if iv.n > 1 else math.nan


def _bar_title(seeds: int) -> str:
    return f" (error bars: 95% CI over {seeds} seeds)" if seeds > 1 else " (one seed: no interval)"


def _fraction(value: float) -> str:
    """1/8 for 0.125: the share of experts removed, as the count it is."""
    for denominator in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if abs(value * denominator - round(value * denominator)) < 1e-9:
            return f"{round(value * denominator)}/{denominator}"
    return f"{value:.3f}"


def _layers(runs: Runs):
    """(label, layer index, [that layer's routing per seed]) for every traced layer."""
    for label, per_seed in runs.items():
        for idx in per_seed[0].layers:
            yield label, idx, [a.layers[idx] for a in per_seed]


class RoutingTable:
    """Consecutive-token reuse, dead experts and the busiest expert's top tokens, per layer (Mixtral §5)."""

    @staticmethod
    def blocks(runs: Runs, seeds: int) -> list[Block]:
        rows = [("architecture", "layer", "same 1st expert", "chance: uniform / load-weighted", "top-k overlap",
                 "chance: uniform / load-aware", "dead", "top tokens of the busiest expert (seed 0)")]
        for label, idx, per_seed in _layers(runs):
            first = per_seed[0]
            busiest = int(np.argmax(first.load))
            tokens = (x for tok, _ in first.top_tokens.get(busiest, [])[:5] for x in (" ", Code(tok)))
            c = [layer.consecutive for layer in per_seed]
            rows.append((label, str(idx), _ci((x.first for x in c), 3),
                         f"{c[0].first_uniform:.3f} / {_ci((x.first_load_weighted for x in c), 3)}",
                         _ci((x.any for x in c), 3),
                         f"{c[0].any_uniform:.3f} / {_ci((x.any_load_aware for x in c), 3)}",
                         _ci((layer.dead for layer in per_seed), 1), (f"#{busiest}:", *tokens)))
        consecutive = {label: {str(idx): float(np.mean([x.consecutive.first for x in per_seed]))
                               for _, idx, per_seed in _layers({label: r})} for label, r in runs.items()}
        uniform = {label: next(iter(r[0].layers.values())).consecutive.first_uniform
                   for label, r in runs.items() if r[0].layers}
        errors = {label: {str(idx): _half(x.consecutive.first for x in per_seed)
                          for _, idx, per_seed in _layers({label: r})} for label, r in runs.items()}
        title = "Consecutive tokens, same first-choice expert"
        consecutive = {k: v for k, v in consecutive.items() if v}
        return [Paragraph("Consecutive tokens are read against the chance that independent routing with the measured "
                          "loads gives (Mixtral §5): the same first choice with probability Σ p_e² (p: first-choice "
                          "loads), overlapping top-k sets as often as the sets of two random tokens do."),
                Table(tuple(rows)),
                Heading(3, title), Figure("consecutive", title, fig_bars(
                    "Same first-choice expert for consecutive tokens (dashed: random)" + _bar_title(seeds), "rate",
                    consecutive, uniform, legend="layer", errors={k: errors[k] for k in consecutive}
                    if seeds > 1 else None))]


class RedundancyCurve:
    """DeepSeekMoE §4.5, Fig. 4: the loss rise when each token loses its top-scored routed experts."""

    @staticmethod
    def blocks(runs: Runs, seeds: int) -> list[Block]:
        curves = {label: r for label, r in runs.items() if r[0].redundancy.loss}
        if not curves:
            return []
        first = next(iter(curves.values()))[0].redundancy
        rows = [("architecture", *(_fraction(x) for x in first.ratios[1:]))]
        for label, per_seed in curves.items():
            red = per_seed[0].redundancy
            rows.append((label, *(f"{_ci((a.redundancy.rise[i] for a in per_seed), 4, '+')} ({n} off)"
                                  for i, n in enumerate(red.disabled_experts[1:], 1))))
        figure = fig_redundancy({label: (r[0].redundancy.ratios,
                                         [float(np.mean([a.redundancy.rise[i] for a in r]))
                                          for i in range(len(r[0].redundancy.ratios))],
                                         [_half(a.redundancy.rise[i] for a in r)
                                          for i in range(len(r[0].redundancy.ratios))])
                                 for label, r in curves.items()}, seeds)
        title = "Redundancy: disabling each token's top routed experts"
        return [Heading(3, title),
                Paragraph("Per token, the highest-scored share of the routed experts is disabled and the router picks "
                          "its top-k among the rest (DeepSeekMoE §4.5, Fig. 4). A steeper rise means less redundant "
                          "experts: each holds knowledge the others do not. Loss rise in nats over the intact model, "
                          "with the number of experts disabled per token:"),
                Table(tuple(rows)), Figure("redundancy", title, figure), *PairedRedundancy.blocks(runs, seeds)]


class PairedRedundancy:
    """DeepSeekMoE §4.5's redundancy contrast, paired by seed, where both architectures are in the suite; beside
    the difference of their intact losses, since the paper compares at matched loss."""

    @staticmethod
    def blocks(runs: Runs, seeds: int) -> list[Block]:
        blocks: list[Block] = []
        for a, b in REDUNDANCY_PAIRS:
            if a not in runs or b not in runs or not runs[a][0].redundancy.loss:
                continue
            if runs[a][0].redundancy.ratios != runs[b][0].redundancy.ratios:
                continue
            n = min(len(runs[a]), len(runs[b]))

            def paired(value, a=a, b=b, n=n):
                return gap_text(compare_pairs([(a, b)], {k: [value(x) for x in runs[k][:n]] for k in (a, b)})[0])

            items = [f"intact loss, {a} − {b}: {paired(lambda x: x.loss)}"]
            for i, ratio in enumerate(runs[a][0].redundancy.ratios[1:], 1):
                items.append(f"loss rise at {_fraction(ratio)} of the routed experts off, {a} − {b}: "
                             + paired(lambda x, i=i: x.redundancy.rise[i]))
            blocks += [Paragraph(f"DeepSeekMoE §4.5 (Fig. 4): its experts are less redundant than GShard's, so its "
                                 f"loss rises more when each token loses its top experts. Paired by seed here, {a} "
                                 f"against {b} (exploratory, each interval uncorrected 95%); the paper compares at "
                                 f"matched loss, so a resolved difference in the intact loss qualifies the rises:"),
                       Bullets(tuple(items))]
        return blocks


class CoactivationTable:
    """OLMoE §5's co-activation per layer, against independent routing with the measured loads."""

    @staticmethod
    def blocks(runs: Runs, seeds: int) -> list[Block]:
        rows = [("architecture", "layer", "most frequent partner's share", "chance")]
        rows += [(label, str(idx), _ci((x.coactivation.max_partner for x in per_seed), 3),
                  _ci((x.coactivation.chance for x in per_seed), 3))
                 for label, idx, per_seed in _layers(runs) if per_seed[0].coactivation is not None]
        if len(rows) == 1:
            return []
        return [Heading(3, "Co-activation"),
                Paragraph("For every expert, the share of the tokens choosing it that also choose its most frequent "
                          "partner, averaged over the experts (OLMoE §5: low co-activation means no fixed groups of "
                          "experts), against the same when each token's experts are drawn independently in "
                          "proportion to the measured loads:"),
                Table(tuple(rows))]


class Dropless:
    """For architectures with a capacity limit: the loss with drops (as the suite evaluates) and without."""

    @staticmethod
    def blocks(runs: Runs, seeds: int) -> list[Block]:
        rows = [("architecture", "loss with the capacity limit", "dropless", "dropless − with drops")]
        for label, per_seed in runs.items():
            if per_seed[0].dropless_loss is not None:
                rows.append((label, _ci((a.loss for a in per_seed), 4), _ci((a.dropless_loss for a in per_seed), 4),
                             _ci((a.dropless_loss - a.loss for a in per_seed), 4, "+")))
        if len(rows) == 1:
            return []
        return [Heading(3, "Capacity at evaluation"),
                Paragraph("A capacity limit applies at evaluation as in training (GShard, Switch): the suite's "
                          "validation losses include the drops. The same checkpoints evaluated dropless, on the "
                          "analysis batches:"),
                Table(tuple(rows))]


class Knockout:
    """DeepSeekMoE §4.5's knock-outs: the most-loaded routed experts, the shared experts, and the shared experts
    traded for as many more routed ones."""

    @staticmethod
    def blocks(runs: Runs, seeds: int) -> list[Block]:
        keys = list(dict.fromkeys(k for r in runs.values() for k in r[0].knockout))  # top-n, then shared
        if not keys:
            return []
        rows = [("architecture", *(Code(k) for k in keys))]
        for label, per_seed in runs.items():
            fraction = per_seed[0].knockout_fraction
            rows.append((label, *((_ci((a.knockout[k] for a in per_seed), 4, "+")
                                   + (f" ({_fraction(fraction[k])} of its experts)" if k in fraction else ""))
                                  if k in per_seed[0].knockout else "n/a" for k in keys)))
        title = "Expert knock-out"
        return [Heading(3, title),
                Paragraph("Loss rise (nats) when the most-loaded routed experts of every layer, or all shared experts, "
                          "are disabled, with the share of the layer's routed experts that is (4 of 8 is not 4 of 64; "
                          "the redundancy curve compares at equal shares); shared_to_routed disables the shared "
                          "experts and routes to as many more routed ones, keeping the compute (n/a: the "
                          "architecture has no such experts to disable):"),
                Table(tuple(rows)),
                Figure("knockout", title, fig_bars(
                    "Loss rise when experts are disabled" + _bar_title(seeds), "Δ loss (nats)",
                    {label: {k: float(np.mean([a.knockout[k] for a in r])) for k in r[0].knockout}
                     for label, r in runs.items()},
                    errors={label: {k: _half(a.knockout[k] for a in r) for k in r[0].knockout}
                            for label, r in runs.items()} if seeds > 1 else None))]


class Domains:
    """Domain affinity (seed 0) and specialisation against shuffled sources and the vocabulary baseline."""

    @staticmethod
    def blocks(runs: Runs, seeds: int) -> list[Block]:
        with_affinity = {label: r[0] for label, r in runs.items()
                         if r[0].layers and next(iter(r[0].layers.values())).domain_affinity is not None}
        if not with_affinity:
            return []
        title = "Domain affinity (seed 0)"
        blocks: list[Block] = [Heading(3, title), Figure("affinity", title, fig_affinity(
            {label: a.to_json() for label, a in with_affinity.items()}, next(iter(with_affinity.values())).sources))]
        rows = [("architecture", "layer", "specialisation", "shuffled sources", "vocabulary baseline",
                 "beyond the vocabulary")]
        for label, idx, per_seed in _layers(runs):
            sp = [x.specialisation for x in per_seed]
            if sp[0] is None:
                continue
            vocabulary = sp[0].vocabulary is not None
            rows.append((label + (" (hash)" if per_seed[0].routing == "hash" else ""), str(idx),
                         _ci((x.score for x in sp), 3), _ci((x.shuffled_mean for x in sp), 3),
                         _ci((x.vocabulary for x in sp), 3) if vocabulary else "n/a",
                         _ci((x.score - x.vocabulary for x in sp), 3, "+") if vocabulary else "n/a"))
        if len(rows) > 1:
            blocks += [Paragraph("Domain specialisation: the mean over sources of the total-variation distance "
                                 "between a source's expert distribution and the pooled one, against two baselines: "
                                 "the sources shuffled across sequences (what chance alone gives at this sample "
                                 "size), and the vocabulary, the score a router that only looks at the token would "
                                 "reach (each token routed by its id's average over the data: sources differ in "
                                 "their words, so a token-keyed router specialises by source without knowing any). "
                                 "A hash layer is that router; only a score above the vocabulary baseline is routing "
                                 "by more than the token:"),
                       Table(tuple(rows))]
        return blocks


class Saturation:
    """OLMoE §5.1: the share of the final top-k choices each earlier checkpoint already makes, against chance."""

    @staticmethod
    def blocks(runs: Runs, seeds: int) -> list[Block]:
        sat = {label: r for label, r in runs.items() if r[0].saturation}
        if not sat:
            return []
        steps = sorted({s for r in sat.values() for s in r[0].saturation})

        def mean_overlap(a: Analysis, step: int) -> float:
            return float(np.mean([o for o, _ in a.saturation[step].values()]))

        title = "Router saturation"
        table = [("architecture", *(f"step {s}" for s in steps))]
        table += [(label, *(_ci((mean_overlap(a, s) for a in r), 3) if s in r[0].saturation else "n/a"
                            for s in steps)) for label, r in sat.items()]
        by_layer = [("architecture", "layer", *(f"step {s}" for s in steps))]
        for label, r in sat.items():
            for layer in sorted({i for v in r[0].saturation.values() for i in v}):
                by_layer.append((label, str(layer), *(
                    f"{_ci((a.saturation[s][layer][0] for a in r), 3)} (chance "
                    f"{np.mean([a.saturation[s][layer][1] for a in r]):.3f})"
                    if layer in r[0].saturation.get(s, {}) else "n/a" for s in steps)))
        return [Heading(3, title),
                Paragraph("Share of the final checkpoint's top-k choices that each earlier checkpoint already makes "
                          "(OLMoE §5.1), mean over layers:"),
                Table(tuple(table)),
                Paragraph("Per layer, with the chance level: the overlap that independent routings with the two "
                          "checkpoints' measured loads would show (a saturation near it means nothing settled yet):"),
                Table(tuple(by_layer)),
                Figure("saturation", title, fig_bars(
                    "Share of final top-k choices already made at step" + _bar_title(seeds), "saturation",
                    {label: {str(s): float(np.mean([mean_overlap(a, s) for a in r])) for s in r[0].saturation}
                     for label, r in sat.items()}, legend="step",
                    errors={label: {str(s): _half(mean_overlap(a, s) for a in r) for s in r[0].saturation}
                            for label, r in sat.items()} if seeds > 1 else None))]


# The report's sections of findings, in order; each renders its rows from every seed's Analysis.
FINDINGS = (RoutingTable, RedundancyCurve, CoactivationTable, Dropless, Knockout, Domains, Saturation)


def specialisation(runs: Runs, seeds: int) -> list[Block]:
    """The findings of every seed, as mean ± interval over seeds; top tokens and domain affinity are seed 0's, as
    they do not average across runs whose experts differ."""
    doc: list[Block] = [Heading(2, "Specialisation (validation set)"),
                        Paragraph(f"Each MoE architecture's final checkpoint of every seed, on the part of the "
                                  f"suite's fixed validation set the periodic evaluations read. Everything here is "
                                  f"exploratory: intervals are uncorrected 95% ones, and only the pre-registered "
                                  f"contrasts above are the verdict. {spread_note(seeds)}")]
    for finding in FINDINGS:
        doc += finding.blocks(runs, seeds)
    return doc
