"""The head-to-head: train a suite's architectures on identical data, seed by seed, then report.

Before any run: the design is checked (smoe.eval.suite.check_design), the suite's one tokenizer is trained on its
training data and its fixed validation set drawn (``prepare_suite_data``), so every run is evaluated on the same
token ids whatever its seed. Each run is then a child ``smoe train`` process (its peak memory is its own, and a
crash stays contained) writing to ``OUT/runs/<arch>/seed<k>``. Per seed, every architecture sees the same data order
and token count, with the same optimizer and schedule. An interrupted suite resumes: finished runs are skipped,
unfinished ones continue from their last checkpoint, and a finished run of another suite with the same
configuration, tokenizer and validation set (``reuse``) is linked instead of trained again.

A two-phase suite (upcycling) trains its dense trunk first, once per seed; seed s's trunk then starts seed s's
branches (continued as it is, or upcycled by smoe.upcycling into ``OUT/init/<arch>/seed<k>``), which continue its
data order and learning-rate schedule from the step the trunk stopped at, while its from-scratch runs train the
trunk's steps and the branches' on the same schedule.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from smoe.errors import TrainingError
from smoe.eval.layout import (
    LR_FILE,
    SUITE_FILE,
    TOKENIZER_FILE,
    fingerprint,
    finished,
    init_dir,
    read_summary,
    run_dir,
    suite_definition,
    tune_dir,
)
from smoe.eval.report import write_report
from smoe.eval.settings import SPLIT_SEED, TUNE_SEED, CompareSettings
from smoe.eval.stats import ALPHA, detectable
from smoe.eval.suite import Arch, Suite, check_design
from smoe.eval.suites import resolve_suite
from smoe.io.checkpoint import drop_optimizer, list_checkpoints
from smoe.io.files import atomic_write_text, read_json, write_json
from smoe.train.config import TrainConfig
from smoe.train.data import prepare_data, val_batches
from smoe.train.data.spec import parse_spec
from smoe.train.loop import with_resolved_precision
from smoe.train.run import data_hashes
from smoe.upcycling.weights import upcycle_checkpoint

RUN_CONFIG_FILE = "run-config.json"  # the child's configs, written into its run directory before it starts
DESIGN_SD = 0.05  # the sd of MoE − dense per-seed differences the gate-scale pilot measured (docs/results/pilot)


def run_suite(suite: str | None, preset_list: str | None, settings: CompareSettings, out: str | Path,
              log=print, jobs: int = 1, contrasts: str | None = None, reuse: tuple[str | Path, ...] = ()) -> Path:
    """Train every architecture x seed (skipping finished runs, linking identical finished runs of the suites in
    ``reuse``; ``jobs`` at a time), analyse, write the report; returns its path."""
    if jobs < 1:
        raise ValueError(f"jobs: must be a positive integer, got {jobs}")
    settings.validate()
    parse_spec(settings.data.data, "data")  # every file named exists and is readable, before any run starts
    if settings.data.val_data is not None:
        parse_spec(settings.data.val_data, "val_data")
    name, spec = resolve_suite(suite, preset_list, contrasts)
    matched = check_design(spec, settings.train.seq_len)
    if spec.trunk is None and settings.trunk_steps is not None:
        raise ValueError(f"trunk_steps: only with a two-phase suite (upcycling), not {name!r}")
    if spec.trunk is not None and settings.tune_lr:
        raise ValueError(f"tune_lr: not with the two-phase suite {name!r}, whose runs start from one trunk")
    reuse_dirs = [Path(r) for r in reuse]
    for r in reuse_dirs:
        if not (r / SUITE_FILE).is_file():
            raise ValueError(f"reuse {r}: not a suite directory (no {SUITE_FILE})")
    settings = replace(settings, seeds=settings.seeds or spec.seeds)
    out = Path(out)
    definition = suite_definition(name, spec, settings)
    suite_file = out / SUITE_FILE
    if suite_file.is_file():
        saved = read_json(suite_file)
        if saved.get("fingerprint") != fingerprint(definition):
            raise ValueError(f"out {out}: holds a suite with a different definition ({saved.get('suite')!r}, "
                             "other architectures, contrasts or settings); choose another `out`")
    else:
        write_json(suite_file, {**definition, "fingerprint": fingerprint(definition), "matched": matched})
    log(design_line(spec, settings.seeds))
    hashes = prepare_suite_data(out, spec, settings, log)
    trainer = _Trainer(out, settings, jobs, log, hashes, reuse_dirs)
    if spec.trunk is not None:
        trainer.two_phase(spec)
    else:
        rates = trainer.tune(spec.runs()) if settings.tune_lr else {a.label: a.lr for a in spec.runs()}
        trainer.train([(f"{arch.label} seed {seed}", arch, trainer.config(arch, seed, rates.get(arch.label)),
                        run_dir(out, arch, seed)) for seed in range(settings.seeds) for arch in spec.runs()])
    return write_report(out, name, spec, settings, matched, log=log)


def design_line(spec: Suite, seeds: int) -> str:
    """The design as the log states it before training: the contrasts Holm corrects over, the seeds, and the gap
    they detect at the spread the built-in designs assume."""
    m = len(spec.contrasts)
    lead = (f"{m} pre-registered contrast{'s' if m > 1 else ''} ({'; '.join(c.name for c in spec.contrasts)}), "
            f"Holm over them alone; {seeds} seed{'s' if seeds > 1 else ''}")
    if seeds < 2:
        return lead + ": no interval, nothing can be resolved"
    return (lead + f": at a spread of {DESIGN_SD} nats in the paired differences they detect "
                   f"{detectable(DESIGN_SD, seeds, ALPHA / m):.3f} nats (80% power)")


def prepare_suite_data(out: Path, spec: Suite, settings: CompareSettings, log) -> dict[str, str]:
    """Train the suite's tokenizer once (on its training split, the same for every seed; or copy the one
    `tokenizer` names) into ``OUT/tokenizer.json``, tokenize the data into the cache every run reads, and check
    that the fixed validation split holds ``val_tokens``. Returns the tokenizer's and the validation set's sha256,
    which every run's run.json must then show."""
    vocab = {a.config().vocab_size for a in [*spec.runs(), *([spec.trunk] if spec.trunk else [])]}
    if len(vocab) != 1:
        raise ValueError(f"suite: the architectures' vocab_size differ ({sorted(vocab)}); one tokenizer serves "
                         "every run of a suite")
    data = settings.run_data(None)
    file = out / TOKENIZER_FILE
    if not file.is_file():
        if settings.data.tokenizer is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(file, Path(settings.data.tokenizer).read_text(encoding="utf-8"))
        else:
            prepared = prepare_data(data.data, val_spec=data.val_data, vocab_size=vocab.pop(), seed=SPLIT_SEED,
                                    val_fraction=data.val_fraction, text_field=data.text_field, log=log)
            atomic_write_text(file, prepared.tokenizer.to_str())
    prepared = prepare_data(data.data, val_spec=data.val_data, tokenizer=file, seed=SPLIT_SEED,
                            val_fraction=data.val_fraction, text_field=data.text_field, log=log)
    t = settings.train
    need = max(settings.val_batches, t.eval_batches) * t.batch_size
    have = sum((len(tokens) - 1) // t.seq_len for tokens in prepared.val.tokens.values() if len(tokens))
    if have < need:
        raise ValueError(f"val_tokens {settings.val_tokens}: the validation split holds {have} sequences of "
                         f"{t.seq_len} tokens, fewer than the {need} of the fixed validation set; give more "
                         f"validation text (`val_data`, or a larger `val_fraction`) or lower `val_tokens`")
    hashes = data_hashes(prepared.tokenizer.to_str(), val_batches(prepared.val, t.seq_len, t.batch_size,
                                                                  need // t.batch_size))
    log(f"one tokenizer ({file}, sha256 {hashes['tokenizer_sha256'][:12]}) and one validation set ({need * t.seq_len:,}"
        f" tokens from every source, sha256 {hashes['validation_sha256'][:12]}) for every run")
    return hashes


# One child run: what the log calls it, its architecture, its TrainConfig and its directory.
Job = tuple[str, Arch, TrainConfig, Path]


class _Trainer:
    """Trains a suite's runs as child processes, ``parallel`` at a time."""

    def __init__(self, out: Path, settings: CompareSettings, parallel: int, log, hashes: dict[str, str],
                 reuse: list[Path]):
        self.out, self.settings, self.parallel, self.log, self.hashes = out, settings, parallel, log, hashes
        self.reuse = reuse
        self.data = settings.run_data(str((out / TOKENIZER_FILE).resolve()))

    def config(self, arch: Arch, seed: int, lr: float | None = None, steps: int | None = None) -> TrainConfig:
        return self.settings.run_config(seed, lr, steps, moe=arch.config().moe is not None)

    def train(self, jobs: list[Job]) -> None:
        """Train every job not finished earlier (or found finished in a reused suite); a failed child stops the
        others."""
        pending = []
        for job in jobs:
            if finished(job[3], job[2].steps):
                self.log(f"{job[0]}: done earlier")
            elif (origin := self._reusable(job)) is not None:
                _link_tree(origin, job[3])
                self.log(f"{job[0]}: reused {origin}")
            else:
                pending.append(job)
        running: list[tuple[subprocess.Popen, Job, float]] = []
        while pending or running:
            while pending and len(running) < self.parallel:
                job = pending.pop(0)
                name, arch, config, path = job
                resume = (path / "run.json").is_file()
                self.log(f"{name}: training {config.steps} steps{' (resuming)' if resume else ''}")
                path.mkdir(parents=True, exist_ok=True)
                with open(path / "train.log", "w") as stderr:  # the child keeps its own copy of the descriptor
                    proc = subprocess.Popen(self._command(arch, config, path, resume), stdout=subprocess.DEVNULL,
                                            stderr=stderr, env=_child_env(self.parallel))
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
                self._check_hashes(name, path)
                for checkpoint in list_checkpoints(path):  # the analyses read models only: keep no optimizer state
                    drop_optimizer(checkpoint.path)
                summary = read_summary(path)
                self.log(f"{name}: val loss {summary['final_eval']['val_loss']:.4f}, "
                         f"{summary['tokens_per_s']:.0f} tok/s, {time.time() - start:.0f}s")

    def _command(self, arch: Arch, config: TrainConfig, path: Path, resume: bool) -> list[str]:
        """Write the run's configs to ``path/run-config.json`` and return the ``smoe train --config`` that runs it."""
        file = path / RUN_CONFIG_FILE
        write_json(file, self._run_config(arch, config))
        cmd = [sys.executable, "-m", "smoe", "train", "--config", str(file), "--out", str(path), "--quiet"]
        return cmd + ["--resume"] if resume else cmd

    def _run_config(self, arch: Arch, config: TrainConfig) -> dict[str, Any]:
        return {"model_config": arch.config().to_dict(), "train_config": asdict(config),
                "data_config": asdict(self.data)}

    def _check_hashes(self, name: str, path: Path) -> None:
        saved = read_json(path / "run.json")
        for key, value in self.hashes.items():
            if saved.get(key) != value:
                raise TrainingError(f"{name}: its {key} is {saved.get(key)!r}, not the suite's {value!r} "
                                    f"({path / 'run.json'}); the runs were not evaluated on the same data")

    def _reusable(self, job: Job) -> Path | None:
        """A finished run (or --tune-lr run) of a reused suite with this job's model, training and data configs (but
        for where the tokenizer file lies), tokenizer and validation set."""
        name, arch, config, _ = job
        want = json.loads(json.dumps(self._run_config(arch, with_resolved_precision(config))))  # as run.json has it
        want["data_config"].pop("tokenizer")
        for suite in self.reuse:
            for candidate in sorted([*(suite / "runs").glob("*/seed*"), *(suite / "tune").glob("*/lr*")]):
                run = candidate / "run.json"
                if not (run.is_file() and finished(candidate, config.steps)):
                    continue
                saved = read_json(run)
                if any(saved.get(k) != v for k, v in self.hashes.items()):
                    continue
                have = {k: dict(saved[k]) for k in ("model_config", "train_config", "data_config")}
                have["data_config"].pop("tokenizer", None)
                if have == want:
                    return candidate
        return None

    def tune(self, archs: list[Arch]) -> dict[str, float]:
        """Train each architecture once on TUNE_SEED (no contrast uses it) at every ``tune_lr`` rate; the lowest
        final validation loss wins. Records the losses and the choice in lr.json."""
        rates = self.settings.tune_lr
        self.train([(f"{arch.label} lr {lr:g}", arch, self.config(arch, TUNE_SEED, lr), tune_dir(self.out, arch, lr))
                    for arch in archs for lr in rates])
        table, chosen = {}, {}
        for arch in archs:
            tried = {lr: read_summary(tune_dir(self.out, arch, lr))["final_eval"]["val_loss"] for lr in rates}
            chosen[arch.label] = min(tried, key=tried.get)
            table[arch.label] = {"tried": {f"{lr:g}": loss for lr, loss in tried.items()},
                                 "chosen": chosen[arch.label], "seed": TUNE_SEED}
            self.log(f"{arch.label}: learning rate {chosen[arch.label]:g} (validation loss "
                     + ", ".join(f"{loss:.4f} at {lr:g}" for lr, loss in tried.items()) + ")")
        write_json(self.out / LR_FILE, table)
        return chosen

    def two_phase(self, spec: Suite) -> None:
        """The trunk of every seed, then each seed's branches from its trunk's final checkpoint (upcycled here once,
        into init/) beside the from-scratch runs, which train as many steps as the trunk and a branch together."""
        out, settings = self.out, self.settings
        start, seeds = settings.trunk_length, range(settings.seeds)
        total = start + settings.train.steps
        # Every run follows one warmup + cosine schedule over trunk + branch steps: the trunk stops at its start,
        # the branches continue it (start_step), so the dense continuation is the uninterrupted dense run but for
        # its fresh optimizer state.
        self.train([(f"trunk seed {seed}", spec.trunk,
                     replace(self.config(spec.trunk, seed, steps=start), schedule_steps=total),
                     run_dir(out, spec.trunk, seed)) for seed in seeds])
        jobs: list[Job] = []
        for seed in seeds:
            for arch in spec.runs():
                if not arch.from_trunk:
                    jobs.append((f"{arch.label} seed {seed}", arch, self.config(arch, seed, steps=total),
                                 run_dir(out, arch, seed)))
                    continue
                origin = run_dir(out, spec.trunk, seed)
                if arch.upcycle is not None:
                    origin, trunk = init_dir(out, arch, seed), origin
                    if not origin.exists():  # written atomically: present means complete
                        self.log(f"{arch.label} seed {seed}: upcycling the trunk ({arch.upcycle.method})")
                        upcycle_checkpoint(trunk, origin, replace(arch.upcycle, seed=seed))
                config = replace(self.config(arch, seed), init_from=str(origin), start_step=start)
                jobs.append((f"{arch.label} seed {seed}", arch, config, run_dir(out, arch, seed)))
        self.train(jobs)


def _link_tree(origin: Path, target: Path) -> None:
    """``origin``'s files hard-linked (copied where links cannot be made) into a fresh ``target``, written under a
    temporary name and renamed, so an interruption never leaves half a run."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(origin, tmp, copy_function=_link_or_copy)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _child_env(parallel: int) -> dict[str, str]:
    """The children share the CPU cores (unless OMP_NUM_THREADS says otherwise) instead of every process's OpenMP
    threads fighting for every core. Small models also train faster in total as separate single-threaded processes:
    two deepseekmoe runs side by side at one thread each made 1,387 tokens/s each, one run alone on both cores
    2,358 (docs/benchmarks.md)."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // parallel))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}
