"""The head-to-head: train several architectures at matched activated parameters on identical data, then report.

Each run is a child ``smoe train`` process (its peak memory is its own, and a crash stays contained) writing to
``OUT/runs/<arch>/seed<k>``. Every architecture sees the same data order and token count for a given seed, with
the same optimizer and schedule. An interrupted suite resumes: finished runs are skipped, unfinished ones
continue from their last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smoe import presets
from smoe.accounting import account
from smoe.config import ModelConfig, override
from smoe.errors import TrainingError

MATCH_TOLERANCE = 0.05  # activated parameters may differ by at most 5% from the suite's first architecture


@dataclass(frozen=True)
class Arch:
    label: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self) -> ModelConfig:
        return override(presets.get(self.preset), self.overrides) if self.overrides else presets.get(self.preset)


def _fine(n_experts: int, k: int, width: int, **extra) -> dict[str, Any]:
    return {"moe.n_routed_experts": n_experts, "moe.top_k": k, "moe.expert_dim": width, **extra}


# Each suite holds the activated FFN width at the dense model's 1024 hidden units (see smoe/presets/ablation.py).
SUITES: dict[str, list[Arch]] = {
    "seeds-debate": [Arch(n, n) for n in
                     ("dense", "switch", "gshard", "mixtral-style", "deepseekmoe", "deepseek-v3-style")],
    "granularity": [
        Arch("E8-k1", "mixtral-style", _fine(8, 1, 1024)),
        Arch("E16-k2", "mixtral-style", _fine(16, 2, 512)),
        Arch("E32-k4", "mixtral-style", _fine(32, 4, 256)),
        Arch("E64-k8", "mixtral-style", _fine(64, 8, 128)),
    ],
    "shared": [
        Arch("shared-0", "deepseekmoe", _fine(64, 8, 128, **{"moe.n_shared_experts": 0})),
        Arch("shared-1", "deepseekmoe", _fine(64, 7, 128, **{"moe.n_shared_experts": 1})),
        Arch("shared-2", "deepseekmoe", _fine(64, 6, 128, **{"moe.n_shared_experts": 2})),
        Arch("shared-4", "deepseekmoe", _fine(64, 4, 128, **{"moe.n_shared_experts": 4})),
    ],
    "balance": [
        Arch("aux-0.01", "deepseek-v3-style", {"moe.balance": "aux", "moe.aux_loss_coef": 0.01}),
        Arch("seq-aux", "deepseek-v3-style", {"moe.balance": "seq_aux", "moe.seq_aux_loss_coef": 1e-3}),
        Arch("aux-free", "deepseek-v3-style", {"moe.balance": "aux_free", "moe.seq_aux_loss_coef": 0.0}),
        Arch("none", "deepseek-v3-style", {"moe.balance": "none"}),
    ],
    "capacity": [
        Arch("cf-1.0", "gshard", {"moe.capacity_factor": 1.0}),
        Arch("cf-1.25", "gshard", {"moe.capacity_factor": 1.25}),
        Arch("dropless", "gshard", {"moe.capacity_factor": None}),
    ],
}


@dataclass(frozen=True)
class CompareSettings:
    data: str = "stdlib"
    val_data: str | None = None
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    seeds: int = 1
    eval_every: int = 25
    eval_batches: int = 8
    precision: str = "auto"  # resolved by each run (smoe.train.loop.resolve_precision)
    device: str = "auto"
    checkpoints: int = 4  # saved through training, for the router-saturation analysis

    def validate(self) -> "CompareSettings":
        for name in ("steps", "batch_size", "seq_len", "seeds", "eval_every", "eval_batches", "checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be a positive integer, got {getattr(self, name)}")
        return self


def resolve_suite(suite: str | None, preset_list: str | None) -> tuple[str, list[Arch]]:
    if (suite is None) == (preset_list is None):
        raise ValueError("compare: give --suite NAME or --presets a,b,c (exactly one)")
    if suite is not None:
        if suite not in SUITES:
            raise ValueError(f"--suite: unknown suite {suite!r}; known: {', '.join(SUITES)}")
        return suite, SUITES[suite]
    names = [n.strip() for n in preset_list.split(",") if n.strip()]
    if len(names) < 2:
        raise ValueError("--presets: name at least two presets to compare")
    return "custom", [Arch(n, n) for n in names]


def check_matched(archs: list[Arch], seq_len: int) -> dict[str, dict[str, float]]:
    """Activated parameters and FLOPs per token of each architecture; raises if any is more than 5% off the
    first. Building every config here also rejects unknown presets and bad overrides before any training."""
    table = {}
    for arch in archs:
        try:
            acc = account(arch.config(), seq_len=seq_len)
        except ValueError as err:
            raise ValueError(f"suite architecture {arch.label!r}: {err}") from None
        table[arch.label] = {"active_params": acc.active_params, "total_params": acc.total_params,
                             "flops_per_token": acc.forward_flops_per_token}
    ref_label = archs[0].label
    ref = table[ref_label]["active_params"]
    for label, row in table.items():
        row["active_vs_first"] = row["active_params"] / ref - 1
        if abs(row["active_vs_first"]) > MATCH_TOLERANCE:
            raise ValueError(f"suite architecture {label!r}: {row['active_params']:,} activated parameters, "
                             f"{row['active_vs_first']:+.1%} from {ref_label!r} ({ref:,}); they must match within "
                             f"{MATCH_TOLERANCE:.0%}")
    return table


def _definition(suite: str, archs: list[Arch], settings: CompareSettings) -> dict[str, Any]:
    """What makes runs comparable. The number of seeds is left out on purpose: rerunning with more seeds reuses
    the finished ones."""
    kept = {k: v for k, v in asdict(settings).items() if k != "seeds"}
    return {"suite": suite, "archs": [asdict(a) for a in archs], "settings": kept}


def _fingerprint(definition: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(out: Path, arch: Arch, seed: int) -> Path:
    return out / "runs" / arch.label / f"seed{seed}"


def _finished(path: Path, steps: int) -> bool:
    summary = path / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("step") == steps


def _train_command(arch: Arch, settings: CompareSettings, seed: int, path: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "smoe", "train", "--preset", arch.preset, "--out", str(path), "--quiet",
           "--data", settings.data, "--steps", str(settings.steps), "--batch-size", str(settings.batch_size),
           "--seq-len", str(settings.seq_len), "--lr", str(settings.lr), "--seed", str(seed),
           "--eval-every", str(settings.eval_every), "--eval-batches", str(settings.eval_batches),
           "--precision", settings.precision, "--device", settings.device,
           "--save-every", str(max(1, settings.steps // settings.checkpoints)),
           "--keep-last", str(settings.checkpoints + 1)]
    if settings.val_data:
        cmd += ["--val-data", settings.val_data]
    for key, value in arch.overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    if resume:
        cmd.append("--resume")
    return cmd


def run_suite(suite: str | None, preset_list: str | None, settings: CompareSettings, out: str | Path,
              log=print, jobs: int = 1) -> Path:
    """Train every architecture x seed (skipping finished runs; ``jobs`` at a time), analyse, write the report;
    returns its path."""
    if jobs < 1:
        raise ValueError(f"--jobs: must be a positive integer, got {jobs}")
    settings.validate()
    name, archs = resolve_suite(suite, preset_list)
    matched = check_matched(archs, settings.seq_len)
    out = Path(out)
    definition = _definition(name, archs, settings)
    suite_file = out / "suite.json"
    if suite_file.is_file():
        saved = json.loads(suite_file.read_text())
        if saved.get("fingerprint") != _fingerprint(definition):
            raise ValueError(f"--out {out}: holds a suite with a different definition ({saved.get('suite')!r}, "
                             "other architectures or settings); choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        suite_file.write_text(json.dumps({**definition, "fingerprint": _fingerprint(definition),
                                          "matched": matched}, indent=2))

    pending = []
    for seed in range(settings.seeds):
        for arch in archs:
            path = run_dir(out, arch, seed)
            if _finished(path, settings.steps):
                log(f"{arch.label} seed {seed}: done earlier")
            else:
                pending.append((arch, seed, path))
    running: list[tuple[subprocess.Popen, Arch, int, Path, float]] = []
    while pending or running:
        while pending and len(running) < jobs:
            arch, seed, path = pending.pop(0)
            resume = (path / "run.json").is_file()
            log(f"{arch.label} seed {seed}: training {settings.steps} steps{' (resuming)' if resume else ''}")
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
            summary = json.loads((path / "summary.json").read_text())
            log(f"{arch.label} seed {seed}: val loss {summary['final_eval']['val_loss']:.4f}, "
                f"{summary['tokens_per_s']:.0f} tok/s, {time.time() - start:.0f}s")

    from smoe.eval.report import write_report

    return write_report(out, name, archs, settings, matched, log=log)
