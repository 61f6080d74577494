"""The head-to-head report: ``report.md`` (plots as PNG files beside it), a self-contained ``report.html`` (plots
embedded) and ``summary.json`` (its numbers), from the runs of a suite directory.

The report is built once as a document (smoe.eval.document) and rendered to both files, so they cannot say
different things. Its order: the design (pre-registered contrasts, seeds, data hashes), the power check (can this
regime show a gap of the contrasts' size: smoe.eval.power), the verdict on the contrasts and what is exploratory
(smoe.eval.verdict), the papers' orders, the results table with each architecture's seed-to-seed spread, the curves
(with decoding at long context where the architectures' layer types differ: smoe.eval.long_context), balance and
load over training, the specialisation analyses (smoe.eval.specialisation), and a sample from the best model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smoe.eval import long_context
from smoe.eval.collect import analysis_json, collect, ladder_rungs, run_analyses
from smoe.eval.document import Block, Code, Figure, Heading, Paragraph, Table, Text, to_html, to_markdown
from smoe.eval.findings import Runs
from smoe.eval.layout import ANALYSIS_FILE, SUMMARY_FILE, read_learning_rates, run_dir
from smoe.eval.plots import fig_balance, fig_curves, fig_loads
from smoe.eval.power import PowerCheck, check
from smoe.eval.sample import sample_text
from smoe.eval.settings import CompareSettings
from smoe.eval.specialisation import specialisation
from smoe.eval.stats import ci_text, interval, spread_note
from smoe.eval.suite import MATCH_TOLERANCE, Suite, routed_gate_sum
from smoe.eval.upcycling import TwoPhase
from smoe.eval.verdict import Verdict, judge
from smoe.io.files import atomic_write_bytes, atomic_write_text, write_json
from smoe.train.loop import resolve_device


def write_report(out: Path, suite: str, spec: Suite, settings: CompareSettings,
                 matched: dict[str, dict[str, Any]], log=print) -> Path:
    out = Path(out)
    data = collect(out, spec.archs, settings.seeds)
    analyses = run_analyses(out, spec.archs, settings, log=log)
    ladder = collect(out, spec.ladder, settings.seeds) if spec.ladder else {}
    two_phase = None if spec.trunk is None else TwoPhase(spec.archs, collect(out, [spec.trunk], settings.seeds)[
        spec.trunk.label], settings)
    decoding = long_context.measure_suite(out, spec.archs, settings, str(resolve_device(settings.train.device)),
                                          log) if long_context.differs_in_layer_types(spec.archs) else None
    losses = {label: [f["val_loss"] for f in entry["final"]] for label, entry in data.items()}
    verdict = judge(spec.contrasts, losses, settings.target_gap)
    power = power_check(data, ladder, matched, verdict, settings)
    best = min(losses, key=lambda k: np.mean(losses[k]))
    sample = sample_text(run_dir(out, next(a for a in spec.archs if a.label == best), 0), settings, log)
    gates = {a.label: (routed_gate_sum(c), c.moe.routed_scaling_factor if c.moe else 1.0)
             for a in spec.archs for c in [a.config()]}
    doc = build_document(suite, spec, settings, matched, data, analyses, verdict, power, gates=gates,
                         learning_rates=read_learning_rates(out), two_phase=two_phase, decoding=decoding,
                         sample=(best, sample))
    write_json(out / ANALYSIS_FILE, analysis_json(analyses), indent=1)
    write_json(out / SUMMARY_FILE, summary_json(suite, data, verdict, power, gates, (best, sample)), indent=1)
    for block in doc:
        if isinstance(block, Figure):
            atomic_write_bytes(out / "plots" / f"{block.name}.png", block.png)
    atomic_write_text(out / "report.md", to_markdown(doc))
    return atomic_write_text(out / "report.html", to_html(doc, f"smoe head-to-head: {suite}"))


def power_check(data: dict[str, dict[str, Any]], ladder: dict[str, dict[str, Any]],
                matched: dict[str, dict[str, Any]], verdict: Verdict, settings: CompareSettings
                ) -> PowerCheck | None:
    """The power check over the suite's dense models and its ladder (None without a ladder)."""
    if not ladder:
        return None
    t = settings.train
    tokens = t.steps * t.batch_size * t.seq_len
    dense = {label: e for label, e in data.items() if not matched[label]["moe"]}
    rungs_data = {**dense, **ladder}
    rungs = ladder_rungs(rungs_data, tokens)
    moes = ladder_rungs({label: e for label, e in data.items() if label not in dense}, tokens)
    ordered = sorted(rungs, key=lambda label: np.mean([f for f, _ in rungs[label]]))
    end_curves = tuple([list(zip(*c, strict=True)) for c in rungs_data[label]["curves"]]
                       for label in (ordered[0], ordered[-1]))
    return check(rungs, moes, [p for _, p in verdict.contrasts], end_curves, t.steps,
                 next(iter(dense), None))


