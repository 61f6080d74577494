"""``consolidate``: a checkpoint of an expert-parallel run (one model and one optimizer file per EP rank, see
smoe.train.checkpoint) turned into the single-file layout a single process writes."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from smoe.train import checkpoint as ckpt


def sharded_checkpoint(path: str | Path) -> Path | None:
    """The per-EP-rank training checkpoint that ``path`` is, or (a run directory) holds as its latest; else None."""
    path = Path(path)
    if not ckpt.is_complete(path):
        latest = ckpt.latest_checkpoint(path) if path.is_dir() else None
        path = latest.path if latest is not None else path
    return path if ckpt.is_complete(path) and not (path / "model.safetensors").is_file() else None


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write checkpoint ``path`` (either layout; a run directory means its latest) to directory ``out`` in the
    single-file layout: ``model.safetensors``, ``optimizer.safetensors`` and the JSON files. Returns ``out``."""
    path = ckpt.resolve_checkpoint(path)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("model", "optimizer"):
        save_file({k: v.contiguous() for k, v in ckpt.read_tensors(path, kind).items()},
                  str(out / f"{kind}.safetensors"))
    for name in ("state.json", "config.json", "tokenizer.json"):
        if (path / name).is_file():
            shutil.copyfile(path / name, out / name)
    return out
