"""The head-to-head: train several architectures at matched activated parameters on identical data, then report.

Each run is a child ``smoe train`` process (its peak memory is its own, and a crash stays contained) writing to
``OUT/runs/<arch>/seed<k>``. Every architecture sees the same data order and token count for a given seed, with
the same optimizer and schedule. An interrupted suite resumes: finished runs are skipped, unfinished ones
continue from their last checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from smoe.errors import TrainingError
from smoe.eval.report import write_report
from smoe.eval.suite import (
    Arch,
    CompareSettings,
    check_matched,
    fingerprint,
    finished,
    read_summary,
    resolve_suite,
    run_dir,
    suite_definition,
)
from smoe.io.files import read_json, write_json

RUN_CONFIG_FILE = "run-config.json"  # the child's configs, written into its run directory before it starts


def _train_command(arch: Arch, settings: CompareSettings, seed: int, path: Path, resume: bool) -> list[str]:
    """Write the run's configs to ``path/run-config.json`` and return the ``smoe train --config`` that runs it."""
    config = path / RUN_CONFIG_FILE
    write_json(config, {"model_config": arch.config().to_dict(), "train_config": asdict(settings.run_config(seed)),
                        "data_config": asdict(settings.data)})
    cmd = [sys.executable, "-m", "smoe", "train", "--config", str(config), "--out", str(path), "--quiet"]
    return cmd + ["--resume"] if resume else cmd


def run_suite(suite: str | None, preset_list: str | None, settings: CompareSettings, out: str | Path,
              log=print, jobs: int = 1) -> Path:
    """Train every architecture x seed (skipping finished runs; ``jobs`` at a time), analyse, write the report;
    returns its path."""
    if jobs < 1:
        raise ValueError(f"jobs: must be a positive integer, got {jobs}")
    settings.validate()
    name, archs = resolve_suite(suite, preset_list)
    matched = check_matched(archs, settings.train.seq_len)
    out = Path(out)
    definition = suite_definition(name, archs, settings)
    suite_file = out / "suite.json"
    if suite_file.is_file():
        saved = read_json(suite_file)
        if saved.get("fingerprint") != fingerprint(definition):
            raise ValueError(f"out {out}: holds a suite with a different definition ({saved.get('suite')!r}, "
                             "other architectures or settings); choose another `out`")
    else:
        write_json(suite_file, {**definition, "fingerprint": fingerprint(definition), "matched": matched})

    pending = []
    for seed in range(settings.seeds):
        for arch in archs:
            path = run_dir(out, arch, seed)
            if finished(path, settings.train.steps):
                log(f"{arch.label} seed {seed}: done earlier")
            else:
                pending.append((arch, seed, path))
    running: list[tuple[subprocess.Popen, Arch, int, Path, float]] = []
    while pending or running:
        while pending and len(running) < jobs:
            arch, seed, path = pending.pop(0)
            resume = (path / "run.json").is_file()
            log(f"{arch.label} seed {seed}: training {settings.train.steps} steps{' (resuming)' if resume else ''}")
            path.mkdir(parents=True, exist_ok=True)
            with open(path / "train.log", "w") as stderr:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(_train_command(arch, settings, seed, path, resume), stdout=subprocess.DEVNULL,
                                        stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            running.append((proc, arch, seed, path, time.time()))
        time.sleep(0.2)
        for item in [r for r in running if r[0].poll() is not None]:
            running.remove(item)
            proc, arch, seed, path, start = item
            if proc.returncode != 0:
                for other in running:
                    other[0].kill()
                tail = (path / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise TrainingError(f"{arch.label} seed {seed} failed: {tail[0]} (log: {path / 'train.log'})")
            summary = read_summary(path)
            log(f"{arch.label} seed {seed}: val loss {summary['final_eval']['val_loss']:.4f}, "
                f"{summary['tokens_per_s']:.0f} tok/s, {time.time() - start:.0f}s")

    return write_report(out, name, archs, settings, matched, log=log)
