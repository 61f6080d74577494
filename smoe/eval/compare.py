"""The head-to-head: train several architectures at matched activated parameters on identical data, then report.

Each run is a child ``smoe train`` process (its peak memory is its own, and a crash stays contained) writing to
``OUT/runs/<arch>/seed<k>``. Every architecture sees the same data order and token count for a given seed, with
the same optimizer and schedule. An interrupted suite resumes: finished runs are skipped, unfinished ones
continue from their last checkpoint.

A two-phase suite (upcycling) trains its dense trunk first, once per seed; seed s's trunk then starts seed s's
branches (continued as it is, or upcycled by smoe.upcycling into ``OUT/init/<arch>/seed<k>``), which continue its
data order and learning-rate schedule from the step the trunk stopped at, while its from-scratch runs train the
trunk's steps and the branches' on the same schedule.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from smoe.errors import TrainingError
from smoe.eval.report import write_report
from smoe.eval.suite import (
    LR_FILE,
    Arch,
    CompareSettings,
    Suite,
    check_matched,
    fingerprint,
    finished,
    init_dir,
    read_summary,
    resolve_suite,
    run_dir,
    suite_definition,
    tune_dir,
)
from smoe.io.files import read_json, write_json
from smoe.train.config import TrainConfig
from smoe.train.data.spec import parse_spec
from smoe.upcycling.weights import upcycle_checkpoint

RUN_CONFIG_FILE = "run-config.json"  # the child's configs, written into its run directory before it starts


def _train_command(arch: Arch, config: TrainConfig, settings: CompareSettings, path: Path, resume: bool
                   ) -> list[str]:
    """Write the run's configs to ``path/run-config.json`` and return the ``smoe train --config`` that runs it."""
    file = path / RUN_CONFIG_FILE
    write_json(file, {"model_config": arch.config().to_dict(), "train_config": asdict(config),
                      "data_config": asdict(settings.data)})
    cmd = [sys.executable, "-m", "smoe", "train", "--config", str(file), "--out", str(path), "--quiet"]
    return cmd + ["--resume"] if resume else cmd


# One child run: what the log calls it, its architecture, its TrainConfig and its directory.
Job = tuple[str, Arch, TrainConfig, Path]


