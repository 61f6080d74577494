"""What a finished suite's report is made of: each run's curves, final metrics, balance and loads read back from
its files, and the specialisation analyses (smoe.eval.analysis) run on every seed's checkpoints of each
architecture, summarised over seeds.

Kept apart from suite.py, which compare needs before any run exists: this module loads models, checkpoints and
data, and only the report needs that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smoe.eval.analysis import analyze
from smoe.eval.findings import Analysis
from smoe.eval.layout import read_rows, read_summary, run_dir
from smoe.eval.settings import SPLIT_SEED, CompareSettings
from smoe.eval.stats import interval
from smoe.eval.suite import Arch
from smoe.io.checkpoint import list_checkpoints, load_model
from smoe.io.files import read_json
from smoe.io.tokenizer import EOS, load_tokenizer
from smoe.train.data import prepare_data, val_sequences
from smoe.train.loop import document_arguments


def collect(out: Path, archs: list[Arch], seeds: int) -> dict[str, dict[str, Any]]:
    """Per architecture: eval curves (the final evaluation's point on the periodic evaluations' set, where it
    read a larger one), final metrics, summaries, the precision each run resolved (run.json records ``auto``
    already resolved), its data hashes, and the load-imbalance curve (``balance``: steps, one list per seed), per
    seed; the per-expert loads of seed 0 (expert identities differ between seeds, so loads are not pooled)."""
    data = {}
    for arch in archs:
        entry: dict[str, Any] = {"curves": [], "final": [], "summaries": [], "precision": [], "mfu": [],
                                 "balance": [], "routing_end": [], "hashes": []}
        for seed in range(seeds):
            run = run_dir(out, arch, seed)
            rows = read_rows(run)
            evals = [r for r in rows if r["kind"] == "eval"]
            entry["curves"].append(([r["step"] for r in evals],
                                    [r.get("val_loss_curve", r["val_loss"]) for r in evals]))
            entry["final"].append(evals[-1])
            entry["summaries"].append(read_summary(run))
            saved = read_json(run / "run.json")
            entry["precision"].append(saved["train_config"]["precision"])
            entry["hashes"].append({k: saved.get(k) for k in ("tokenizer_sha256", "validation_sha256")})
            mfu = [r["mfu"] for r in rows if r["kind"] == "train" and r.get("mfu") is not None]
            entry["mfu"].append(float(np.median(mfu)) if mfu else None)
            train = [r for r in rows if r["kind"] == "train" and not r.get("skipped")]
            entry["balance"].append(([r["step"] for r in train],
                                     [np.mean([v["load_cv"] for v in r["router"].values()]) if r["router"] else 0.0
                                      for r in train]))
            entry["routing_end"].append(routing_end(train))
            if seed == 0:
                layers = sorted(train[-1]["router"], key=int) if train and train[-1]["router"] else []
                entry["loads"] = {layer: np.array([r["router"][layer]["load"] for r in train], dtype=np.float64)
                                  for layer in layers}
        data[arch.label] = entry
    return data


def routing_end(train: list[dict[str, Any]]) -> dict[str, float] | None:
    """How the routers ended training, from the rows' router statistics (None for a model without them): over the
    last tenth of the steps, the load's coefficient of variation (mean over MoE layers) and the hottest expert's load
    over the mean (worst layer); the share of expert assignments a capacity limit dropped (mean over layers), over
    every step and over the last tenth."""
    rows = [r["router"] for r in train if r["router"]]
    if not rows:
        return None
    last = rows[-max(1, len(rows) // 10):]
    dropped = [np.mean([v.get("dropped_frac", 0.0) for v in r.values()]) for r in rows]
    return {"load_cv": float(np.mean([np.mean([v["load_cv"] for v in r.values()]) for r in last])),
            "max_mean": float(np.mean([max(v["max_mean"] for v in r.values()) for r in last])),
            "dropped": float(np.mean(dropped)), "dropped_end": float(np.mean(dropped[-len(last):]))}


def run_analyses(out: Path, archs: list[Arch], settings: CompareSettings, log=print) -> dict[str, list[Analysis]]:
    """analysis.analyze on every seed's final checkpoint of each MoE architecture (dense ones are skipped before
    their data and earlier checkpoints are loaded), each over the periodic evaluations' part of the suite's fixed
    validation set (the first `eval_batches` batches: every intervention is a pass over it). A list per
    architecture, seed by seed."""
    results: dict[str, list[Analysis]] = {}
    t = settings.train
    data = settings.run_data(None)
    for arch in archs:
        for seed in range(settings.seeds):
            run = run_dir(out, arch, seed)
            model, path = load_model(run)
            if not model.moe_layers:
                break
            log(f"analysing {arch.label} seed {seed}")
            tokenizer = load_tokenizer(path / "tokenizer.json")
            prepared = prepare_data(data.data, val_spec=data.val_data, tokenizer=path / "tokenizer.json",
                                    text_field=data.text_field, seed=SPLIT_SEED, val_fraction=data.val_fraction)
            seqs, sources = val_sequences(prepared.val, t.seq_len, t.batch_size * t.eval_batches)
            # the packed documents kept apart as the run trained and evaluated them
            boundaries = read_json(run / "run.json")["train_config"].get("document_boundaries", "none")
            eos = prepared.tokenizer.token_to_id(EOS)
            batches = [(x[:, :-1], x[:, 1:], document_arguments(x[:, :-1], eos, boundaries))
                       for x in seqs.split(t.batch_size)]
            earlier = [(c.step, load_model(c.path)[0]) for c in list_checkpoints(run, resumable=False)[:-1]]
            # source indices of val_sequences refer to the validation split, which --val-data may name differently
            results.setdefault(arch.label, []).append(
                analyze(model, batches, sources, prepared.val.source_names, tokenizer, earlier))
    return results


def _interval(values: list[float]) -> dict[str, Any]:
    iv = interval(values)
    spread = {"sd": iv.sd, "low": iv.low, "high": iv.high} if iv.n > 1 else {"sd": None, "low": None, "high": None}
    return {"mean": iv.mean, **spread, "level": iv.level, "n": iv.n, "values": list(values)}


def over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Every number of one architecture's analyses (their JSON) over seeds, at the same path as in one seed's:
    mean, sample sd, the 95% t interval of the mean (sd and bounds None with one seed) and the per-seed values.
    Layers, knock-out keys and saturation steps are the same in every seed's result (they follow from the
    architecture and the checkpoint schedule); a list of numbers (a load, a redundancy curve) summarises element by
    element. Top tokens and domain affinity are seed 0's alone: expert identities differ between seeds."""

    def walk(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, bool) or first is None or isinstance(first, str):
            return first
        if isinstance(first, (int, float)):
            return _interval([float(v) for v in values])
        if isinstance(first, dict):
            return {k: walk([v[k] for v in values]) for k in first if k not in SEED_ZERO_ONLY
                    and all(k in v for v in values)}
        if isinstance(first, list) and first and all(len(v) == len(first) for v in values):
            return [walk([v[i] for v in values]) for i in range(len(first))]
        return first

    return {"seeds": len(per_seed), **walk(per_seed)}


SEED_ZERO_ONLY = ("top_tokens", "domain_affinity", "sources", "top_pair")


def analysis_json(analyses: dict[str, list[Analysis]]) -> dict[str, dict[str, Any]]:
    """What analysis.json holds per architecture: seed 0's findings (Analysis.to_json), the other seeds' under
    ``other_seeds`` (keyed by seed), and ``over_seeds`` (see over_seeds)."""
    result = {}
    for label, runs in analyses.items():
        per_seed = [r.to_json() for r in runs]
        result[label] = {**per_seed[0], "other_seeds": {str(s): r for s, r in enumerate(per_seed) if s},
                         "over_seeds": over_seeds(per_seed)}
    return result


def ladder_rungs(data: dict[str, dict[str, Any]], tokens: int) -> dict[str, list[tuple[float, float]]]:
    """Per dense architecture (the suite's and its ladder's, as collect() returns them): (training FLOPs, final
    validation loss) per seed."""
    return {label: [(s["train_flops_per_token"] * tokens, f["val_loss"])
                    for s, f in zip(e["summaries"], e["final"], strict=True)]
            for label, e in data.items()}
