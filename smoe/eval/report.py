"""The head-to-head report: ``report.md`` (plots as PNG files beside it) and a self-contained ``report.html``
(plots embedded), from the runs of a suite directory.

Sections: validation curves with mean ± std bands over seeds, the final table, balance over training, per-layer
expert load heatmaps, the specialisation analyses (smoe.eval.analysis) on each architecture's seed-0 run, and a
verdict that separates differences beyond seed noise from those within it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from smoe.eval.analysis import analyze, load_checkpoint_model
from smoe.io import checkpoint as ckpt

# DeepSeekMoE (arXiv 2401.06066) Table 1 validation losses at ~2B total parameters, for the ordering check.
PAPER_ORDER = {"dense": 2.060, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808}


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def collect(out: Path, archs, seeds: int) -> dict[str, dict[str, Any]]:
    """Per architecture: eval curves per seed, final metrics per seed, balance curves and loads (seed 0)."""
    from smoe.eval.compare import run_dir

    data = {}
    for arch in archs:
        entry: dict[str, Any] = {"curves": [], "final": [], "summaries": []}
        for seed in range(seeds):
            run = run_dir(out, arch, seed)
            rows = _rows(run)
            evals = [r for r in rows if r["kind"] == "eval"]
            entry["curves"].append(([r["step"] for r in evals], [r["val_loss"] for r in evals]))
            entry["final"].append(evals[-1])
            entry["summaries"].append(json.loads((run / "summary.json").read_text()))
            if seed == 0:
                train = [r for r in rows if r["kind"] == "train" and not r.get("skipped")]
                entry["balance"] = ([r["step"] for r in train],
                                    [np.mean([v["load_cv"] for v in r["router"].values()]) if r["router"] else 0.0
                                     for r in train])
                layers = sorted(train[-1]["router"], key=int) if train and train[-1]["router"] else []
                entry["loads"] = {layer: np.array([r["router"][layer]["load"] for r in train], dtype=np.float64)
                                  for layer in layers}
        data[arch.label] = entry
    return data


def run_analyses(out: Path, archs, settings, log=print) -> dict[str, dict[str, Any]]:
    """analysis.analyze on each architecture's seed-0 final checkpoint, over the validation set."""
    from smoe.eval.compare import run_dir
    from smoe.train.data import load_tokenizer, prepare_data, val_sequences

    results = {}
    for arch in archs:
        run = run_dir(out, arch, 0)
        model, path = load_checkpoint_model(run)
        tokenizer = load_tokenizer(path / "tokenizer.json")
        prepared = prepare_data(settings.data, val_spec=settings.val_data, tokenizer=path / "tokenizer.json",
                                seed=0)
        seqs, sources = val_sequences(prepared.val, settings.seq_len, settings.batch_size * settings.eval_batches)
        batches = [(t[:, :-1], t[:, 1:]) for t in seqs.split(settings.batch_size)]
        earlier = []
        for c in ckpt.list_checkpoints(run)[:-1]:
            other, _ = load_checkpoint_model(c.path)
            earlier.append((c.step, other))
        if model.moe_layers:
            log(f"analysing {arch.label}")
            # source indices of val_sequences refer to the validation split, which --val-data may name differently
            results[arch.label] = analyze(model, batches, sources, prepared.val.source_names, tokenizer, earlier)
    return results


# --- figures -----------------------------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return buf.getvalue()


def fig_curves(data) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, entry in data.items():
        steps = entry["curves"][0][0]
        n = min(len(c[1]) for c in entry["curves"])
        losses = np.array([c[1][:n] for c in entry["curves"]])
        mean = losses.mean(0)
        ax.plot(steps[:n], mean, label=label)
        if len(losses) > 1:
            std = losses.std(0, ddof=1)
            ax.fill_between(steps[:n], mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def fig_balance(data) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, entry in data.items():
        steps, cv = entry.get("balance", ([], []))
        if steps and any(cv):
            window = max(1, len(cv) // 30)
            smooth = np.convolve(cv, np.ones(window) / window, mode="valid")
            ax.plot(steps[len(steps) - len(smooth):], smooth, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("expert load CV (mean over layers)")
    ax.set_title("Load imbalance during training (0 = perfectly balanced)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def fig_loads(label: str, loads: dict[str, np.ndarray]) -> bytes:
    plt = _figure()
    n = len(loads)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
    for i, (ax, (layer, arr)) in enumerate(zip(axes[0], loads.items())):
        share = arr / np.maximum(arr.sum(1, keepdims=True), 1)
        im = ax.imshow(share.T, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(0.5, len(arr) + 0.5, arr.shape[1] - 0.5, -0.5))  # train rows are steps 1..N
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("step")
        if i == 0:
            ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of assignments")
    fig.suptitle(f"{label}: per-expert load over training")
    return _png(fig)


def fig_bars(title: str, ylabel: str, groups: dict[str, dict[str, float]], baseline: dict[str, float] | None = None
             ) -> bytes:
    plt = _figure()
    labels = list(groups)
    keys = sorted({k for g in groups.values() for k in g}, key=str)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(keys)) / 2), 3.5))
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        xs = np.arange(len(labels)) + i * width
        ax.bar(xs, [groups[lab].get(key, np.nan) for lab in labels], width, label=str(key))
    if baseline:
        for i, lab in enumerate(labels):
            if lab in baseline:
                ax.hlines(baseline[lab], i - 0.1, i + 0.8, colors="k", linestyles="dashed")
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
    ax.set_xticklabels(labels, rotation=20, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if len(keys) > 1:
        ax.legend(fontsize=7, title="layer" if all(k.isdigit() for k in keys) else None)
    return _png(fig)


def fig_affinity(analyses, sources: list[str]) -> bytes:
    """Domain affinity of every expert in each architecture's last MoE layer (1 = no preference)."""
    plt = _figure()
    n = len(analyses)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.2 + 0.9 * n * max(1, len(sources)) / 2), squeeze=False)
    for ax, (label, a) in zip(axes[:, 0], analyses.items()):
        last = max(a["layers"], key=int)
        aff = np.asarray(a["layers"][last]["domain_affinity"])
        im = ax.imshow(np.log2(np.maximum(aff, 1e-3)), aspect="auto", cmap="coolwarm", vmin=-2, vmax=2,
                       interpolation="nearest")
        ax.set_yticks(range(len(sources)))
        ax.set_yticklabels([Path(s).name or s for s in sources], fontsize=7)
        ax.set_title(f"{label}, layer {last}", fontsize=9)
    axes[-1, 0].set_xlabel("expert")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="log2 affinity")
    return _png(fig)


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


def write_report(out: Path, suite: str, archs, settings, matched: dict[str, dict[str, float]], log=print) -> Path:
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
    (out / "analysis.json").write_text(json.dumps(analyses, indent=1))
    md = _markdown(suite, settings, table, lines, figures, analyses)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for name, _, png in figures:
        (plots / f"{name}.png").write_bytes(png)
    (out / "report.md").write_text(md)
    html_path = out / "report.html"
    html_path.write_text(_html(suite, settings, table, lines, figures, analyses))
    return html_path


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _setup_line(suite: str, settings) -> str:
    return (f"Suite `{suite}` on `{settings.data}`" + (f" (validation `{settings.val_data}`)" if settings.val_data
                                                        else "") +
            f": {settings.steps} steps x {settings.batch_size} x {settings.seq_len} tokens "
            f"({settings.steps * settings.batch_size * settings.seq_len:,} tokens per run), lr {settings.lr}, "
            f"{settings.precision}, {settings.seeds} seed(s). Same data order, optimizer and schedule for all.")


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
