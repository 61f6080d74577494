"""The specialisation analyses in the report: every MoE's final checkpoint of every seed (smoe.eval.analysis),
summarised over seeds (smoe.eval.collect.over_seeds), as tables and figures."""

from __future__ import annotations

from typing import Any

import numpy as np

from smoe.eval.document import Block, Bullets, Code, Figure, Heading, Paragraph, Table
from smoe.eval.plots import fig_affinity, fig_bars, fig_redundancy
from smoe.eval.stats import ci_text, compare_pairs, spread_note
from smoe.eval.verdict import gap_text

# Redundancy contrasts a paper makes: DeepSeekMoE §4.5 (Fig. 4) finds its experts less redundant than GShard's.
REDUNDANCY_PAIRS = (("deepseekmoe", "gshard"),)


def _half(summary: dict[str, Any]) -> float:
    return summary["high"] - summary["mean"] if summary["high"] is not None else np.nan


def _stat(summary: dict[str, Any], digits: int, sign: str = "") -> str:
    return ci_text(summary["values"], digits, sign)


def specialisation(analyses: dict[str, dict[str, Any]], seeds: int) -> list[Block]:
    """The analyses of every seed, as mean ± interval over seeds (analysis.json ``over_seeds``); top tokens and
    domain affinity are seed 0's, as they do not average across runs with different tokenizers and experts."""
    over = {label: a["over_seeds"] for label, a in analyses.items()}
    bar_title = f" (error bars: 95% CI over {seeds} seeds)" if seeds > 1 else " (one seed: no interval)"
    rows = [("architecture", "layer", "same 1st expert", "chance: uniform / load-weighted", "top-k overlap",
             "chance: uniform / load-aware", "dead", "top tokens of the busiest expert (seed 0)")]
    for label, a in analyses.items():
        for layer, v in a["layers"].items():
            o = over[label]["layers"][layer]
            busiest = int(np.argmax(v["load"]))
            tokens = (x for tok, _ in v["top_tokens"][str(busiest)][:5] for x in (" ", Code(tok)))
            aware = _stat(o["any_load_aware"], 3) if "any_load_aware" in o else "n/a"
            rows.append((label, layer, _stat(o["first"], 3),
                         f"{o['first_uniform']:.3f} / {_stat(o['first_load_weighted'], 3)}", _stat(o["any"], 3),
                         f"{o['any_uniform']:.3f} / {aware}", _stat(o["dead"], 1), (f"#{busiest}:", *tokens)))
    doc: list[Block] = [Heading(2, "Specialisation (validation set)"),
                        Paragraph(f"Each MoE architecture's final checkpoint of every seed, on the part of the "
                                  f"suite's fixed validation set the periodic evaluations read. Everything here is "
                                  f"exploratory: intervals are uncorrected 95% ones, and only the pre-registered "
                                  f"contrasts above are the verdict. {spread_note(seeds)} Consecutive tokens are read "
                                  "against the chance that independent routing with the measured loads gives "
                                  "(Mixtral §5): the same first choice with probability Σ p_e² (p: first-choice "
                                  "loads), overlapping top-k sets as often as the sets of two random tokens do."),
                        Table(tuple(rows))]
    doc += redundancy_blocks(over, seeds) + paired_redundancy(analyses) + coactivation_blocks(over)
    doc += dropless_blocks(over)

    traced = {label: o for label, o in over.items() if o["layers"]}
    consecutive = {label: {k: v["first"]["mean"] for k, v in o["layers"].items()} for label, o in traced.items()}
    uniform = {label: next(iter(o["layers"].values()))["first_uniform"] for label, o in traced.items()}
    errors = {label: {k: _half(v["first"]) for k, v in o["layers"].items()} for label, o in traced.items()}
    title = "Consecutive tokens, same first-choice expert"
    doc += [Heading(3, title), Figure("consecutive", title, fig_bars(
        "Same first-choice expert for consecutive tokens (dashed: random)" + bar_title, "rate", consecutive,
        uniform, legend="layer", errors=errors if seeds > 1 else None))]

    keys = list(dict.fromkeys(k for o in over.values() for k in o["knockout"]))  # analyze's order: top-n, shared
    if keys:
        knock = [("architecture", *(Code(k) for k in keys))]
        for label, o in over.items():
            fraction = o.get("knockout_fraction", {})
            knock.append((label, *((_stat(o["knockout"][k], 4, "+")
                                    + (f" ({_fraction(fraction[k])} of its experts)" if k in fraction else ""))
                                   if k in o["knockout"] else "n/a" for k in keys)))
        title = "Expert knock-out"
        doc += [Heading(3, title),
                Paragraph("Loss rise (nats) when the most-loaded routed experts of every layer, or all shared experts, "
                          "are disabled, with the share of the layer's routed experts that is (4 of 8 is not 4 of 64; "
                          "the redundancy curve above compares at equal shares); shared_to_routed disables the shared "
                          "experts and routes to as many more routed ones, keeping the compute (n/a: the "
                          "architecture has no such experts to disable):"),
                Table(tuple(knock)),
                Figure("knockout", title, fig_bars(
                    "Loss rise when experts are disabled" + bar_title, "Δ loss (nats)",
                    {label: {k: v["mean"] for k, v in o["knockout"].items()} for label, o in over.items()},
                    errors={label: {k: _half(v) for k, v in o["knockout"].items()} for label, o in over.items()}
                    if seeds > 1 else None))]

    with_affinity = {label: a for label, a in analyses.items()
                     if a["layers"] and "domain_affinity" in next(iter(a["layers"].values()))}
    if with_affinity:
        title = "Domain affinity (seed 0)"
        sources = next(iter(with_affinity.values()))["sources"]
        doc += [Heading(3, title), Figure("affinity", title, fig_affinity(with_affinity, sources))]
        rows = [("architecture", "layer", "specialisation", "shuffled sources", "vocabulary baseline",
                 "beyond the vocabulary")]
        for label, o in over.items():
            for layer, v in o["layers"].items():
                if "specialisation" not in v:
                    continue
                sp = v["specialisation"]
                kind = " (hash)" if v.get("routing") == "hash" else ""
                rows.append((label + kind, layer, _stat(sp["score"], 3), _stat(sp["shuffled"], 3),
                             _stat(sp["vocabulary"], 3) if "vocabulary" in sp else "n/a",
                             _stat(sp["beyond_vocabulary"], 3, "+") if "beyond_vocabulary" in sp else "n/a"))
        if len(rows) > 1:
            doc += [Paragraph("Domain specialisation: the mean over sources of the total-variation distance between "
                              "a source's expert distribution and the pooled one, against two baselines: the sources "
                              "shuffled across sequences (what chance alone gives at this sample size), and the "
                              "vocabulary, the score a router that only looks at the token would reach (each token "
                              "routed by its id's average over the data: sources differ in their words, so a "
                              "token-keyed router specialises by source without knowing any). A hash layer is that "
                              "router; only a score above the vocabulary baseline is routing by more than the token:"),
                    Table(tuple(rows))]

    sat = {label: o["saturation"] for label, o in over.items() if o.get("saturation")}
    if sat:
        steps = sorted({s for v in sat.values() for s in v}, key=int)
        title = "Router saturation"
        table = [("architecture", *(f"step {s}" for s in steps))]
        table += [(label, *(_stat(v[s], 3) if s in v else "n/a" for s in steps)) for label, v in sat.items()]
        doc += [Heading(3, title),
                Paragraph("Share of the final checkpoint's top-k choices that each earlier checkpoint already makes "
                          "(OLMoE §5.1), mean over layers:"),
                Table(tuple(table)), *_saturation_by_layer(over, steps),
                Figure("saturation", title, fig_bars(
                    "Share of final top-k choices already made at step" + bar_title, "saturation",
                    {label: {s: x["mean"] for s, x in v.items()} for label, v in sat.items()}, legend="step",
                    errors={label: {s: _half(x) for s, x in v.items()} for label, v in sat.items()}
                    if seeds > 1 else None))]
    return doc


