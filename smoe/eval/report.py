"""The head-to-head report: ``report.md`` (plots as PNG files beside it) and a self-contained ``report.html``
(plots embedded), from the runs of a suite directory.

The report is built once as a document (smoe.eval.document) and rendered to both files, so they cannot say
different things. Its sections: the verdict (paired differences over seeds, Holm-corrected; smoe.eval.stats), the
papers' orderings checked against the same intervals, the final table and curves (with decoding at long context
where the architectures' layer types differ: smoe.eval.long_context), balance and load over training, and the
specialisation analyses (smoe.eval.analysis) of every seed, summarised over seeds. The data come from
smoe.eval.collect and the figures from smoe.eval.plots.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from smoe.eval import long_context
from smoe.eval.collect import analysis_json, collect, run_analyses
from smoe.eval.document import (
    Block,
    Bullets,
    Code,
    Figure,
    Heading,
    Paragraph,
    Strong,
    Table,
    Text,
    to_html,
    to_markdown,
)
from smoe.eval.ladder import compute_ladder
from smoe.eval.plots import fig_affinity, fig_balance, fig_bars, fig_curves, fig_loads, fig_redundancy
from smoe.eval.stats import ALPHA, POWER, Paired, compare_pairs, interval
from smoe.eval.suite import MATCH_TOLERANCE, CompareSettings, Suite, read_learning_rates
from smoe.eval.upcycling import TwoPhase
from smoe.io.files import atomic_write_bytes, atomic_write_text, write_json
from smoe.train.loop import resolve_device

# Published validation losses whose order a suite can check, by architecture label.
PAPERS = {
    # DeepSeekMoE (arXiv 2401.06066) Table 1: ~2B total parameters, 100B tokens, Pile validation loss
    "DeepSeekMoE Table 1": {"dense": 2.060, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808},
    # DeepSeek-V3 (arXiv 2412.19437) §4.5.3: 1B MoE, sequence-wise aux loss against aux-loss-free balancing
    "DeepSeek-V3 §4.5.3": {"seq-aux": 2.258, "aux-free": 2.253},
}


# --- statistics into words ---------------------------------------------------------------------------------------


def comparisons(losses: dict[str, list[float]]) -> tuple[list[Paired], list[tuple[str, Paired]]]:
    """The report's comparisons of final validation loss: every architecture against the best (lowest mean), and
    each ordering the papers publish between two architectures present (adjacent in the paper's order, which
    together imply the whole order), Holm-corrected together. Returns them, and the papers' claims as
    ``(source, better - worse by the paper)``, sharing their comparison with the first list where one pair is in
    both."""
    best = min(losses, key=lambda k: np.mean(losses[k]))
    pairs = [(label, best) for label in losses if label != best]
    wanted = []
    for source, paper in PAPERS.items():
        present = sorted((k for k in paper if k in losses), key=lambda k: paper[k])  # best first
        for better, worse in itertools.pairwise(present):
            wanted.append((source, better, worse))
            if (better, worse) not in pairs and (worse, better) not in pairs:
                pairs.append((better, worse))
    results = compare_pairs(pairs, losses)
    by_pair = {(p.a, p.b): p for p in results}
    claims = [(source, by_pair.get((better, worse)) or _flip(by_pair[(worse, better)]))
              for source, better, worse in wanted]
    return results, claims


def _flip(p: Paired) -> Paired:
    return replace(p, a=p.b, b=p.a, diffs=tuple(-d for d in p.diffs), mean=-p.mean, ci=(-p.ci[1], -p.ci[0]))


def _gap(p: Paired) -> str:
    """``+0.006 nats, 97.5% CI [-0.100, +0.090], not resolved (detectable at this n: 0.120)``"""
    if p.n < 2:
        return f"{p.mean:+.3f} nats (1 seed: no interval, nothing resolved)"
    return (f"{p.mean:+.3f} nats, {_pct(1 - p.level)} CI [{p.ci[0]:+.3f}, {p.ci[1]:+.3f}], "
            f"{'resolved' if p.resolved else 'not resolved'} (detectable at this n: {p.mdd:.3f})")


def _pct(level: float) -> str:
    return f"{100 * level:.3g}%"


def verdict(losses: dict[str, list[float]], results: list[Paired]) -> list[Block]:
    n = min(len(v) for v in losses.values())
    best = min(losses, key=lambda k: np.mean(losses[k]))
    lead = ("Lowest mean validation loss: ", Strong(best),
            f" ({np.mean(losses[best]):.4f} nats, {n} seed{'s' if n > 1 else ''}).")
    if n < 2:
        how = (" 1 seed: no interval, nothing resolved; seed-to-seed noise is not measured. Rerun with ",
               Code("--seeds 3"), " (finished runs are reused) to separate the gaps below from it.")
    else:
        how = ((f" Each line below is the mean over the {n} seeds of the paired difference in final validation "
               f"loss (seed s gives every architecture the same data order and validation split), with a "
               f"t-interval on {n - 1} degree{'s' if n > 2 else ''} of freedom, Holm-corrected over the "
               f"m = {len(results)} comparison{'s' if len(results) > 1 else ''} of this report (each architecture "
               f"against the best, and the papers' orders below) at a "
               f"family-wise {_pct(ALPHA)}. A gap is resolved only when its corrected interval excludes 0. "
               f"\"Detectable\" is the smallest true gap this many seeds would resolve with {_pct(POWER)} power at "
               f"the same level, from the observed spread of the differences."),)
    lines = tuple(f"{p.a} − {p.b}: {_gap(p)}" for p in results if p.b == best)
    return [Paragraph(lead + how), Bullets(lines)]


def against_papers(claims: list[tuple[str, Paired]]) -> list[Block]:
    if not claims:
        known = "; ".join(f"{source}: {', '.join(paper)}" for source, paper in PAPERS.items())
        return [Paragraph(f"No two architectures here have a published order to check ({known}).")]
    items = []
    for source, p in claims:
        paper = PAPERS[source]
        said = (f"{source}: {p.a} below {p.b} ({paper[p.a]:.3f} against {paper[p.b]:.3f}, "
                f"{paper[p.a] - paper[p.b]:+.3f}). Ours, {p.a} − {p.b}: {_gap(p)}")
        if not p.resolved:
            items.append(said + ": neither supports nor contradicts the paper.")
        elif p.mean < 0:
            items.append(said + ": agrees with the paper.")
        else:
            items.append(said + ": the opposite order to the paper's.")
    return [Paragraph("The papers' models are far larger and trained far longer; only the order of each pair is "
                      "tested, not the size of its gap, and with the same intervals and correction as the verdict."),
            Bullets(tuple(items))]


def _ci(values: list[float], digits: int = 4, sign: str = "") -> str:
    """``mean ± half-width of the 95% t-interval`` over seeds; the mean alone for one seed."""
    iv = interval(values)
    mean = f"{iv.mean:{sign}.{digits}f}"
    return mean if iv.n < 2 else f"{mean} ± {iv.half:.{digits}f}"


def _half(summary: dict[str, Any]) -> float:
    return summary["high"] - summary["mean"] if summary["high"] is not None else np.nan


def _spread_note(n: int) -> str:
    if n < 2:
        return "One seed: each number is that run's, with no interval."
    return f"± is the half-width of the 95% t-interval of the mean over {n} seeds."


# --- the report --------------------------------------------------------------------------------------------------


def write_report(out: Path, suite: str, spec: Suite, settings: CompareSettings,
                 matched: dict[str, dict[str, float]], log=print) -> Path:
    out = Path(out)
    data = collect(out, spec.archs, settings.seeds)
    analyses = analysis_json(run_analyses(out, spec.archs, settings, log=log))
    ladder = collect(out, spec.ladder, settings.seeds) if spec.ladder else None
    two_phase = None if spec.trunk is None else TwoPhase(spec.archs, collect(out, [spec.trunk], settings.seeds)[
        spec.trunk.label], settings)
    decoding = long_context.measure_suite(out, spec.archs, settings, str(resolve_device(settings.train.device)),
                                          log) if long_context.differs_in_layer_types(spec.archs) else None
    doc = build_document(suite, settings, matched, data, analyses, matching=spec.matching, ladder=ladder,
                         learning_rates=read_learning_rates(out), two_phase=two_phase, decoding=decoding)
    write_json(out / "analysis.json", analyses, indent=1)
    for block in doc:
        if isinstance(block, Figure):
            atomic_write_bytes(out / "plots" / f"{block.name}.png", block.png)
    atomic_write_text(out / "report.md", to_markdown(doc))
    return atomic_write_text(out / "report.html", to_html(doc, f"smoe head-to-head: {suite}"))


def build_document(suite: str, settings: CompareSettings, matched: dict[str, dict[str, float]],
                   data: dict[str, dict[str, Any]], analyses: dict[str, dict[str, Any]], *,
                   matching: str = "active", ladder: dict[str, dict[str, Any]] | None = None,
                   learning_rates: dict[str, dict[str, Any]] | None = None, two_phase: TwoPhase | None = None,
                   decoding: dict[str, Any] | None = None) -> list[Block]:
    losses = {label: [f["val_loss"] for f in entry["final"]] for label, entry in data.items()}
    results, claims = comparisons(losses)
    doc: list[Block] = [Heading(1, f"smoe head-to-head: {suite}"),
                        Paragraph(setup_line(suite, settings, data, two_phase is not None)),
                        Paragraph(matching_line(matching, matched)),
                        Heading(2, "Verdict"), *verdict(losses, results),
                        Heading(2, "Against the papers"), *against_papers(claims),
                        Heading(2, "Results"), Paragraph(_spread_note(settings.seeds)),
                        results_table(data, matched, matching),
                        *routing_end_blocks(data),
                        *learning_rate_blocks(learning_rates),
                        *compute_ladder(data, matched, ladder, settings),
                        *(two_phase.blocks(data) if two_phase else []),
                        *(long_context.blocks(decoding) if decoding else []),
                        Heading(3, "Validation loss"), Figure("curves", "Validation loss", fig_curves(
                            two_phase.on_data_order(data) if two_phase else data,
                            xlabel="step of the data order" if two_phase else "step")),
                        Heading(3, "Expert load balance"),
                        Figure("balance", "Expert load balance over seeds", fig_balance(data))]
    for label, entry in data.items():
        if entry.get("loads"):
            title = f"{label}: expert load heatmap (seed 0; expert identities differ between seeds)"
            doc += [Heading(3, title), Figure(f"load-{label}", title, fig_loads(label, entry["loads"]))]
    if analyses:
        doc += specialisation(analyses, settings.seeds)
    return doc


def setup_line(suite: str, settings: CompareSettings, data: dict[str, dict[str, Any]], two_phase: bool = False
               ) -> Text:
    t, d = settings.train, settings.data
    # run.json holds the precision each run resolved ("auto" becomes bf16 or fp32 for its device)
    used = sorted({p for entry in data.values() for p in entry["precision"]})
    precision = used[0] if len(used) == 1 else f"{'/'.join(used)} (differs between runs)"
    val = (" (validation ", Code(d.val_data), ")") if d.val_data else ()
    steps, same = t.steps, "Same data order, optimizer and schedule for all."
    if two_phase:  # the upcycling section describes the two phases
        steps, same = settings.trunk_length + t.steps, "Same data order and tokens for all, in two phases (below)."
    return ("Suite ", Code(suite), " on ", Code(d.data), *val,
            (f": {steps} steps x {t.batch_size} x {t.seq_len} tokens ({steps * t.batch_size * t.seq_len:,} "
             f"tokens per run), lr {t.lr}, {precision}, {settings.seeds} seed(s). {same}"))


def matching_line(matching: str, matched: dict[str, dict[str, Any]]) -> Text:
    if matching == "none":
        return ("Not matched on parameters: the MoEs here are made from (or shaped like) the dense model and cost "
                "more or less per token, so they are compared by training compute (below); the table's Δ matched "
                "is n/a.")
    what = {"active": "activated", "total": "total"}[matching]
    line = (f"Matched on {what} parameters without the embedding and head, within {MATCH_TOLERANCE:.0%} of the "
            "reference (the table's Δ matched)")
    if matching == "total":
        line += ("; as in DeepSeekMoE Table 1, the MoE architectures hold the same total parameters and activate "
                 "different amounts, and a dense model is the activated-size reference")
    reference = [label for label, m in matched.items()
                 if m.get("matched", True) and m.get("matched_vs_reference", 0) == 0]
    return line + (f" (reference: {reference[0]})." if reference else ".")


def results_table(data: dict[str, dict[str, Any]], matched: dict[str, dict[str, float]],
                  matching: str = "active") -> Table:
    rows = [("architecture", "val loss", "BPB", "params total", "active", "Δ matched", "GFLOPs/token",
             "train tok/s", "MFU", "peak mem")]
    for label, entry in data.items():
        s, m = entry["summaries"], matched[label]
        peak = max(x["peak_device_bytes"] or x["peak_rss_bytes"] for x in s)
        delta = (f"{m.get('matched_vs_reference', m['active_vs_first']):+.1%}" if m.get("matched", True)
                 else "reference" if matching == "total" else "n/a")
        rows.append((
            label, _ci([f["val_loss"] for f in entry["final"]]), _ci([f["val_bpb"] for f in entry["final"]]),
            f"{m['total_params'] / 1e6:.2f}M", f"{m['active_params'] / 1e6:.2f}M", delta,
            f"{m['flops_per_token'] / 1e9:.3g}", f"{np.median([x['tokens_per_s'] for x in s]):,.0f}",
            _mfu(entry.get("mfu")), f"{peak / 2**20:,.0f} MiB"))
    return Table(tuple(rows))


def _mfu(per_seed: list[float | None] | None) -> str:
    """The median step's model FLOPs utilisation: training FLOPs per second over the device peak (the vendor's
    bf16 peak on known GPUs, else a dense matmul measured at the start of each run)."""
    values = [v for v in per_seed or [] if v is not None]
    return f"{np.median(values):.1%}" if values else "n/a"


def routing_end_blocks(data: dict[str, dict[str, Any]]) -> list[Block]:
    """How balanced each MoE's routing ended training and, for architectures with a capacity limit, what it
    dropped (collect.routing_end), mean ± t-interval over seeds."""
    ends = {label: [e for e in entry.get("routing_end", []) if e is not None] for label, entry in data.items()}
    ends = {label: per_seed for label, per_seed in ends.items() if per_seed}
    if not ends:
        return []
    drops = any(e["dropped"] > 0 for per_seed in ends.values() for e in per_seed)
    rows = [("architecture", "load CV", "hottest expert / mean",
             *(("dropped, over training", "dropped, last tenth") if drops else ()))]
    for label, per_seed in ends.items():
        cells = [_ci([e["load_cv"] for e in per_seed], 3), _ci([e["max_mean"] for e in per_seed], 2)]
        if drops:
            cells += [_ci([100 * e[key] for e in per_seed], 2) + "%" for key in ("dropped", "dropped_end")]
        rows.append((label, *cells))
    return [Heading(3, "Routing at the end of training"),
            Paragraph("Over the last tenth of the training steps: the coefficient of variation of the experts' load "
                      "(mean over MoE layers; 0 is perfectly even) and the busiest expert's load over the mean (the "
                      "worst layer)" + ("; and the share of (token, expert) assignments a capacity limit dropped "
                                        "(a dropped assignment adds nothing to its token's output), mean over "
                                        "layers, over all of training and over its last tenth" if drops else "")
                      + "."),
            Table(tuple(rows))]


def learning_rate_blocks(learning_rates: dict[str, dict[str, Any]] | None) -> list[Block]:
    """What --tune-lr tried and chose per architecture (lr.json)."""
    if not learning_rates:
        return []
    tried = list(next(iter(learning_rates.values()))["tried"])
    rows = [("architecture", *(f"val loss at lr {lr}" for lr in tried), "chosen")]
    rows += [(label, *(f"{v['tried'][lr]:.4f}" for lr in tried), f"{v['chosen']:g}")
             for label, v in learning_rates.items()]
    return [Heading(3, "Learning rates"),
            Paragraph("Each architecture was trained once (seed 0) at every rate; every seed then trained at the "
                      "rate with the lowest validation loss, so one shared rate does not decide the ranking."),
            Table(tuple(rows))]


def _stat(summary: dict[str, Any], digits: int, sign: str = "") -> str:
    return _ci(summary["values"], digits, sign)


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
                        Paragraph(f"Each MoE architecture's final checkpoint of every seed, on the validation split "
                                  f"its run was evaluated on. {_spread_note(seeds)} Consecutive tokens are read "
                                  "against the chance that independent routing with the measured loads gives "
                                  "(Mixtral §5): the same first choice with probability Σ p_e² (p: first-choice "
                                  "loads), overlapping top-k sets as often as the sets of two random tokens do."),
                        Table(tuple(rows))]
    doc += redundancy_blocks(over, seeds)

    traced = {label: o for label, o in over.items() if o["layers"]}  # hash layers are not traced (analysis.py)
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
        rows = [("architecture", "layer", "specialisation", "shuffled sources")]
        rows += [(label, layer, _stat(v["specialisation"]["score"], 3), _stat(v["specialisation"]["shuffled"], 3))
                 for label, o in over.items() for layer, v in o["layers"].items() if "specialisation" in v]
        if len(rows) > 1:
            doc += [Paragraph("Domain specialisation: the mean over sources of the total-variation distance between "
                              "a source's expert distribution and the pooled one, against the same score with the "
                              "sources shuffled across sequences (what chance alone gives at this sample size):"),
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
