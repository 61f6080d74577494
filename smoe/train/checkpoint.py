"""Atomic checkpoints: one directory per saved step, written to a temporary name, fsynced, then renamed.

    OUT/checkpoints/step_00000200/
        model.safetensors       weights and persistent buffers (e.g. the aux-free expert bias)
        optimizer.safetensors   optimizer tensors (AdamW moments and step counts)
        state.json              optimizer hyper-parameters, step, RNG states, counters, data fingerprint
        config.json             the ModelConfig
        tokenizer.json          when training used one

A directory without every file above (a crash mid-write leaves only a ``.tmp-*`` directory, which is ignored and
removed) is not a training checkpoint. A *model* checkpoint (``smoe convert`` writes them) has only
``model.safetensors`` and ``config.json`` (and ``tokenizer.json``): enough to evaluate, analyse and generate, not to
resume. Nothing here unpickles: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from smoe.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"
REQUIRED = ("model.safetensors", "optimizer.safetensors", "state.json", "config.json")
MODEL_FILES = ("model.safetensors", "config.json")
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def list_checkpoints(out_dir: str | Path) -> list[Checkpoint]:
    """Complete checkpoints under ``out_dir``, oldest first."""
    root = Path(out_dir) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and all((child / f).is_file() for f in REQUIRED):
                found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(out_dir: str | Path) -> Checkpoint | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A (training or model) checkpoint directory, or a run directory (its latest checkpoint). Raises naming the
    path otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if all((path / f).is_file() for f in MODEL_FILES):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path}: not a checkpoint (missing one of {', '.join(MODEL_FILES)}) and holds none")
    return latest.path


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ModelConfig,
    state: dict[str, Any],
    tokenizer_json: str | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint atomically and prune all but the newest ``keep_last``. Returns its directory."""
    root = Path(out_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(_model_tensors(model), str(tmp / "model.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = capture_rng()
    _write_text(tmp / "state.json", json.dumps({"step": step, "optimizer": opt_meta, "rng": rng, **state}))
    _write_text(tmp / "config.json", config.to_json())
    if tokenizer_json is not None:
        _write_text(tmp / "tokenizer.json", tokenizer_json)
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # re-saving a step after a resume: replace it only once the new one is complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    if keep_last is not None:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def remove_incomplete(out_dir: str | Path) -> None:
    root = Path(out_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for child in root.glob(".tmp-step_*"):
            shutil.rmtree(child, ignore_errors=True)


def load_model_state(path: str | Path, model: torch.nn.Module) -> None:
    """Load weights and persistent buffers; raises naming the file on a missing or unexpected key."""
    file = Path(path) / "model.safetensors"
    tensors = load_file(str(file))
    expected = _model_tensors(model)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{file}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{file}: {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=True)


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer and RNG states; returns state.json (step, counters, ...)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    restore_rng(state["rng"])
    return state


def load_config(path: str | Path) -> ModelConfig:
    file = Path(path) / "config.json"
    try:
        return ModelConfig.from_json(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: cannot read the model config ({err})") from None


# --- helpers -----------------------------------------------------------------------------------------------------


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def capture_rng() -> dict[str, Any]:
    rng = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