def _saturation_by_layer(over: dict[str, dict[str, Any]], steps: list[str]) -> list[Block]:
    """Per layer, each step's saturation beside its chance: the overlap two independent routings with the two
    checkpoints' measured loads would show."""
    rows = [("architecture", "layer", *(f"step {s}" for s in steps))]
    for label, o in over.items():
        by_step = o.get("saturation_by_layer", {})
        layers = sorted({layer for v in by_step.values() for layer in v}, key=int)
        for layer in layers:
            rows.append((label, layer, *(f"{_stat(by_step[s][layer]['overlap'], 3)} (chance "
                                         f"{by_step[s][layer]['chance']['mean']:.3f})"
                                         if layer in by_step.get(s, {}) else "n/a" for s in steps)))
    if len(rows) == 1:
        return []
    return [Paragraph("Per layer, with the chance level: the overlap that independent routings with the two "
                      "checkpoints' measured loads would show (a saturation near it means nothing settled yet):"),
            Table(tuple(rows))]


def _fraction(value: float) -> str:
    """1/8 for 0.125: the share of experts removed, as the count it is."""
    for denominator in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if abs(value * denominator - round(value * denominator)) < 1e-9:
            return f"{round(value * denominator)}/{denominator}"
    return f"{value:.3f}"


def redundancy_blocks(over: dict[str, dict[str, Any]], seeds: int) -> list[Block]:
    """DeepSeekMoE §4.5: the loss rise when each token loses its top-scored routed experts, per share of them."""
    curves = {label: o["redundancy"] for label, o in over.items() if o.get("redundancy")}
    if not curves:
        return []
    ratios = next(iter(curves.values()))["ratios"]
    rows = [("architecture", *(f"{_fraction(r)}" for r in ratios[1:]))]
    for label, c in curves.items():
        rows.append((label, *(f"{_stat(rise, 4, '+')} ({n} off)" for rise, n in zip(c["rise"][1:],
                                                                                    c["disabled_experts"][1:]))))
    title = "Redundancy: disabling each token's top routed experts"
    figure = fig_redundancy({label: (c["ratios"], [r["mean"] for r in c["rise"]], [_half(r) for r in c["rise"]])
                             for label, c in curves.items()}, seeds)
    return [Heading(3, title),
            Paragraph("Per token, the highest-scored share of the routed experts is disabled and the router picks "
                      "its top-k among the rest (DeepSeekMoE §4.5, Fig. 4). A steeper rise means less redundant "
                      "experts: each holds knowledge the others do not. Loss rise in nats over the intact model, "
                      "with the number of experts disabled per token:"),
            Table(tuple(rows)), Figure("redundancy", title, figure)]