def build_document(suite: str, spec: Suite, settings: CompareSettings, matched: dict[str, dict[str, Any]],
                   data: dict[str, dict[str, Any]], analyses: Runs, verdict: Verdict,
                   power: PowerCheck | None, *, gates: dict[str, tuple[float | None, float]] | None = None,
                   learning_rates: dict[str, dict[str, Any]] | None = None, two_phase: TwoPhase | None = None,
                   decoding: dict[str, Any] | None = None, sample: tuple[str, str] | None = None) -> list[Block]:
    t = settings.train
    tokens = t.steps * t.batch_size * t.seq_len
    doc: list[Block] = [Heading(1, f"smoe head-to-head: {suite}"),
                        Paragraph(setup_line(suite, settings, data, two_phase is not None)),
                        Paragraph(matching_line(spec.matching, matched)),
                        Paragraph(data_line(data)),
                        Heading(2, "Power check")]
    if power is None:
        doc.append(Paragraph("No dense compute ladder in this suite: whether this regime can show a gap of the "
                             "contrasts' size is not checked (the built-in suites carry one)."))
    else:
        doc += power.blocks(tokens)
    doc += [Heading(2, "Verdict"), *verdict.blocks(),
            Heading(2, "Against the papers"), *verdict.paper_blocks(),
            Heading(2, "Results"), Paragraph(spread_note(settings.seeds)),
            results_table(data, matched, spec.matching, gates or {}, tokens),
            *routing_end_blocks(data),
            *learning_rate_blocks(learning_rates),
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
    if sample is not None:
        doc += [Heading(2, f"A sample from the best model ({sample[0]}, seed 0)"), Paragraph((Code(sample[1]),))]
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
             f"tokens per run), lr {t.lr} unless tuned (below), {precision}, {settings.seeds} seed(s). {same}"))


def data_line(data: dict[str, dict[str, Any]]) -> Text:
    """The tokenizer and validation set every run recorded (run.json's sha256s): one of each, or a warning."""
    seen = {(h.get("tokenizer_sha256"), h.get("validation_sha256")) for e in data.values() for h in e["hashes"]}
    if len(seen) == 1 and None not in next(iter(seen)):
        tok, val = next(iter(seen))
        return (f"Every run used one tokenizer (sha256 {tok[:16]}…) and was evaluated on one validation set "
                f"(sha256 {val[:16]}…), drawn from every source and the same for every seed and architecture.")
    return ("Warning: the runs do not all record the same tokenizer and validation set (run.json's "
            "tokenizer_sha256 and validation_sha256); their differences mix data with architecture.")


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


