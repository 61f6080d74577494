"""A Hugging Face checkpoint's safetensors files, read without loading them whole (smoe.interop.hf loads and writes
models through it): which file holds each tensor (``Checkpoint``, ``open_checkpoint``: a single file or an index of
shards, checked), which piece of which stored tensor fills which of the model's (``plan_load``: every check on the
headers, before a byte of weights is read), DeepSeek-V3's FP8 block scales, and reading: ``fill`` copies the pieces
into an allocated model, ``expert_parts`` says where each routed expert's bytes lie for smoe.offload to read on
demand.

Legend: E routed experts.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from smoe.interop.families.base import KeyMap
from smoe.interop.pieces import Piece, ignored
from smoe.io.files import read_json
from smoe.io.safetensors import SafetensorsFile
from smoe.models import Transformer
from smoe.offload.store import Key, Part

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    """The safetensors files of a directory and which file holds each tensor (headers only)."""

    root: Path
    files: dict[str, SafetensorsFile]  # file name -> opened header
    where: dict[str, str]  # tensor name -> file name
    listing: Path  # the file that lists the tensors: the index, or the single file
    stored: dict[str, str] = field(default_factory=dict)  # a renamed tensor (KeyMap.aliases) -> its name in the file

    @classmethod
    def single(cls, root: Path, file: str) -> "Checkpoint":
        header = SafetensorsFile(root / file)
        return cls(root, {file: header}, {k: file for k in header.keys()}, root / file)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(self.stored.get(name, name))

    def dtype(self, name: str) -> torch.dtype:
        return self.files[self.where[name]].dtype(self.stored.get(name, name))

    def aliased(self, aliases: tuple[tuple[str, str], ...]) -> "Checkpoint":
        """The tensors under the names the key map uses (``KeyMap.aliases``); two spellings of one are refused."""
        where, stored = {}, {}
        for name, file in self.where.items():
            new = name
            for pattern, replacement in aliases:
                new = re.sub(pattern, replacement, new)
            if new in where:
                raise ValueError(f"{self.listing}: holds both {stored.get(new, new)!r} and {name!r}, two spellings "
                                 "of one tensor")
            where[new] = file
            if new != name:
                stored[new] = name
        return replace(self, where=where, stored=stored)

    def describe(self, name: str) -> str:
        return str(self.root / self.where[name])


def open_checkpoint(root: Path) -> Checkpoint:
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = _read_weight_map(index, root)
        files = {}
        for file in sorted(set(weight_map.values())):
            if not (root / file).is_file():
                raise ValueError(f"{root / file}: missing shard (listed in {index})")
            files[file] = SafetensorsFile(root / file)
            # The index alone says where each tensor is: a shard holding a key it maps elsewhere (or not at all)
            # would otherwise shadow the listed tensor, depending on which shard happens to be read last.
            for name in files[file].keys():
                if name not in weight_map:
                    raise ValueError(f"{root / file}: holds key {name!r}, which {index} does not list")
                if weight_map[name] != file:
                    raise ValueError(f"{root / file}: holds key {name!r}, which {index} maps to {weight_map[name]}")
        for name, file in weight_map.items():
            if name not in files[file].keys():
                raise ValueError(f"{root / file}: missing key {name!r} (listed in {index})")
        return Checkpoint(root, files, dict(weight_map), index)
    if (root / SINGLE_FILE).is_file():
        return Checkpoint.single(root, SINGLE_FILE)
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise ValueError(f"{root}: only pickled weights (*.bin / *.pt); smoe reads safetensors only (a pickle can "
                         "run code): convert them with transformers' save_pretrained(safe_serialization=True)")
    raise ValueError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")


def _read_weight_map(index: Path, root: Path) -> dict[str, str]:
    """The index's tensor -> shard map; each shard a file inside ``root`` (the index is untrusted: a name such as
    ``../../x`` or ``/etc/x``, or a link out of the directory, must not make us open files elsewhere)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map must be an object mapping tensor names to shard file names")
    inside = root.resolve()
    for name, file in weight_map.items():
        shard = Path(file)
        if shard.is_absolute() or ".." in shard.parts or not (root / shard).resolve().is_relative_to(inside):
            raise ValueError(f"{index}: weight_map[{name!r}] = {file!r} is not a file inside {root}")
    return weight_map


def plan_load(ckpt: Checkpoint, pieces: list[Piece], state: dict[str, torch.Tensor], km: KeyMap,
          fp8_block: tuple[int, int] | None = None) -> dict[str, list[Piece]]:
    """Check every piece against the headers (fp8 weights against their block scales, ``fp8_block`` tiles each);
    every other tensor must be one ``km`` ignores. Returns the pieces to load, by Hugging Face name."""
    by_name: dict[str, list[Piece]] = defaultdict(list)
    for p in pieces:
        by_name[p.hf].append(p)
    for name, group in by_name.items():
        if name not in ckpt.where:
            raise ValueError(f"{ckpt.listing}: missing key {name!r} (needed for {group[0].ours})")
        shape, dtype = ckpt.shape(name), ckpt.dtype(name)
        if not dtype.is_floating_point:
            raise ValueError(f"{ckpt.describe(name)}: {name} has dtype {dtype}, expected floating point")
        for p in group:
            want = tuple(state[p.ours][p.index].shape)
            got = tuple(p.source(torch.empty(shape, device="meta")).shape)
            if got != want:
                raise ValueError(f"{ckpt.describe(name)}: {name} has shape {list(shape)}, which does not fit "
                                 f"{p.ours} {list(want)} of the model config.json describes")
        if dtype.itemsize == 1:
            _check_fp8_scale(ckpt, name, fp8_block)
    consumed = set(by_name) | {n + "_scale_inv" for n in by_name if ckpt.dtype(n).itemsize == 1}
    for name in ckpt.where:
        if name not in consumed and not ignored(km, name):
            raise ValueError(f"{ckpt.describe(name)}: unexpected key {name!r} (not part of the model "
                             "config.json describes)")
    return {name: [p for p in group if p.load] for name, group in by_name.items()}