def paired_redundancy(analyses: dict[str, dict[str, Any]]) -> list[Block]:
    """DeepSeekMoE §4.5's redundancy contrast where both architectures are in the suite: per seed, the difference of
    their loss rises at each share of experts disabled (exploratory, uncorrected 95%), beside the difference of
    their intact losses, since the paper compares at matched loss (DeepSeekMoE against a GShard as good)."""
    blocks: list[Block] = []
    for a, b in REDUNDANCY_PAIRS:
        if a not in analyses or b not in analyses:
            continue
        per = {label: [analyses[label], *analyses[label]["other_seeds"].values()] for label in (a, b)}
        ratios = analyses[a].get("redundancy", {}).get("ratios")
        if not ratios or ratios != analyses[b].get("redundancy", {}).get("ratios"):
            continue
        items = [f"intact loss, {a} − {b}: {gap_text(_paired(per, a, b, lambda r: r['loss']))}"]
        for i, ratio in enumerate(ratios[1:], 1):
            items.append(f"loss rise at {_fraction(ratio)} of the routed experts off, {a} − {b}: " + gap_text(
                _paired(per, a, b, lambda r, i=i: r["redundancy"]["loss"][i] - r["redundancy"]["loss"][0])))
        blocks += [Paragraph(f"DeepSeekMoE §4.5 (Fig. 4): its experts are less redundant than GShard's, so its loss "
                             f"rises more when each token loses its top experts. Paired by seed here, {a} against "
                             f"{b} (exploratory, each interval uncorrected 95%); the paper compares at matched loss, "
                             f"so a resolved difference in the intact loss qualifies the rises:"),
                   Bullets(tuple(items))]
    return blocks


def _paired(per: dict[str, list[dict[str, Any]]], a: str, b: str, value):
    n = min(len(per[a]), len(per[b]))
    return compare_pairs([(a, b)], {label: [value(r) for r in per[label][:n]] for label in (a, b)})[0]


def coactivation_blocks(over: dict[str, dict[str, Any]]) -> list[Block]:
    """OLMoE §5's co-activation per layer, against independent routing with the measured loads."""
    rows = [("architecture", "layer", "most frequent partner's share", "chance")]
    rows += [(label, layer, _stat(v["coactivation"]["max_partner"], 3), _stat(v["coactivation"]["chance"], 3))
             for label, o in over.items() for layer, v in o["layers"].items() if "coactivation" in v]
    if len(rows) == 1:
        return []
    return [Heading(3, "Co-activation"),
            Paragraph("For every expert, the share of the tokens choosing it that also choose its most frequent "
                      "partner, averaged over the experts (OLMoE §5: low co-activation means no fixed groups of "
                      "experts), against the same when each token's experts are drawn independently in proportion "
                      "to the measured loads:"),
            Table(tuple(rows))]


def dropless_blocks(over: dict[str, dict[str, Any]]) -> list[Block]:
    """For architectures with a capacity limit: the loss with drops (as trained and as the suite evaluates) and
    without them."""
    rows = [("architecture", "loss with the capacity limit", "dropless", "dropless − with drops")]
    for label, o in over.items():
        if "dropless_loss" in o:
            rises = [d - x for d, x in zip(o["dropless_loss"]["values"], o["loss"]["values"])]
            rows.append((label, _stat(o["loss"], 4), _stat(o["dropless_loss"], 4), ci_text(rises, 4, "+")))
    if len(rows) == 1:
        return []
    return [Heading(3, "Capacity at evaluation"),
            Paragraph("A capacity limit applies at evaluation as in training (GShard, Switch): the suite's validation "
                      "losses include the drops. The same checkpoints evaluated dropless, on the analysis batches:"),
            Table(tuple(rows))]