def results_table(data: dict[str, dict[str, Any]], matched: dict[str, dict[str, Any]], matching: str,
                  gates: dict[str, tuple[float | None, float]], tokens: int) -> Table:
    mfu = any(v is not None for e in data.values() for v in e.get("mfu") or [])
    rows = [("architecture", "val loss", "sd over seeds", "BPB", "params total", "active", "Δ matched",
             "tokens / param", "routed gate sum at init", "GFLOPs/token", "train tok/s", *(("MFU",) if mfu else ()),
             "peak mem")]
    for label, entry in data.items():
        s, m = entry["summaries"], matched[label]
        losses = [f["val_loss"] for f in entry["final"]]
        sd = interval(losses).sd
        peak = max(x["peak_device_bytes"] or x["peak_rss_bytes"] for x in s)
        delta = (f"{m.get('matched_vs_reference', m['active_vs_first']):+.1%}" if m.get("matched", True)
                 else "reference" if matching == "total" else "n/a")
        gate, scale = gates.get(label, (None, 1.0))
        rows.append((
            label, ci_text(losses), "n/a" if np.isnan(sd) else f"{sd:.4f}",
            ci_text([f["val_bpb"] for f in entry["final"]]),
            f"{m['total_params'] / 1e6:.2f}M", f"{m['active_params'] / 1e6:.2f}M", delta,
            f"{tokens / m['total_params']:.3g}",
            "n/a" if gate is None else f"{gate:.3f}" + (f" (× {scale:g})" if scale != 1 else ""),
            f"{m['flops_per_token'] / 1e9:.3g}", f"{np.median([x['tokens_per_s'] for x in s]):,.0f}",
            *((_mfu(entry.get("mfu")),) if mfu else ()), f"{peak / 2**20:,.0f} MiB"))
    return Table(tuple(rows))


def _mfu(per_seed: list[float | None] | None) -> str:
    """The median step's model FLOPs utilisation: training FLOPs per second over the device peak (the vendor's
    bf16 peak on known GPUs, or `peak_tflops`; none on a CPU)."""
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
        cells = [ci_text([e["load_cv"] for e in per_seed], 3), ci_text([e["max_mean"] for e in per_seed], 2)]
        if drops:
            cells += [ci_text([100 * e[key] for e in per_seed], 2) + "%" for key in ("dropped", "dropped_end")]
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
    seed = next(iter(learning_rates.values())).get("seed")
    rows = [("architecture", *(f"val loss at lr {lr}" for lr in tried), "chosen")]
    rows += [(label, *(f"{v['tried'][lr]:.4f}" for lr in tried), f"{v['chosen']:g}")
             for label, v in learning_rates.items()]
    on = f"seed {seed}, which no contrast uses" if seed is not None else "seed 0"
    return [Heading(3, "Learning rates"),
            Paragraph(f"Each architecture was trained once ({on}) at every rate; every seed then trained at the "
                      "rate with the lowest validation loss, so one shared rate does not decide the ranking."),
            Table(tuple(rows))]


def summary_json(suite: str, data: dict[str, dict[str, Any]], verdict: Verdict, power: PowerCheck | None,
                 gates: dict[str, tuple[float | None, float]], sample: tuple[str, str]) -> dict[str, Any]:
    """summary.json: what the report's verdict, power check and table rest on, as numbers."""
    archs = {}
    for label, entry in data.items():
        iv = interval([f["val_loss"] for f in entry["final"]])
        archs[label] = {"val_loss": [f["val_loss"] for f in entry["final"]], "mean": iv.mean,
                        "sd": None if np.isnan(iv.sd) else iv.sd, "val_bpb": [f["val_bpb"] for f in entry["final"]],
                        "routed_gate_sum_at_init": gates.get(label, (None, 1.0))[0],
                        "routed_scaling_factor": gates.get(label, (None, 1.0))[1],
                        "tokens_per_s": float(np.median([s["tokens_per_s"] for s in entry["summaries"]]))}
    hashes = sorted({(h.get("tokenizer_sha256"), h.get("validation_sha256")) for e in data.values()
                     for h in e["hashes"]}, key=str)
    return {"suite": suite, "architectures": archs, "verdict": verdict.to_json(),
            "power": power.to_json() if power is not None else None,
            "data": [{"tokenizer_sha256": t, "validation_sha256": v} for t, v in hashes],
            "sample": {"architecture": sample[0], "text": sample[1]}}
