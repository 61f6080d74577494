"""The checkpoint layout, its manifest of checksums, and loading a model from a checkpoint or a run directory.

    RUN/checkpoints/step_00000200/
        model.safetensors       weights and persistent buffers (e.g. the aux-free expert bias)
        optimizer.safetensors   optimizer tensors (AdamW moments and step counts)
        state.json              optimizer hyper-parameters, step, RNG states, counters, data fingerprint
        config.json             the ModelConfig
        tokenizer.json          when training used one
        manifest.json           every other file's size and SHA-256, written last

An expert-parallel run (smoe.train.checkpoint.save_sharded_checkpoint) writes, instead of the two tensor files, one
pair per EP rank that together hold every tensor once, under its global name:

        model-ep{r}-of-{n}.safetensors       EP rank r's rows of each expert tensor (+ every other tensor when r = 0)
        optimizer-ep{r}-of-{n}.safetensors   the same split of the optimizer tensors

Each file's metadata ``shards`` maps a sliced tensor to its ``[start, stop, total]`` rows along dim 0. Readers
reassemble whole tensors from either layout and slice them for the model they load into, so a checkpoint reloads
at any EP size (or none) with identical weights.

A checkpoint is written into a ``.tmp-*`` directory, fsynced and renamed into place, so a crash mid-write leaves
nothing that looks complete. The manifest covers what happens after: a file truncated or changed on disk later no
longer matches it, ``damage`` says which and how, and a resume falls back to the newest intact checkpoint
(``latest_intact``). A *model* checkpoint (``smoe convert`` writes them) has only ``model.safetensors`` and
``config.json`` (and ``tokenizer.json``, ``manifest.json``): enough to evaluate, analyse and generate, not to
resume. A run keeps older checkpoints as model checkpoints (``keep_optimizer``): ``drop_optimizer`` deletes their
optimizer files, two thirds of a checkpoint under AdamW. ``consolidate`` rewrites a per-EP-rank checkpoint in the
single-file layout. Nothing here unpickles: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from smoe import kernels
from smoe.config import ModelConfig
from smoe.io.files import atomic_directory, atomic_write_text, fsync, read_json, sha256_file
from smoe.io.safetensors import SafetensorsFile, load_tensors, save_tensors
from smoe.models import Transformer, build_model, empty_model
from smoe.offload import experts as offloaded
from smoe.offload.budget import OffloadConfig
from smoe.offload.store import ExpertFiles, stacked_parts

CHECKPOINT_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.safetensors"
REQUIRED = (MODEL_FILE, "optimizer.safetensors", "state.json", "config.json")
MODEL_FILES = (MODEL_FILE, "config.json")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SHARD_FILE = re.compile(r"^model-ep(\d+)-of-(\d+)\.safetensors$")

# name -> (start, stop, total): the rows along dim 0 of a tensor that one rank holds a slice of.
ShardRanges = dict[str, tuple[int, int, int]]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


# --- finding checkpoints -----------------------------------------------------------------------------------------


def list_checkpoints(out_dir: str | Path, resumable: bool = True) -> list[Checkpoint]:
    """Complete checkpoints under ``out_dir`` (every file present; see ``damage`` for their content), oldest first;
    with ``resumable=False`` also those whose optimizer state was dropped (``drop_optimizer``)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    found = []
    complete = is_complete if resumable else lambda path: is_complete(path) or _is_model_only(path)
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and complete(child):
                found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(out_dir: str | Path, resumable: bool = True) -> Checkpoint | None:
    found = list_checkpoints(out_dir, resumable)
    return found[-1] if found else None


