"""The head-to-head's figures, each rendered to PNG bytes: the one place matplotlib is imported (lazily, with the
Agg backend, so nothing needs a display and importing smoe stays light)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from smoe.eval.stats import band


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


def curves_title(seeds: int) -> str:
    if seeds < 2:
        return "Validation loss (one seed: no band)"
    return f"Validation loss: mean over {seeds} seeds, band = 95% t-interval of the mean"


def fig_curves(data, xlabel: str = "step") -> bytes:
    """Each entry's validation curve (``curves``: per seed, x and loss), the mean over seeds with its t band."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, entry in data.items():
        steps = entry["curves"][0][0]
        n = min(len(c[1]) for c in entry["curves"])
        losses = np.array([c[1][:n] for c in entry["curves"]])
        ax.plot(steps[:n], losses.mean(0), label=label)
        if len(losses) > 1:
            ax.fill_between(steps[:n], *band(losses), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(curves_title(min(len(e["curves"]) for e in data.values())))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def fig_balance(data) -> bytes:
    """Each architecture's load CV over training (a running mean over 1/30 of the run): the mean over seeds on
    the steps every seed trained (none skipped), with the t band of the mean over seeds."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    seeds = 0
    for label, entry in data.items():
        runs = [dict(zip(steps, cv, strict=True)) for steps, cv in entry["balance"]]
        steps = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
        cv_SN = np.array([[r[s] for s in steps] for r in runs])
        if not steps or not cv_SN.any():  # a dense model has no load
            continue
        window = max(1, len(steps) // 30)
        smooth_SN = np.array([np.convolve(cv, np.ones(window) / window, mode="valid") for cv in cv_SN])
        x = steps[len(steps) - smooth_SN.shape[1]:]
        ax.plot(x, smooth_SN.mean(0), label=label)
        if len(smooth_SN) > 1:
            ax.fill_between(x, *band(smooth_SN), alpha=0.2)
        seeds = len(smooth_SN)
    ax.set_xlabel("step")
    ax.set_ylabel("expert load CV (mean over layers)")
    ax.set_title("Load imbalance during training (0 = balanced)"
                 + (f": mean over {seeds} seeds, 95% t band" if seeds > 1 else ""))
    ax.grid(alpha=0.3)
    if ax.lines:  # a suite of dense models has no load to plot
        ax.legend(fontsize=8)
    return _png(fig)


def fig_loads(label: str, loads: dict[str, np.ndarray]) -> bytes:
    plt = _figure()
    n = len(loads)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
    for i, (ax, (layer, arr)) in enumerate(zip(axes[0], loads.items(), strict=True)):
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


def fig_bars(title: str, ylabel: str, groups: dict[str, dict[str, float]], baseline: dict[str, float] | None = None,
             legend: str | None = None, errors: dict[str, dict[str, float]] | None = None) -> bytes:
    """One group of bars per architecture, one bar per key (layer, step, knock-out), titled ``legend`` in the
    legend; ``errors`` (same shape as ``groups``) draws symmetric error bars, ``baseline`` a dashed line per
    group."""
    plt = _figure()
    labels = list(groups)
    keys = sorted({k for g in groups.values() for k in g}, key=lambda k: (0, int(k), "") if k.isdigit() else (1, 0, k))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(keys)) / 2), 3.5))
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        xs = np.arange(len(labels)) + i * width
        yerr = [errors[lab].get(key, np.nan) for lab in labels] if errors else None
        ax.bar(xs, [groups[lab].get(key, np.nan) for lab in labels], width, label=str(key), yerr=yerr, capsize=2)
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
        ax.legend(fontsize=7, title=legend)
    return _png(fig)


def fig_affinity(analyses, sources: list[str]) -> bytes:
    """Domain affinity of every expert in each architecture's last MoE layer (1 = no preference)."""
    plt = _figure()
    n = len(analyses)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.2 + 0.9 * n * max(1, len(sources)) / 2), squeeze=False)
    for ax, (label, a) in zip(axes[:, 0], analyses.items(), strict=True):
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


def fig_redundancy(curves: dict[str, tuple[list[float], list[float], list[float]]], seeds: int) -> bytes:
    """DeepSeekMoE Fig. 4: loss rise against the share of each token's top-scored routed experts disabled;
    ``curves``: label -> (ratios, mean rise, half-width of its interval)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (ratios, rise, half) in curves.items():
        ax.errorbar(ratios, rise, yerr=half if seeds > 1 else None, marker="o", capsize=2, label=label)
    ax.set_xlabel("share of each token's top-scored routed experts disabled")
    ax.set_ylabel("loss rise (nats)")
    ax.set_title("Redundancy" + (f" (error bars: 95% CI over {seeds} seeds)" if seeds > 1 else " (one seed)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def fig_ladder(rungs: dict[str, list[tuple[float, float]]], moes: dict[str, list[tuple[float, float]]]) -> bytes:
    """Validation loss against training FLOPs (log): the dense ladder's seed means joined by a line, every MoE's
    seed mean as a point."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    dense = sorted((np.mean([f for f, _ in v]), np.mean([x for _, x in v])) for v in rungs.values())
    ax.plot([f for f, _ in dense], [x for _, x in dense], "k-o", label="dense ladder")
    for label, points in moes.items():
        ax.plot(np.mean([f for f, _ in points]), np.mean([x for _, x in points]), "o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Loss against training compute (seed means)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _png(fig)