def _check_fp8_scale(ckpt: Checkpoint, name: str, block: tuple[int, int] | None) -> None:
    """An fp8 weight needs its ``_scale_inv``: one float scale per ``block`` tile, the last tiles ragged."""
    scale = name + "_scale_inv"
    shape = ckpt.shape(name)
    if block is None or len(shape) != 2:
        raise ValueError(f"{ckpt.describe(name)}: {name} is fp8 with shape {list(shape)}; only 2-d weights of a "
                         "checkpoint with block scales can be fp8")
    if scale not in ckpt.where:
        raise ValueError(f"{ckpt.describe(name)}: {name} is fp8 without {scale}")
    want = [-(-shape[0] // block[0]), -(-shape[1] // block[1])]
    if list(ckpt.shape(scale)) != want or not ckpt.dtype(scale).is_floating_point:
        raise ValueError(f"{ckpt.describe(scale)}: {scale} has shape {list(ckpt.shape(scale))} and dtype "
                         f"{ckpt.dtype(scale)}; expected {want} (one scale per {block[0]}x{block[1]} block of "
                         f"{list(shape)}) of a float dtype")


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek-V3's FP8 layout: one fp32 scale per ``block`` (128 x 128) tile of the weight."""
    rows, cols = w.shape
    scale = scale_inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w.float() * scale


def read_fp8_block(hf: dict, source: str) -> tuple[int, int]:
    quant = hf.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise ValueError(f"{source}: quantization_config must be an object, got {quant!r}")
    if quant.get("quant_method", "fp8") != "fp8":
        raise ValueError(f"{source}: quantization method {quant.get('quant_method')!r} is not supported (fp8 "
                         "block scales only)")
    block = quant.get("weight_block_size") or [128, 128]
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"{source}: quantization_config.weight_block_size must be two positive integers, got "
                         f"{block!r}")
    return block[0], block[1]

def fp8_scales(ckpt: Checkpoint, fp8_block: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """Every FP8 block scale: small (1/16384 of the weights), and possibly in another shard than their weight."""
    scales = {}
    if fp8_block is not None:
        for name, file in ckpt.where.items():
            if name.endswith("_scale_inv"):
                with ckpt.files[file] as f:
                    scales[name] = f.view(ckpt.stored.get(name, name)).clone()
    return scales


def fill(model: Transformer, ckpt: Checkpoint, plan: dict[str, list[Piece]], fp8_block: tuple[int, int] | None,
          scales: dict[str, torch.Tensor]) -> None:
    """Copy ``plan``'s pieces into the allocated ``model``, file by file in each file's order, releasing each
    tensor's pages once copied."""
    state = model.state_dict()
    renamed = {stored: name for name, stored in ckpt.stored.items()}
    for header in ckpt.files.values():
        with header as f:
            for stored in header.keys():  # file order; open_checkpoint made sure the index maps each to this file
                name = renamed.get(stored, stored)
                group = plan.get(name)
                if not group:
                    continue
                src = f.view(stored)
                if src.dtype.itemsize == 1 and src.dtype.is_floating_point:  # scale checked by plan_load
                    src = dequantize_fp8(src, scales[name + "_scale_inv"], fp8_block)
                for p in group:
                    ours = state[p.ours][p.index]
                    ours.copy_(p.source(src))
                    if p.offset:
                        ours.add_(p.offset)
                f.release(stored)

def expert_parts(ckpt: Checkpoint, plan: dict[str, list[Piece]], prefixes: dict[str, int],
                  fp8_block: tuple[int, int] | None, scales: dict[str, torch.Tensor]) -> dict[Key, list[Part]]:
    """Where each routed expert's pieces lie in the files: the bytes a piece's view of its Hugging Face tensor reads
    (one expert's tensor, or its slice of a fused one), found by taking the view of a meta tensor of the stored
    shape. FP8 weights are decoded with their block scales as they are read."""
    parts: dict[Key, list[Part]] = defaultdict(list)
    for name, group in plan.items():
        if not group:
            continue
        stored = ckpt.stored.get(name, name)
        header = ckpt.files[ckpt.where[name]]
        (begin, _), dtype = header.span(stored), header.dtype(stored)
        whole = torch.empty(header.shape(stored), dtype=dtype, device="meta")
        decode = None
        if dtype.itemsize == 1 and dtype.is_floating_point:  # scale checked by plan_load
            decode = partial(dequantize_fp8, scale_inv=scales[name + "_scale_inv"], block=fp8_block)
        for p in group:
            prefix = next(x for x in prefixes if p.ours.startswith(x))
            view = p.source(whole)
            first, rest = (p.index[0], p.index[1:]) if p.index else (slice(None), ())  # () or (:, ...): all experts
            for e in range(view.shape[0]) if first == slice(None) else [first]:
                v = view[e] if first == slice(None) else view
                if (v is not whole and not v._is_view()) or p.offset or (decode is not None and v.shape != whole.shape):
                    raise ValueError(f"{ckpt.describe(name)}: {name} holds routed experts in a layout that cannot be "
                                     "read expert by expert; load it without max_expert_memory")
                parts[(prefixes[prefix], e)].append(Part(header.path, begin + v.storage_offset() * dtype.itemsize,
                                                         dtype, tuple(v.shape), tuple(v.stride()),
                                                         p.ours[len(prefix):], rest, decode))
    return dict(parts)