def latest_intact(out_dir: str | Path, log: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint whose files match their manifest; each newer damaged one is reported through ``log``
    (which one, and why) and skipped."""
    for checkpoint in reversed(list_checkpoints(out_dir)):
        problem = damage(checkpoint.path)
        if problem is None:
            return checkpoint
        if log is not None:
            log(f"skipping checkpoint {checkpoint.path}: {problem}")
    return None


def model_directory(path: str | Path) -> Path:
    """The directory a model PATH names: a Hugging Face model directory or a smoe checkpoint holds config.json; a
    run directory means its latest checkpoint."""
    path = Path(path)
    return path if (path / "config.json").is_file() else resolve_checkpoint(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A (training or model) checkpoint directory, or a run directory (its latest checkpoint). Raises naming the
    path otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if is_complete(path) or all((path / f).is_file() for f in MODEL_FILES):
        return path
    latest = latest_checkpoint(path, resumable=False)  # a model checkpoint evaluates and analyses as well
    if latest is None:
        raise ValueError(f"{path}: not a checkpoint (missing one of {', '.join(MODEL_FILES)}) and holds none")
    return latest.path


def is_complete(path: Path) -> bool:
    """Every file of a training checkpoint is there, in the single-file or the per-EP-rank layout."""
    if not all((path / f).is_file() for f in ("state.json", "config.json")):
        return False
    return all((path / f).is_file() for f in REQUIRED) or shard_count(path) is not None


def _is_model_only(path: Path) -> bool:
    """A run's checkpoint after ``drop_optimizer``: its model (either layout) and state, no optimizer file."""
    if not all((path / f).is_file() for f in ("state.json", "config.json")) or any(path.glob("optimizer*")):
        return False
    return (path / MODEL_FILE).is_file() or shard_count(path, kinds=("model",)) is not None


def shard_count(path: Path, kinds: tuple[str, ...] = ("model", "optimizer")) -> int | None:
    """n of a complete per-EP-rank layout (the ``kinds`` files of all n ranks), else None."""
    counts = {int(m.group(2)) for f in path.glob("model-ep*-of-*.safetensors") if (m := _SHARD_FILE.match(f.name))}
    if len(counts) != 1:
        return None
    n = counts.pop()
    complete = all((path / f"{kind}-ep{r}-of-{n}.safetensors").is_file()
                   for r in range(n) for kind in kinds)
    return n if complete else None


# --- writing and verifying ---------------------------------------------------------------------------------------


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


def write_manifest(directory: Path) -> None:
    """Record every file's size and SHA-256 in ``manifest.json``, after fsyncing each: the last file written."""
    files = {}
    for f in sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE):
        fsync(f)
        files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (directory / MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": files}, indent=1))
    fsync(directory / MANIFEST_FILE)


def publish_checkpoint(tmp: Path, out_dir: str | Path, step: int, texts: dict[str, str],
                       keep_last: int | None = None, keep_optimizer: int | None = None) -> Path:
    """Write ``texts`` (file name -> content) into ``tmp``, whose tensor files are written, then the manifest;
    rename it into place, prune all but the newest ``keep_last`` checkpoints and drop the optimizer state of all
    but the newest ``keep_optimizer``."""
    root = Path(out_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    for name, text in texts.items():
        (tmp / name).write_text(text, encoding="utf-8")
    write_manifest(tmp)
    if final.exists():  # re-saving a step after a resume: replace it only once the new one is complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(root)
    if keep_last is not None:
        for old in list_checkpoints(out_dir, resumable=False)[:-keep_last]:
            shutil.rmtree(old.path, ignore_errors=True)
    if keep_optimizer is not None:
        for old in list_checkpoints(out_dir)[:-keep_optimizer]:
            drop_optimizer(old.path)
    return final


def drop_optimizer(path: Path) -> None:
    """Turn a training checkpoint into a model checkpoint that keeps its step and state: the manifest is
    rewritten without the optimizer files first, then they are deleted, so a crash in between leaves a
    checkpoint whose manifest still matches every file it lists."""
    manifest = read_json(path / MANIFEST_FILE)
    manifest["files"] = {name: v for name, v in manifest["files"].items() if not name.startswith("optimizer")}
    atomic_write_text(path / MANIFEST_FILE, json.dumps(manifest, indent=1))
    for f in path.glob("optimizer*"):
        f.unlink()


def remove_incomplete(out_dir: str | Path) -> None:
    root = Path(out_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for child in root.glob(".tmp-step_*"):
            shutil.rmtree(child, ignore_errors=True)


def damage(path: str | Path, only: Callable[[str], bool] | None = None) -> str | None:
    """What is wrong with the checkpoint's files against its manifest (a missing file, another size, another
    checksum), or None when they all match; ``only`` limits the check to the files a reader needs. A checkpoint
    written before manifests existed is taken as it is."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        return None
    try:
        files = read_json(path / MANIFEST_FILE)["files"]
        entries = [(name, int(e["bytes"]), str(e["sha256"])) for name, e in files.items()]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        return f"{path / MANIFEST_FILE}: unreadable manifest ({err})"
    for name, size, digest in entries:
        if only is not None and not only(name):
            continue
        file = path / name
        if Path(name).name != name:
            return f"{path / MANIFEST_FILE}: lists {name!r}, not a file of the checkpoint directory"
        if not file.is_file():
            return f"{file}: missing (listed in {MANIFEST_FILE})"
        actual = file.stat().st_size
        if actual != size:
            return f"{file}: {actual} bytes, {MANIFEST_FILE} recorded {size} (truncated or rewritten after saving)"
        if sha256_file(file) != digest:
            return f"{file}: content differs from the SHA-256 in {MANIFEST_FILE} (changed on disk after saving)"
    return None


def check_intact(path: str | Path, only: Callable[[str], bool] | None = None) -> Path:
    """``path`` if its files (those ``only`` accepts) match the manifest; raises one ValueError naming the damaged
    file otherwise."""
    problem = damage(path, only)
    if problem is not None:
        raise ValueError(problem)
    return Path(path)


# --- reading -----------------------------------------------------------------------------------------------------


def load_config(path: str | Path) -> ModelConfig:
    file = Path(path) / "config.json"
    try:
        return ModelConfig.from_dict(read_json(file))
    except (TypeError, KeyError) as err:
        raise ValueError(f"{file}: not a smoe model config ({err})") from None


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def read_tensors(path: str | Path, kind: str) -> dict[str, torch.Tensor]:
    """Whole tensors of ``kind`` ("model" or "optimizer") from either layout, slices reassembled."""
    path = Path(path)
    single = path / f"{kind}.safetensors"
    if single.is_file():
        return load_tensors(single)
    n = shard_count(path)
    if n is None:
        raise ValueError(f"{path}: holds neither {single.name} nor a complete set of {kind}-ep*-of-N files")
    whole: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
    for r in range(n):
        file = path / f"{kind}-ep{r}-of-{n}.safetensors"
        tensors = load_tensors(file)
        ranges = _shard_ranges(file)
        for key, tensor in tensors.items():
            if key in ranges:
                pieces.setdefault(key, []).append((ranges[key], tensor))
            else:
                whole[key] = tensor
    for key, parts in pieces.items():
        parts.sort(key=lambda p: p[0][0])
        starts = [p[0][0] for p in parts]
        stops = [p[0][1] for p in parts]
        if starts[0] != 0 or stops[-1] != parts[0][0][2] or starts[1:] != stops[:-1]:
            raise ValueError(f"{path}: the slices of {key} cover rows {list(zip(starts, stops, strict=True))}, not "
                             f"[0, {parts[0][0][2]}) once")
        whole[key] = torch.cat([t for _, t in parts])
    return whole


def _shard_ranges(file: Path) -> dict[str, list[int]]:
    raw = SafetensorsFile(file).metadata.get("shards", "{}")
    try:
        ranges = json.loads(raw)
        if not all(isinstance(v, list) and len(v) == 3 and all(isinstance(i, int) for i in v)
                   for v in ranges.values()):
            raise ValueError("each entry must be [start, stop, total]")
    except (ValueError, AttributeError, RecursionError) as err:
        raise ValueError(f"{file}: unreadable 'shards' metadata ({err})") from None
    return ranges


def take_slices(tensors: dict[str, torch.Tensor], shards: ShardRanges, where: Path) -> dict[str, torch.Tensor]:
    """Each tensor named in ``shards`` cut to the rows this rank holds (the rest are left whole)."""
    for key, (start, stop, total) in shards.items():
        if key not in tensors:
            continue  # reported as a missing key by the caller
        if tensors[key].shape[0] != total:
            raise ValueError(f"{where}: {key} has {tensors[key].shape[0]} rows, the model shards {total}")
        tensors[key] = tensors[key][start:stop]
    return tensors


def load_model_state(path: str | Path, model: torch.nn.Module, shards: ShardRanges | None = None) -> None:
    """Load weights and persistent buffers from either layout; ``shards`` names the tensors ``model`` holds only a
    slice of (smoe.parallel.expert_shard_ranges). Raises naming the file on a missing or unexpected key."""
    path = Path(path)
    where = path / MODEL_FILE if (path / MODEL_FILE).is_file() else path
    tensors = take_slices(read_tensors(path, "model"), shards or {}, where)
    expected = model_tensors(model)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=True)


def stored_dtype(path: str | Path) -> torch.dtype:
    """The dtype a smoe checkpoint's weights are stored in (an expert-parallel run's per-rank files: fp32, its
    master weights)."""
    path = resolve_checkpoint(path)
    return _float_dtype(SafetensorsFile(path / MODEL_FILE)) if (path / MODEL_FILE).is_file() else torch.float32


def _float_dtype(header: SafetensorsFile) -> torch.dtype:
    return next((header.dtype(n) for n in header.keys() if header.dtype(n).is_floating_point), torch.float32)


_QUANTIZED_DTYPES = {torch.int8: "int8", torch.uint8: "int4"}


def _check_quantization(header: SafetensorsFile, config: ModelConfig) -> None:
    """The weights' quantisation (smoe.quant: ``*.qweight`` tensors, int8 or packed int4) against config.json's
    ``quantization`` entry, named before any key-by-key comparison would bury it."""
    stored = {_QUANTIZED_DTYPES.get(header.dtype(n), str(header.dtype(n))) for n in header.keys()
              if n.endswith(".qweight")}
    wanted = config.quantization.scheme if config.quantization is not None else None
    if stored and wanted is None:
        raise ValueError(f"{header.path}: holds {'/'.join(sorted(stored))} quantised weights, but the config.json "
                         "beside it has no quantization entry")
    if wanted is not None and stored != {wanted}:
        found = "/".join(sorted(stored)) + " quantised" if stored else "full-precision"
        raise ValueError(f"{header.path}: holds {found} weights, but the config.json beside it says quantization "
                         f"{wanted}")


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               offload: OffloadConfig | None = None) -> tuple[Transformer, Path]:
    """The model of a smoe checkpoint (training or model, either layout) or a run directory's latest, in eval
    mode, and the checkpoint directory it came from. ``dtype`` defaults to the stored one (fp32 for a bf16/fp16
    checkpoint on a CPU without native GEMMs in it: ``kernels.load_dtype``), ``device`` to the CPU. ``offload``
    with a ``max_expert_memory``: the routed experts stay in model.safetensors, read on demand (smoe.offload).

    The files are checked against the manifest first; a single-file checkpoint is then streamed from its memory
    map into the allocated model (no second copy of the weights), after every key and shape is checked on the
    header."""
    # The model's files only: hashing the optimizer state (twice the weights under AdamW) would triple the cost.
    path = check_intact(resolve_checkpoint(path), lambda name: not name.startswith("optimizer"))
    config = load_config(path)
    device = torch.device(device or "cpu")
    offloading = offload is not None and offload.enabled
    if offloading:
        offload.validate()
        if not (path / MODEL_FILE).is_file():
            raise ValueError(f"{path}: max_expert_memory reads the experts from {MODEL_FILE}; consolidate this "
                             f"expert-parallel checkpoint first (smoe convert {path} --out DIR)")
    if not (path / MODEL_FILE).is_file():  # an expert-parallel run's per-rank files, reassembled whole
        model = empty_model(config, dtype or torch.float32, device)  # training keeps fp32 master weights
        load_model_state(path, model)
        return model.eval(), path
    header = SafetensorsFile(path / MODEL_FILE)
    _check_quantization(header, config)
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    missing, unexpected = sorted(expected.keys() - header.keys()), sorted(header.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{header.path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for name, tensor in expected.items():
        if header.shape(name) != tuple(tensor.shape):
            raise ValueError(f"{header.path}: {name} has shape {list(header.shape(name))}, the config.json beside "
                             f"it describes {list(tensor.shape)}")
        if not tensor.is_floating_point() and header.dtype(name) != tensor.dtype:  # copy_ would convert silently
            raise ValueError(f"{header.path}: {name} has dtype {header.dtype(name)}, the config.json beside it "
                             f"describes {tensor.dtype}")
    model = empty_model(config, dtype or kernels.load_dtype(_float_dtype(header), device), device,
                        offloaded.offload_experts if offloading else None)
    if offloading:  # before the weights are read
        offloaded.check(model, offload, device)
    state = model.state_dict()
    with header as f:
        for name in header.keys():
            if name in state:  # offloaded experts are not
                state[name].copy_(f.view(name))
                f.release(name)
    if offloading:
        offloaded.attach(model, ExpertFiles(stacked_parts(header, offloaded.prefixes(model))), offload)
    return model.eval(), path


# --- converting between layouts ----------------------------------------------------------------------------------


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
