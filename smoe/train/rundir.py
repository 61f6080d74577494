"""A run directory: what ``smoe train --out`` holds and the rules for writing into it.

    OUT/run.json        model, train and data config, data fingerprint (checked by --resume; a valid --config)
    OUT/metrics.jsonl   one JSON object per step and per evaluation
    OUT/summary.json    written at the last step
    OUT/checkpoints/    smoe.io.checkpoint's layout

A directory is only ever written into when it is empty, already a run (it holds run.json), or holds no more than
what ``smoe compare`` puts there before its child starts; anything else is refused before any work, so a user's
files are never touched. metrics.jsonl is cut back to the checkpoint on --resume, and started anew on a fresh run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable

from smoe.config import ModelConfig
from smoe.io.checkpoint import Checkpoint, latest_checkpoint, latest_intact, remove_incomplete
from smoe.io.files import atomic_write_text, check_writable, parse_json, read_json, write_json
from smoe.train.config import DataConfig, TrainConfig, from_dict

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"  # written when a run reaches its last step
LAUNCH_FILES = ("train.log", "run-config.json")  # what smoe compare writes into a run directory before training


def read_run_config(path: str | Path) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """The configs of a run config file (``smoe train --config``; a run's run.json is one): an object with
    ``model_config`` and optionally ``train_config`` and ``data_config``, each checked field by field."""
    path = Path(path)
    saved = read_json(path)
    if "model_config" not in saved:
        raise ValueError(f"{path}: no 'model_config' (a run config holds model_config, train_config, data_config)")
    try:
        model_config = ModelConfig.from_dict(saved["model_config"]).validate()
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{path}: model_config is not a smoe model config ({err})") from None
    except ValueError as err:
        raise ValueError(f"{path}: model_config: {err}") from None
    train_config = from_dict(TrainConfig, saved.get("train_config", {}), f"{path}: train_config")
    data_config = from_dict(DataConfig, saved.get("data_config", {}), f"{path}: data_config")
    return model_config, train_config, data_config


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def check(self, model_config: ModelConfig, train_config: TrainConfig, resume: bool,
              fingerprint: str | None = None) -> None:
        """Every check that needs no data, before any heavy work; writes nothing (the directory appears with the
        run's first file, in ``start``)."""
        out = check_writable(self.path, "out")
        if not out.exists():
            return
        run_file = out / RUN_FILE
        latest = latest_checkpoint(out)
        if not run_file.exists():
            foreign = sorted(p.name for p in out.iterdir() if p.name not in LAUNCH_FILES)
            if foreign:
                raise ValueError(f"out {out}: not empty and not a smoe run (no {RUN_FILE}; holds {foreign[0]!r}); "
                                 "choose another `out` (nothing there was changed)")
            return
        saved = read_json(run_file)
        try:
            saved_config = ModelConfig.from_dict(saved["model_config"])
            # a run recorded before document_boundaries existed let its documents flow into each other
            old = TrainConfig(**{"document_boundaries": "none", **saved["train_config"]})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{run_file}: unreadable ({err}); move it away or choose another `out`") from None
        if saved_config != model_config:
            raise ValueError(f"out {out}: holds a run of a different model config; choose another `out` "
                             "(nothing there was changed)")
        if not resume:
            if latest is not None:
                raise ValueError(f"out {out}: holds a run at step {latest.step}; pass `resume` to continue it "
                                 "or choose another `out`")
            return
        for f in fields(TrainConfig):
            if f.name not in TrainConfig.RESUMABLE_CHANGES and getattr(old, f.name) != getattr(train_config, f.name):
                raise ValueError(f"resume: {f.name} was {getattr(old, f.name)!r} in {out}, now "
                                 f"{getattr(train_config, f.name)!r}; an exact resume needs the same value")
        if fingerprint is not None and saved.get("data_fingerprint") != fingerprint:
            raise ValueError(f"resume: the data or tokenizer differ from the run in {out}")

    def start(self, model_config: ModelConfig, train_config: TrainConfig, data_config: DataConfig,
              fingerprint: str, resume: bool, log: Callable[[str], None],
              hashes: dict[str, str] | None = None) -> Checkpoint | None:
        """Check again (now with the data's fingerprint), record the run (with ``hashes``: the tokenizer's and the
        validation set's sha256), and return the checkpoint to resume from: the newest intact one, each newer
        damaged one reported through ``log`` and skipped."""
        self.check(model_config, train_config, resume, fingerprint)
        self.path.mkdir(parents=True, exist_ok=True)
        remove_incomplete(self.path)
        write_json(self.path / RUN_FILE, {"model_config": model_config.to_dict(), "train_config": asdict(train_config),
                                          "data_config": asdict(data_config), "data_fingerprint": fingerprint,
                                          **(hashes or {})})
        start = latest_intact(self.path, log) if resume else None
        if resume and start is None and latest_checkpoint(self.path) is not None:
            raise ValueError(f"resume: every checkpoint in {self.path} is damaged (see above); nothing to resume")
        self._reset_metrics(start.step if start is not None else 0)
        return start

    def _reset_metrics(self, step: int) -> None:
        """Keep the rows up to ``step`` (a resumed run's history reads as one uninterrupted run; a fresh run keeps
        none). A line torn by a kill is dropped."""
        if not self.metrics_file.exists():
            return
        kept = []
        if step > 0:
            for line in self.metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = parse_json(line, str(self.metrics_file))
                except ValueError:
                    continue
                if isinstance(row.get("step"), int) and row["step"] <= step:
                    kept.append(line)
        atomic_write_text(self.metrics_file, "".join(line + "\n" for line in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / SUMMARY_FILE, json.dumps(summary, indent=2))
