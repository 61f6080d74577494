"""The head-to-head report: ``report.md`` (plots as PNG files beside it) and a self-contained ``report.html``
(plots embedded), from the runs of a suite directory.

Sections: validation curves with mean ± std bands over seeds, the final table, balance over training, per-layer
expert load heatmaps, the specialisation analyses (smoe.eval.analysis) on each architecture's seed-0 run, and a
verdict that separates differences beyond seed noise from those within it. The data come from smoe.eval.collect
and the figures from smoe.eval.plots; this module assembles them and renders both files.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from smoe.eval.collect import collect, run_analyses
from smoe.eval.plots import fig_affinity, fig_balance, fig_bars, fig_curves, fig_loads
from smoe.eval.suite import Arch, CompareSettings
from smoe.io.files import atomic_write_bytes, atomic_write_text, write_json

# DeepSeekMoE (arXiv 2401.06066) Table 1 validation losses at ~2B total parameters, for the ordering check.
PAPER_ORDER = {"dense": 2.060, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808}


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


# --- verdict -----------------------------------------------------------------------------------------------------


def verdict(final: dict[str, tuple[float, float]], seeds: int) -> list[str]:
    """Plain sentences: the best architecture, and for each other one whether its gap exceeds seed noise
    (more than twice the standard error of the difference of means)."""
    ranked = sorted(final, key=lambda k: final[k][0])
    best = ranked[0]
    lines = [f"Lowest validation loss: **{best}** ({final[best][0]:.4f})."]
    if seeds < 2:
        lines.append("One seed per architecture: seed-to-seed noise is not measured, so no gap below can be "
                     "called significant. Rerun with `--seeds 3` to separate them.")
        for label in ranked[1:]:
            lines.append(f"- {label}: +{final[label][0] - final[best][0]:.4f} nats")
        return lines
    for label in ranked[1:]:
        gap = final[label][0] - final[best][0]
        se = math.sqrt((final[label][1] ** 2 + final[best][1] ** 2) / seeds)
        if gap > 2 * se:
            lines.append(f"- {label}: +{gap:.4f} nats, beyond seed noise (2 x s.e. = {2 * se:.4f}).")
        else:
            lines.append(f"- {label}: +{gap:.4f} nats, within seed noise (2 x s.e. = {2 * se:.4f}).")
    common = [k for k in PAPER_ORDER if k in final]
    if len(common) >= 2:
        ours = sorted(common, key=lambda k: final[k][0])
        paper = sorted(common, key=lambda k: PAPER_ORDER[k])
        agree = "agrees with" if ours == paper else "differs from"
        lines.append(f"Ordering of {', '.join(common)}: ours {' < '.join(ours)}; this {agree} DeepSeekMoE "
                     f"Table 1 ({' < '.join(paper)}).")
    return lines


# --- rendering ---------------------------------------------------------------------------------------------------


def write_report(out: Path, suite: str, archs: list[Arch], settings: CompareSettings,
                 matched: dict[str, dict[str, float]], log=print) -> Path:
    out = Path(out)
    data = collect(out, archs, settings.seeds)
    analyses = run_analyses(out, archs, settings, log=log)
    figures: list[tuple[str, str, bytes]] = [
        ("curves", "Validation loss", fig_curves(data)),
        ("balance", "Expert load balance", fig_balance(data)),
    ]
    for label, entry in data.items():
        if entry.get("loads"):
            figures.append((f"load-{label}", f"{label}: expert load heatmap", fig_loads(label, entry["loads"])))
    if analyses:
        consecutive = {lab: {k: v["consecutive"]["first"] for k, v in a["layers"].items()} for lab, a in
                       analyses.items()}
        uniform = {lab: next(iter(a["layers"].values()))["consecutive"]["first_uniform"] for lab, a in
                   analyses.items()}
        figures.append(("consecutive", "Consecutive tokens, same first-choice expert",
                        fig_bars("Same first-choice expert for consecutive tokens (dashed: random)", "rate",
                                 consecutive, uniform)))
        knock = {lab: a["knockout"] for lab, a in analyses.items() if a["knockout"]}
        if knock:
            figures.append(("knockout", "Expert knock-out",
                            fig_bars("Loss rise when experts are disabled", "Δ loss (nats)", knock)))
        with_affinity = {lab: a for lab, a in analyses.items()
                         if "domain_affinity" in next(iter(a["layers"].values()))}
        if with_affinity:
            sources = next(iter(with_affinity.values()))["sources"]
            figures.append(("affinity", "Domain affinity", fig_affinity(with_affinity, sources)))
        sat = {lab: a["saturation"] for lab, a in analyses.items() if a.get("saturation")}
        if sat:
            figures.append(("saturation", "Router saturation",
                            fig_bars("Share of final top-k choices already made at step", "saturation", sat)))

    final = {lab: _mean_std([f["val_loss"] for f in e["final"]]) for lab, e in data.items()}
    final_bpb = {lab: _mean_std([f["val_bpb"] for f in e["final"]]) for lab, e in data.items()}
    table = [["architecture", "val loss", "BPB", "params total", "active", "Δ active", "GFLOPs/token",
              "train tok/s", "peak mem"]]
    for label, entry in data.items():
        s = entry["summaries"]
        m = matched[label]
        peak = max(x["peak_device_bytes"] or x["peak_rss_bytes"] for x in s)
        table.append([
            label, _pm(*final[label]), _pm(*final_bpb[label]), f"{m['total_params'] / 1e6:.2f}M",
            f"{m['active_params'] / 1e6:.2f}M", f"{m['active_vs_first']:+.1%}", f"{m['flops_per_token'] / 1e9:.3f}",
            f"{np.median([x['tokens_per_s'] for x in s]):,.0f}", f"{peak / 2**20:,.0f} MiB",
        ])
    lines = verdict(final, settings.seeds)
    write_json(out / "analysis.json", analyses, indent=1)
    for name, _, png in figures:
        atomic_write_bytes(out / "plots" / f"{name}.png", png)
    atomic_write_text(out / "report.md", _markdown(suite, settings, table, lines, figures, analyses))
    return atomic_write_text(out / "report.html", _html(suite, settings, table, lines, figures, analyses))


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _setup_line(suite: str, settings: CompareSettings) -> str:
    t, d = settings.train, settings.data
    return (f"Suite `{suite}` on `{d.data}`" + (f" (validation `{d.val_data}`)" if d.val_data else "") +
            f": {t.steps} steps x {t.batch_size} x {t.seq_len} tokens "
            f"({t.steps * t.batch_size * t.seq_len:,} tokens per run), lr {t.lr}, "
            f"{t.precision}, {settings.seeds} seed(s). Same data order, optimizer and schedule for all.")


def _analysis_rows(analyses) -> list[list[str]]:
    rows = [["architecture", "layer", "same 1st expert", "random", "top-k overlap", "random", "dead", "top tokens "
             "of the busiest expert"]]
    for label, a in analyses.items():
        for layer, v in a["layers"].items():
            c = v["consecutive"]
            busiest = int(np.argmax(v["load"]))
            tokens = " ".join(f"`{t}`" for t, _ in v["top_tokens"][str(busiest)][:5])
            rows.append([label, layer, f"{c['first']:.3f}", f"{c['first_uniform']:.3f}", f"{c['any']:.3f}",
                         f"{c['any_uniform']:.3f}", str(v["dead"]), f"#{busiest}: {tokens}"])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r).replace("\n", " ") + " |" for r in rows[1:]]
    return "\n".join(out)


def _markdown(suite, settings, table, lines, figures, analyses) -> str:
    parts = [f"# smoe head-to-head: {suite}", "", _setup_line(suite, settings), "", "## Verdict", "", *lines, "",
             "## Results", "", _md_table(table), ""]
    for name, title, _ in figures:
        parts += [f"### {title}", "", f"![{title}](plots/{name}.png)", ""]
    if analyses:
        parts += ["## Specialisation (seed 0, validation set)", "", _md_table(_analysis_rows(analyses)), ""]
        knock = [["architecture", *sorted({k for a in analyses.values() for k in a["knockout"]})]]
        for label, a in analyses.items():
            knock.append([label, *(f"{a['knockout'].get(k, float('nan')):+.4f}" for k in knock[0][1:])])
        parts += ["Loss rise (nats) when the most-loaded routed experts of every layer, or all shared experts, "
                  "are disabled:", "", _md_table(knock), ""]
    return "\n".join(parts)


def _html(suite, settings, table, lines, figures, analyses) -> str:
    def tab(rows):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def para(text):
        text = html.escape(text.lstrip("- "))
        return "<p>" + text.replace("**", "") + "</p>"

    imgs = "".join(
        f"<h3>{html.escape(title)}</h3><img alt=\"{html.escape(title)}\" "
        f"src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">" for _, title, png in figures)
    analysis = tab(_analysis_rows(analyses)) if analyses else "<p>No MoE layers to analyse.</p>"
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
             "img{max-width:100%}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>smoe head-to-head: {html.escape(suite)}</title><style>{style}</style></head><body>"
            f"<h1>smoe head-to-head: {html.escape(suite)}</h1><p>{html.escape(_setup_line(suite, settings))}</p>"
            f"<h2>Verdict</h2>{''.join(para(x) for x in lines)}<h2>Results</h2>{tab(table)}{imgs}"
            f"<h2>Specialisation (seed 0, validation set)</h2>{analysis}</body></html>\n")
