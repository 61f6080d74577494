"""``consolidate``: a checkpoint of an expert-parallel run (one model and one optimizer file per EP rank, see
smoe.io.checkpoint) turned into the single-file layout a single process writes."""

from __future__ import annotations

import shutil
from pathlib import Path

from smoe.io.checkpoint import (
    MODEL_FILE,
    check_intact,
    is_complete,
    latest_checkpoint,
    read_tensors,
    resolve_checkpoint,
    write_manifest,
)
from smoe.io.files import atomic_directory
from smoe.io.safetensors import save_tensors


def sharded_checkpoint(path: str | Path) -> Path | None:
    """The per-EP-rank training checkpoint that ``path`` is, or (a run directory) holds as its latest; else None."""
    path = Path(path)
    if not is_complete(path):
        latest = latest_checkpoint(path) if path.is_dir() else None
        path = latest.path if latest is not None else path
    return path if is_complete(path) and not (path / MODEL_FILE).is_file() else None


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write checkpoint ``path`` (either layout; a run directory means its latest) to directory ``out`` in the
    single-file layout: ``model.safetensors``, ``optimizer.safetensors``, the JSON files and a fresh manifest.
    ``out`` must not exist or be empty; it appears only once complete. Returns ``out``."""
    path = check_intact(resolve_checkpoint(path))
    with atomic_directory(out) as tmp:
        for kind in ("model", "optimizer"):
            save_tensors(tmp / f"{kind}.safetensors", read_tensors(path, kind))
        for name in ("state.json", "config.json", "tokenizer.json"):
            if (path / name).is_file():
                shutil.copyfile(path / name, tmp / name)
        write_manifest(tmp)
    return Path(out)
