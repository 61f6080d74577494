"""What a finished suite's report is made of: each run's curves, final metrics, balance and loads read back from
its files, and the specialisation analyses (smoe.eval.analysis) run on each architecture's seed-0 checkpoints.

Kept apart from suite.py, which compare needs before any run exists: this module loads models, checkpoints and
data, and only the report needs that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smoe.eval.analysis import analyze
from smoe.eval.suite import Arch, CompareSettings, read_rows, read_summary, run_dir
from smoe.io.checkpoint import list_checkpoints, load_model
from smoe.io.tokenizer import load_tokenizer
from smoe.train.data import prepare_data, val_sequences


def collect(out: Path, archs: list[Arch], seeds: int) -> dict[str, dict[str, Any]]:
    """Per architecture: eval curves per seed, final metrics per seed, balance curves and loads (seed 0)."""
    data = {}
    for arch in archs:
        entry: dict[str, Any] = {"curves": [], "final": [], "summaries": []}
        for seed in range(seeds):
            run = run_dir(out, arch, seed)
            rows = read_rows(run)
            evals = [r for r in rows if r["kind"] == "eval"]
            entry["curves"].append(([r["step"] for r in evals], [r["val_loss"] for r in evals]))
            entry["final"].append(evals[-1])
            entry["summaries"].append(read_summary(run))
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


def run_analyses(out: Path, archs: list[Arch], settings: CompareSettings, log=print) -> dict[str, dict[str, Any]]:
    """analysis.analyze on each architecture's seed-0 final checkpoint, over the validation set."""
    results = {}
    for arch in archs:
        run = run_dir(out, arch, 0)
        model, path = load_model(run)
        tokenizer = load_tokenizer(path / "tokenizer.json")
        t = settings.train
        prepared = prepare_data(settings.data.data, val_spec=settings.data.val_data,
                                tokenizer=path / "tokenizer.json", text_field=settings.data.text_field, seed=0)
        seqs, sources = val_sequences(prepared.val, t.seq_len, t.batch_size * t.eval_batches)
        batches = [(x[:, :-1], x[:, 1:]) for x in seqs.split(t.batch_size)]
        earlier = []
        for c in list_checkpoints(run)[:-1]:
            other, _ = load_model(c.path)
            earlier.append((c.step, other))
        if model.moe_layers:
            log(f"analysing {arch.label}")
            # source indices of val_sequences refer to the validation split, which --val-data may name differently
            results[arch.label] = analyze(model, batches, sources, prepared.val.source_names, tokenizer, earlier)
    return results
