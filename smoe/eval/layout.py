"""How a suite lies on disk; compare writes it, collect and report read it.

    OUT/suite.json        the definition (suite_definition), its fingerprint, the matching table
    OUT/tokenizer.json    the one tokenizer every run uses, trained once on the suite's training data
    OUT/runs/<arch>/seed<k>/   one ``smoe train`` run directory per architecture and seed
    OUT/tune/<arch>/lr<rate>/  --tune-lr's runs, on TUNE_SEED
    OUT/lr.json           per architecture, the validation loss at each tried rate and the one chosen
    OUT/init/<arch>/seed<k>/   two-phase suites: the upcycled trunk checkpoint a branch starts from
    OUT/summary.json      the verdict as numbers (contrasts, power check, spread per architecture)
    OUT/analysis.json     the specialisation analyses of every seed, summarised over seeds
    OUT/report.md, report.html, plots/
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from smoe.eval.settings import CompareSettings
from smoe.eval.suite import Arch, Suite
from smoe.io.files import parse_json, read_json

SUITE_FILE = "suite.json"
TOKENIZER_FILE = "tokenizer.json"
LR_FILE = "lr.json"
SUMMARY_FILE = "summary.json"
ANALYSIS_FILE = "analysis.json"


def suite_definition(suite: str, spec: Suite, settings: CompareSettings) -> dict[str, Any]:
    """What makes runs comparable (CompareSettings.definition, the architectures, the matching and the
    pre-registered contrasts); suite.json records its fingerprint."""
    definition = {"suite": suite, **spec.definition(), "settings": settings.definition()}
    return definition


def fingerprint(definition: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(out: Path, arch: Arch, seed: int) -> Path:
    return out / "runs" / arch.label / f"seed{seed}"


def init_dir(out: Path, arch: Arch, seed: int) -> Path:
    """Where a two-phase suite writes the upcycled trunk checkpoint that ``arch``'s run of ``seed`` starts from."""
    return out / "init" / arch.label / f"seed{seed}"


def tune_dir(out: Path, arch: Arch, lr: float) -> Path:
    """Where ``--tune-lr`` trains ``arch`` at ``lr`` (on TUNE_SEED)."""
    return out / "tune" / arch.label / f"lr{lr:g}"


def read_learning_rates(out: Path) -> dict[str, dict[str, Any]] | None:
    """``lr.json`` of a suite that tuned its learning rates: {label: {"tried": {lr: val_loss}, "chosen": lr}}."""
    return read_json(out / LR_FILE) if (out / LR_FILE).is_file() else None


def read_summary(run: Path) -> dict[str, Any]:
    return read_json(run / "summary.json")


def finished(run: Path, steps: int) -> bool:
    return (run / "summary.json").is_file() and read_summary(run).get("step") == steps


def read_rows(run: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl. A last line without its newline is a row a killed run was still
    writing, and is skipped when it does not parse; any other bad line raises, naming ``file:line``."""
    path = run / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n")  # the last item is b"" when the file ends with its newline
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(parse_json(line, f"{path}:{number}"))
        except ValueError:
            if number == len(lines):
                break
            raise
    return rows
