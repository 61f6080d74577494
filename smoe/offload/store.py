"""Where each routed expert's bytes lie in a checkpoint's files (``Part``, ``ExpertFiles``), and reading one expert
into a cache slot.

A part is one stored tensor (or a strided view of one: a Hugging Face family that fuses its experts, or transposes
them) that fills one region of an expert's slot. The loaders make them from the safetensors headers: a smoe
checkpoint's stacked ``(E, ...)`` tensors give one contiguous run per expert and tensor (``stacked_parts``); a
Hugging Face checkpoint's per-expert tensors one part each (smoe.interop.hf). Reading a part whose bytes are the
slot region's, in its dtype, is one ``pread`` straight into the slot (no copy, no memory map, so the process's
resident set holds the slots and nothing more); any other part is read into a buffer and copied in, converting its
dtype (bf16 to fp32 on a CPU without bf16 GEMMs) or decoding it (FP8 block scales).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

Key = tuple[int, int]  # (MoE layer index, as Transformer.moe_layers_by_index keys it; expert)


@dataclass(frozen=True)
class Part:
    """The bytes of ``file`` from ``offset`` hold a tensor of ``dtype`` laid out as ``shape`` with element
    ``strides`` (from ``offset``), which fills ``slot[target][index]`` of its expert's slot, through ``decode``
    when given."""

    file: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    target: str
    index: tuple = ()
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def span(self) -> int:
        """Elements from the first to the last one the view reads."""
        if any(n == 0 for n in self.shape):
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides, strict=True))

    @property
    def nbytes(self) -> int:
        return self.span * self.dtype.itemsize

    @property
    def contiguous(self) -> bool:
        return self.strides == _row_major(self.shape)


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


class Header(Protocol):
    """What ``stacked_parts`` reads of a safetensors header (smoe.io.safetensors.SafetensorsFile)."""

    path: Path

    def keys(self) -> Iterable[str]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def span(self, name: str) -> tuple[int, int]: ...


def stacked_parts(header: Header, prefixes: dict[str, int]) -> dict[Key, list[Part]]:
    """The parts of every expert stored as smoe stores them: each tensor named ``PREFIX + target`` (``prefixes``
    maps a MoE layer's experts' prefix, e.g. ``layers.3.ffn.experts.``, to its layer index) stacks its layer's
    experts along dim 0, so expert e's part is the e-th run of ``numel / E`` elements."""
    parts: dict[Key, list[Part]] = {}
    for name in header.keys():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            continue
        shape, dtype, (begin, _) = header.shape(name), header.dtype(name), header.span(name)
        one = math.prod(shape[1:]) * dtype.itemsize
        for e in range(shape[0]):
            parts.setdefault((prefixes[prefix], e), []).append(
                Part(header.path, begin + e * one, dtype, tuple(shape[1:]), _row_major(tuple(shape[1:])),
                     name[len(prefix):]))
    return parts


class ExpertFiles:
    """Every routed expert's parts, and the open files they are read from (one descriptor per file, shared by the
    reading threads: ``pread`` keeps no file position)."""

    def __init__(self, parts: dict[Key, list[Part]]):
        self.parts = parts
        sizes: dict[Path, int] = {}
        for key, expert in parts.items():
            for part in expert:
                if part.file not in sizes:
                    sizes[part.file] = part.file.stat().st_size
                if part.offset < 0 or part.offset + part.nbytes > sizes[part.file]:
                    raise ValueError(f"{part.file}: expert {key[1]} of layer {key[0]} ({part.target}) lies past the "
                                     f"end of the file ({part.offset + part.nbytes} > {sizes[part.file]} bytes)")
        # Opened once, here: the reading threads then share them without a lock.
        self._fds = {file: os.open(file, os.O_RDONLY) for file in sizes}

    def advise_random(self) -> None:
        """Tell the kernel these files are read at random: no read-ahead, so a read brings in its own pages only
        (with ``drop_page_cache``, a miss then costs exactly its expert's bytes from the disk)."""
        if hasattr(os, "posix_fadvise"):
            for fd in self._fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)

    def check(self, keys: Iterable[Key], slot: dict[str, torch.Tensor]) -> None:
        """Every expert of ``keys`` has parts that fill each tensor of a slot (``slot``: one slot's tensors) once,
        in shape; raises naming the first that does not (a key-map or loader bug, or a checkpoint the header checks
        let through)."""
        for key in keys:
            filled = {name: 0 for name in slot}
            for part in self.parts.get(key, []):
                if part.target not in slot:
                    raise ValueError(f"expert {key[1]} of layer {key[0]}: {part.file} holds {part.target!r}, which "
                                     f"the model's experts do not have ({', '.join(slot)})")
                region = slot[part.target][part.index] if part.index else slot[part.target]
                if tuple(region.shape) != part.shape:
                    raise ValueError(f"expert {key[1]} of layer {key[0]}: {part.target} from {part.file} has shape "
                                     f"{list(part.shape)}, the model expects {list(region.shape)}")
                filled[part.target] += region.numel()
            for name, n in filled.items():
                if n != slot[name].numel():
                    raise ValueError(f"expert {key[1]} of layer {key[0]}: the checkpoint holds {n} of the "
                                     f"{slot[name].numel()} values of its {name}")

    def read(self, key: Key, slot: dict[str, torch.Tensor], drop_page_cache: bool = False) -> int:
        """Fill ``slot`` (one slot's tensors, by target) with expert ``key``; returns the bytes read."""
        total = 0
        for part in self.parts[key]:
            fd = self._fds[part.file]
            region = slot[part.target][part.index] if part.index else slot[part.target]
            if part.decode is None and part.dtype == region.dtype and part.contiguous and region.is_contiguous():
                _pread(fd, region, part.offset, part.file)
            else:
                buffer = torch.empty(part.span, dtype=part.dtype)
                _pread(fd, buffer, part.offset, part.file)
                stored = buffer.as_strided(part.shape, part.strides)
                region.copy_(stored if part.decode is None else part.decode(stored))
            if drop_page_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, part.offset, part.nbytes, os.POSIX_FADV_DONTNEED)
            total += part.nbytes
        return total

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread(fd: int, into: torch.Tensor, offset: int, file: Path) -> None:
    """Read ``into``'s bytes (a contiguous tensor) from ``offset``: the GIL is released while the disk works."""
    if into.numel() == 0:
        return
    view = memoryview(into.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(f"{file}: ends at byte {offset + done}, before the expert it should hold (truncated since "
                          "it was loaded?)")
        done += n
