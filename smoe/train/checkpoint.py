"""Atomic checkpoints: one directory per saved step, written to a temporary name, fsynced, then renamed.

    OUT/checkpoints/step_00000200/
        model.safetensors       weights and persistent buffers (e.g. the aux-free expert bias)
        optimizer.safetensors   optimizer tensors (AdamW moments and step counts)
        state.json              optimizer hyper-parameters, step, RNG states, counters, data fingerprint
        config.json             the ModelConfig
        tokenizer.json          when training used one

A run with expert parallelism (smoe.parallel.checkpoint) writes, instead of the two tensor files, one pair per EP
rank that together hold every tensor once, under its global name:

        model-ep{r}-of-{n}.safetensors       EP rank r's rows of each expert tensor (+ every other tensor when r = 0)
        optimizer-ep{r}-of-{n}.safetensors   the same split of the optimizer tensors

Each file's metadata ``shards`` maps a sliced tensor to its ``[start, stop, total]`` rows along dim 0. Readers
reassemble whole tensors from either layout and slice them for the model they load into, so a checkpoint reloads
at any EP size (or none) with identical weights.

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
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import DeviceMesh

from smoe.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"
REQUIRED = ("model.safetensors", "optimizer.safetensors", "state.json", "config.json")
MODEL_FILES = ("model.safetensors", "config.json")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SHARD_FILE = re.compile(r"^model-ep(\d+)-of-(\d+)\.safetensors$")

# name -> (start, stop, total): the rows along dim 0 of a tensor that one rank holds a slice of.
ShardRanges = dict[str, tuple[int, int, int]]


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
            if match and child.is_dir() and is_complete(child):
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
    if is_complete(path) or all((path / f).is_file() for f in MODEL_FILES):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path}: not a checkpoint (missing one of {', '.join(MODEL_FILES)}) and holds none")
    return latest.path


def is_complete(path: Path) -> bool:
    """Every file of a checkpoint is there, in the single-file or the per-EP-rank layout."""
    if not all((path / f).is_file() for f in ("state.json", "config.json")):
        return False
    return all((path / f).is_file() for f in REQUIRED) or _shard_count(path) is not None


def _shard_count(path: Path) -> int | None:
    """n of a complete per-EP-rank layout (model and optimizer files of all n ranks), else None."""
    counts = {int(m.group(2)) for f in path.glob("model-ep*-of-*.safetensors") if (m := _SHARD_FILE.match(f.name))}
    if len(counts) != 1:
        return None
    n = counts.pop()
    complete = all((path / f"{kind}-ep{r}-of-{n}.safetensors").is_file()
                   for r in range(n) for kind in ("model", "optimizer"))
    return n if complete else None


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
    tmp = begin_checkpoint(out_dir, step)
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    save_file(model_tensors(model), str(tmp / "model.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    return publish_checkpoint(tmp, out_dir, step, opt_meta, config, state, tokenizer_json, keep_last)


def save_sharded_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, config: ModelConfig, state: dict[str, Any],
                            tokenizer_json: str | None, keep_last: int | None, *, mesh: DeviceMesh,
                            shards: ShardRanges) -> Path:
    """The per-EP-rank layout, written collectively over the ``("dp", "ep")`` mesh: DP replica 0 of each EP rank
    writes its two files (``shards``: smoe.parallel.expert_shard_ranges), rank 0 writes the JSON files and
    publishes. The run directory must be on a file system every rank sees.

    Not torch.distributed.checkpoint: its metadata file is a pickle, and nothing here unpickles."""
    ep_size, ep_rank = mesh["ep"].size(), mesh["ep"].get_local_rank()
    tag = f"ep{ep_size}"
    if dist.get_rank() == 0:
        begin_checkpoint(out_dir, step, tag)
    dist.barrier()
    tmp = Path(out_dir) / CHECKPOINT_DIR / f".tmp-step_{step:08d}-{tag}"
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    if mesh["dp"].get_local_rank() == 0:
        opt_shards = optimizer_shard_ranges(model, optimizer, shards, opt_tensors)
        for kind, tensors, ranges in (("model", model_tensors(model), shards),
                                      ("optimizer", opt_tensors, opt_shards)):
            mine = {k: v for k, v in tensors.items() if k in ranges or ep_rank == 0}
            meta = {"shards": json.dumps({k: ranges[k] for k in mine if k in ranges})}
            save_file(mine, str(tmp / f"{kind}-ep{ep_rank}-of-{ep_size}.safetensors"), metadata=meta)
    dist.barrier()
    final = Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}"
    if dist.get_rank() == 0:
        final = publish_checkpoint(tmp, out_dir, step, opt_meta, config, state, tokenizer_json, keep_last)
    dist.barrier()
    return final


def begin_checkpoint(out_dir: str | Path, step: int, tag: str | None = None) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (renamed into place by publish_checkpoint);
    ``tag`` (default: the process id) lets several processes name the same one."""
    root = Path(out_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:08d}-{tag or os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish_checkpoint(tmp: Path, out_dir: str | Path, step: int, opt_meta: dict, config: ModelConfig,
                       state: dict[str, Any], tokenizer_json: str | None = None, keep_last: int | None = None) -> Path:
    """Write the JSON files into ``tmp`` (whose tensor files are written), fsync, rename it into place, prune."""
    root = Path(out_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    rng = capture_rng()
    write_text(tmp / "state.json", json.dumps({"step": step, "optimizer": opt_meta, "rng": rng, **state}))
    write_text(tmp / "config.json", config.to_json())
    if tokenizer_json is not None:
        write_text(tmp / "tokenizer.json", tokenizer_json)
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


def load_model_state(path: str | Path, model: torch.nn.Module, shards: ShardRanges | None = None) -> None:
    """Load weights and persistent buffers from either layout; ``shards`` names the tensors ``model`` holds only a
    slice of (smoe.parallel.expert_shard_ranges). Raises naming the file on a missing or unexpected key."""
    path = Path(path)
    where = path / "model.safetensors" if (path / "model.safetensors").is_file() else path
    tensors = _take_slices(read_tensors(path, "model"), shards or {}, where)
    expected = model_tensors(model)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=True)


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None,
                        shards: ShardRanges | None = None) -> dict[str, Any]:
    """Restore the optimizer and RNG states from either layout; returns state.json (step, counters, ...).
    ``model`` and ``shards`` (as for load_model_state) when the optimizer's parameters include expert slices."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    tensors = read_tensors(path, "optimizer")
    if shards:
        tensors = _take_slices(tensors, optimizer_shard_ranges(model, optimizer, shards, tensors), path)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    restore_rng(state["rng"])
    return state


def read_tensors(path: str | Path, kind: str) -> dict[str, torch.Tensor]:
    """Whole tensors of ``kind`` ("model" or "optimizer") from either layout, slices reassembled."""
    path = Path(path)
    single = path / f"{kind}.safetensors"
    if single.is_file():
        return load_file(str(single))
    n = _shard_count(path)
    if n is None:
        raise ValueError(f"{path}: holds neither {single.name} nor a complete set of {kind}-ep*-of-N files")
    whole: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
    for r in range(n):
        file = path / f"{kind}-ep{r}-of-{n}.safetensors"
        with safe_open(str(file), "pt") as f:
            ranges = json.loads((f.metadata() or {}).get("shards", "{}"))
            for key in f.keys():
                if key in ranges:
                    pieces.setdefault(key, []).append((ranges[key], f.get_tensor(key)))
                else:
                    whole[key] = f.get_tensor(key)
    for key, parts in pieces.items():
        parts.sort(key=lambda p: p[0][0])
        starts = [p[0][0] for p in parts]
        stops = [p[0][1] for p in parts]
        if starts[0] != 0 or stops[-1] != parts[0][0][2] or starts[1:] != stops[:-1]:
            raise ValueError(f"{path}: the slices of {key} cover rows {list(zip(starts, stops))}, not "
                             f"[0, {parts[0][0][2]}) once")
        whole[key] = torch.cat([t for _, t in parts])
    return whole


def optimizer_shard_ranges(model: torch.nn.Module, optimizer: torch.optim.Optimizer, shards: ShardRanges,
                           tensors: dict[str, torch.Tensor]) -> ShardRanges:
    """``shards`` (by parameter name) restated for the optimizer ``tensors`` (keyed ``"{index}.{state key}"``, as
    flatten_optimizer keys them) that are shaped like their parameter: AdamW's moments, not its step count."""
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {str(i): p for i, p in enumerate(params) if names[id(p)] in shards}
    ranges = {}
    for key, tensor in tensors.items():
        p = sharded.get(key.split(".", 1)[0])
        if p is not None and tensor.dim() == p.dim() and tensor.shape[1:] == p.shape[1:]:
            ranges[key] = shards[names[id(p)]]
    return ranges


def _take_slices(tensors: dict[str, torch.Tensor], shards: ShardRanges, where: Path) -> dict[str, torch.Tensor]:
    for key, (start, stop, total) in shards.items():
        if key not in tensors:
            continue  # reported as a missing key by the caller
        if tensors[key].shape[0] != total:
            raise ValueError(f"{where}: {key} has {tensors[key].shape[0]} rows, the model shards {total}")
        tensors[key] = tensors[key][start:stop]
    return tensors


def load_config(path: str | Path) -> ModelConfig:
    file = Path(path) / "config.json"
    try:
        return ModelConfig.from_json(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: cannot read the model config ({err})") from None


# --- helpers -----------------------------------------------------------------------------------------------------


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
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


def write_text(path: Path, text: str) -> None:
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
