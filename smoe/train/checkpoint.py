"""Training checkpoints: the model, the optimizer, RNG states and counters, saved atomically in the layout of
smoe.io.checkpoint (single-file, or one pair of files per expert-parallel rank) and restored for an exact resume.

Nothing here unpickles: tensors go to safetensors, the rest to JSON.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from smoe.config import ModelConfig
from smoe.io.checkpoint import (
    CHECKPOINT_DIR,
    ShardRanges,
    begin_checkpoint,
    check_intact,
    load_config,
    model_tensors,
    publish_checkpoint,
    read_tensors,
    resolve_checkpoint,
    take_slices,
)
from smoe.io.files import read_json
from smoe.io.safetensors import save_tensors


def initial_checkpoint(model_config: ModelConfig, init_from: str) -> Path:
    """The checkpoint ``init_from`` names (a run directory: its latest), checked before any training: its model
    files against their manifest, and its model config against this run's (names aside). Raises naming the first
    fields that differ."""
    path = _resolve_init(init_from)
    check_intact(path, lambda name: not name.startswith("optimizer"))
    differ = _differences(load_config(path).to_dict(), model_config.to_dict())
    if differ:
        raise ValueError(f"init_from {path}: its model config differs from this run's ({'; '.join(differ[:4])}), so "
                         "its weights cannot start this run; drop the model options or give its config")
    return path


def initial_tokenizer(init_from: str) -> Path | None:
    """The tokenizer.json of the checkpoint ``init_from`` names, or None when it has none."""
    file = _resolve_init(init_from) / "tokenizer.json"
    return file if file.is_file() else None


def initial_config(init_from: str) -> ModelConfig:
    """The model config of the checkpoint ``init_from`` names: a run continued from it without one of its own."""
    return load_config(_resolve_init(init_from))


def _resolve_init(init_from: str) -> Path:
    try:
        path = resolve_checkpoint(init_from)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"init_from {err}") from None
    if "model_type" in read_json(path / "config.json"):
        raise ValueError(f"init_from {path}: a Hugging Face model directory; convert it first (`smoe convert "
                         f"{path} --out DIR`) and start from DIR")
    return path


def _differences(saved: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> list[str]:
    """``path: X in the checkpoint, Y here`` for every config field that differs, ``name`` aside."""
    out = []
    for key in sorted(saved.keys() | ours.keys()):
        a, b = saved.get(key), ours.get(key)
        if key == "name" and not prefix or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} here")
    return out


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ModelConfig,
    state: dict[str, Any],
    tokenizer_json: str | None = None,
    keep_last: int | None = None,
    keep_optimizer: int | None = None,
) -> Path:
    """Write a checkpoint atomically, prune all but the newest ``keep_last`` and drop the optimizer state of all
    but the newest ``keep_optimizer``. Returns its directory."""
    tmp = begin_checkpoint(out_dir, step)
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    save_tensors(tmp / "model.safetensors", model_tensors(model))
    save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    return publish_checkpoint(tmp, out_dir, step, _texts(step, opt_meta, config, state, tokenizer_json), keep_last,
                              keep_optimizer)


def save_sharded_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, config: ModelConfig, state: dict[str, Any],
                            tokenizer_json: str | None, keep_last: int | None, *, mesh: DeviceMesh,
                            shards: ShardRanges, keep_optimizer: int | None = None) -> Path:
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
            save_tensors(tmp / f"{kind}-ep{ep_rank}-of-{ep_size}.safetensors", mine, meta)
    dist.barrier()
    final = Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}"
    if dist.get_rank() == 0:
        final = publish_checkpoint(tmp, out_dir, step, _texts(step, opt_meta, config, state, tokenizer_json),
                                   keep_last, keep_optimizer)
    dist.barrier()
    return final


def _texts(step: int, opt_meta: dict, config: ModelConfig, state: dict[str, Any],
           tokenizer_json: str | None) -> dict[str, str]:
    """The JSON files of a training checkpoint (and its tokenizer); the RNG states are captured here, at save."""
    texts = {"state.json": json.dumps({"step": step, "optimizer": opt_meta, "rng": capture_rng(), **state}),
             "config.json": config.to_json()}
    if tokenizer_json is not None:
        texts["tokenizer.json"] = tokenizer_json
    return texts


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None,
                        shards: ShardRanges | None = None) -> dict[str, Any]:
    """Restore the optimizer and RNG states from either layout; returns state.json (step, counters, ...).
    ``model`` and ``shards`` (as for load_model_state) when the optimizer's parameters include expert slices."""
    path = Path(path)
    state = read_json(path / "state.json")
    tensors = read_tensors(path, "optimizer")
    if shards:
        tensors = take_slices(tensors, optimizer_shard_ranges(model, optimizer, shards, tensors), path)
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        restore_rng(state["rng"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / 'state.json'}: does not restore this run's optimizer ({err})") from None
    return state


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


# --- optimizer and RNG state as tensors + JSON -------------------------------------------------------------------


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