def _train_all(jobs: list[Job], settings: CompareSettings, parallel: int, log) -> None:
    """Train every job not finished earlier, ``parallel`` at a time; a failed child stops the others."""
    pending = []
    for job in jobs:
        if finished(job[3], job[2].steps):
            log(f"{job[0]}: done earlier")
        else:
            pending.append(job)
    running: list[tuple[subprocess.Popen, Job, float]] = []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            name, arch, config, path = job
            resume = (path / "run.json").is_file()
            log(f"{name}: training {config.steps} steps{' (resuming)' if resume else ''}")
            path.mkdir(parents=True, exist_ok=True)
            with open(path / "train.log", "w") as stderr:  # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(_train_command(arch, config, settings, path, resume),
                                        stdout=subprocess.DEVNULL, stderr=stderr, env=_child_env(parallel))
            running.append((proc, job, time.time()))
        time.sleep(0.2)
        for item in [r for r in running if r[0].poll() is not None]:
            running.remove(item)
            proc, (name, _, _, path), start = item
            if proc.returncode != 0:
                for other in running:
                    other[0].kill()
                tail = (path / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise TrainingError(f"{name} failed: {tail[0]} (log: {path / 'train.log'})")
            summary = read_summary(path)
            log(f"{name}: val loss {summary['final_eval']['val_loss']:.4f}, "
                f"{summary['tokens_per_s']:.0f} tok/s, {time.time() - start:.0f}s")


def _child_env(parallel: int) -> dict[str, str]:
    """The children share the CPU cores (unless OMP_NUM_THREADS says otherwise) instead of every process's OpenMP
    threads fighting for every core. Small models also train faster in total as separate single-threaded processes:
    two deepseekmoe runs side by side at one thread each made 1,387 tokens/s each, one run alone on both cores
    2,358 (docs/benchmarks.md)."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // parallel))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}


def _tune_learning_rates(out: Path, archs: list[Arch], settings: CompareSettings, parallel: int, log
                         ) -> dict[str, float]:
    """Train each architecture once (seed 0) at every ``tune_lr`` rate; the lowest final validation loss wins.
    Records the losses and the choice in lr.json; the winning run becomes the architecture's seed-0 run."""
    jobs = [(f"{arch.label} lr {lr:g}", arch, settings.run_config(0, lr), tune_dir(out, arch, lr))
            for arch in archs for lr in settings.tune_lr]
    _train_all(jobs, settings, parallel, log)
    table, chosen = {}, {}
    for arch in archs:
        tried = {lr: read_summary(tune_dir(out, arch, lr))["final_eval"]["val_loss"] for lr in settings.tune_lr}
        chosen[arch.label] = min(tried, key=tried.get)
        table[arch.label] = {"tried": {f"{lr:g}": loss for lr, loss in tried.items()}, "chosen": chosen[arch.label]}
        log(f"{arch.label}: learning rate {chosen[arch.label]:g} (validation loss "
            + ", ".join(f"{loss:.4f} at {lr:g}" for lr, loss in tried.items()) + ")")
        seed0 = run_dir(out, arch, 0)
        if not finished(seed0, settings.train.steps):  # the same config and seed: that run, not a second one
            shutil.rmtree(seed0, ignore_errors=True)
            shutil.copytree(tune_dir(out, arch, chosen[arch.label]), seed0)
            summary = read_summary(seed0)
            summary["checkpoint"] = str(seed0 / Path(summary["checkpoint"]).relative_to(
                tune_dir(out, arch, chosen[arch.label]).resolve()))
            write_json(seed0 / "summary.json", summary)
    write_json(out / LR_FILE, table)
    return chosen


def run_suite(suite: str | None, preset_list: str | None, settings: CompareSettings, out: str | Path,
              log=print, jobs: int = 1) -> Path:
    """Train every architecture x seed (skipping finished runs; ``jobs`` at a time), analyse, write the report;
    returns its path."""
    if jobs < 1:
        raise ValueError(f"jobs: must be a positive integer, got {jobs}")
    settings.validate()
    parse_spec(settings.data.data, "data")  # every file named exists and is readable, before any run starts
    if settings.data.val_data is not None:
        parse_spec(settings.data.val_data, "val_data")
    name, spec = resolve_suite(suite, preset_list)
    archs = spec.archs
    matched = check_matched(archs, settings.train.seq_len, spec.matching)
    for arch in [*spec.ladder, *([spec.trunk] if spec.trunk else [])]:  # built here too, so a bad one fails first
        check_matched([arch], settings.train.seq_len)
    if spec.trunk is None and settings.trunk_steps is not None:
        raise ValueError(f"trunk_steps: only with a two-phase suite (upcycling), not {name!r}")
    if spec.trunk is not None and settings.tune_lr:
        raise ValueError(f"tune_lr: not with the two-phase suite {name!r}, whose runs start from one trunk")
    out = Path(out)
    definition = suite_definition(name, spec, settings)
    suite_file = out / "suite.json"
    if suite_file.is_file():
        saved = read_json(suite_file)
        if saved.get("fingerprint") != fingerprint(definition):
            raise ValueError(f"out {out}: holds a suite with a different definition ({saved.get('suite')!r}, "
                             "other architectures or settings); choose another `out`")
    else:
        write_json(suite_file, {**definition, "fingerprint": fingerprint(definition), "matched": matched})

    if spec.trunk is not None:
        _train_two_phase(out, spec, settings, jobs, log)
    else:
        chosen = _tune_learning_rates(out, spec.runs(), settings, jobs, log) if settings.tune_lr else {}
        _train_all([(f"{arch.label} seed {seed}", arch, settings.run_config(seed, chosen.get(arch.label)),
                     run_dir(out, arch, seed)) for seed in range(settings.seeds) for arch in spec.runs()],
                   settings, jobs, log)
    return write_report(out, name, spec, settings, matched, log=log)


def _train_two_phase(out: Path, spec: Suite, settings: CompareSettings, parallel: int, log) -> None:
    """The trunk of every seed, then each seed's branches from its trunk's final checkpoint (upcycled here once,
    into init/) beside the from-scratch runs, which train as many steps as the trunk and a branch together."""
    start, seeds, total = settings.trunk_length, range(settings.seeds), settings.trunk_length + settings.train.steps
    # Every run follows one warmup + cosine schedule over trunk + branch steps: the trunk stops at its start, the
    # branches continue it (start_step), so the dense continuation is the uninterrupted dense run but for its
    # fresh optimizer state.
    _train_all([(f"trunk seed {seed}", spec.trunk, replace(settings.run_config(seed, steps=start),
                                                           schedule_steps=total),
                 run_dir(out, spec.trunk, seed)) for seed in seeds], settings, parallel, log)
    jobs: list[Job] = []
    for seed in seeds:
        for arch in spec.runs():
            if not arch.from_trunk:
                config = settings.run_config(seed, steps=total)
                jobs.append((f"{arch.label} seed {seed}", arch, config, run_dir(out, arch, seed)))
                continue
            origin = run_dir(out, spec.trunk, seed)
            if arch.upcycle is not None:
                origin, trunk = init_dir(out, arch, seed), origin
                if not origin.exists():  # written atomically: present means complete
                    log(f"{arch.label} seed {seed}: upcycling the trunk ({arch.upcycle.method})")
                    upcycle_checkpoint(trunk, origin, replace(arch.upcycle, seed=seed))
            config = replace(settings.run_config(seed), init_from=str(origin), start_step=start)
            jobs.append((f"{arch.label} seed {seed}", arch, config, run_dir(out, arch, seed)))
    _train_all(jobs, settings, parallel, log)
