"""Tensor-by-tensor safetensors I/O, so that loading and exporting a model never holds a second copy of it.

The ``safetensors`` package reads a tensor into a fresh allocation and writes a whole dict at once; here a reader
exposes each tensor as a zero-copy view of a memory map (copied straight into its destination, then its pages are
released from this process's resident set), and a writer streams tensors to disk one at a time. ``load_tensors`` and
``save_tensors`` keep the package's dict-in, dict-out contract for small files.

The format is the published one: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` (plus an optional ``__metadata__`` of strings) padded with spaces to a multiple of 8 bytes, then the
tensors' bytes back to back. Files are untrusted: the reader enforces what the format requires (the package's own
reader does too), so that a header cannot point two tensors at the same bytes, hide bytes no tensor claims, or claim
bytes past the end of the file; each refusal is one ``ValueError`` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, NoReturn

import torch

from smoe.io.files import parse_json

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsFile:
    """The header of one ``.safetensors`` file, validated on open, and zero-copy views of its tensors. Use as a
    context manager; views die with it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: not a safetensors file, or truncated (header of {n} bytes)")
            header = parse_json(f.read(n), f"{self.path} (safetensors header)")
        self._start = 8 + n
        self.metadata = self._check_metadata(header.pop("__metadata__", {}))
        # In file order, so that streaming every tensor reads the file front to back.
        self._entries = dict(sorted(((name, self._check_entry(name, info)) for name, info in header.items()),
                                    key=lambda item: (item[1][2], item[1][3])))
        self._check_tiling(size)
        self._file = None
        self._map: mmap.mmap | None = None

    def _fail(self, name: str, rule: str) -> NoReturn:
        raise ValueError(f"{self.path}: tensor {name!r} {rule}")

    def _check_metadata(self, metadata: object) -> dict[str, str]:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{self.path}: __metadata__ must be an object of strings, got {str(metadata)[:100]}")
        return metadata

    def _check_entry(self, name: str, info: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry, offsets from the start of the file."""
        if not isinstance(info, dict):
            self._fail(name, f"must be an object with dtype, shape and data_offsets, got {str(info)[:100]}")
        dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            self._fail(name, f"has unsupported dtype {info.get('dtype')!r} (supported: {', '.join(DTYPES)})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not _naturals(shape):
            self._fail(name, f"has shape {shape!r}; expected a list of non-negative integers")
        if not _naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            self._fail(name, f"has data_offsets {offsets!r}; expected [begin, end], integers with 0 <= begin <= end")
        begin, end = offsets
        if end - begin != dtype.itemsize * math.prod(shape):
            self._fail(name, f"has {end - begin} bytes for shape {shape} of {info['dtype']}")
        return dtype, tuple(shape), self._start + begin, self._start + end

    def _check_tiling(self, size: int) -> None:
        """The tensors, in file order, must cover the data exactly: no overlap, no hole, no trailing bytes."""
        at, last = self._start, None
        for name, (_, _, begin, end) in self._entries.items():
            if begin != at:
                before = "the start of the data" if last is None else f"the end of {last!r}"
                self._fail(name, f"{'overlaps' if begin < at else 'leaves a gap after'} {before} (data_offsets begin "
                                 f"at {begin - self._start}, {before} is at {at - self._start})")
            if end > size:
                raise ValueError(f"{self.path}: truncated; {name} ends at byte {end} of {size}")
            at, last = end, name
        if at != size:
            after = f"after the last tensor {last!r}" if last is not None else "after the header"
            raise ValueError(f"{self.path}: {size - at} trailing bytes {after}, which no tensor claims")

    def keys(self):
        return self._entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def span(self, name: str) -> tuple[int, int]:
        """Where the tensor's bytes lie in the file: [begin, end) from the start of the file."""
        return self._entries[name][2:]

    def __enter__(self) -> "SafetensorsFile":
        self._file = open(self.path, "rb")
        # ACCESS_COPY: a writable (never written) private map, which torch.frombuffer accepts without a warning.
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if self._entries else None
        return self

    def __exit__(self, *exc) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()
        self._map = self._file = None

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a view of the memory map: copy what you need before calling ``release(name)``."""
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=begin)
        return flat.view(dtype).view(shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set (they stay in the page cache)."""
        _, _, begin, end = self._entries[name]
        if self._map is None or end == begin or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = begin - begin % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``(name, tensor)`` pairs, streaming one tensor at a time, and fsync the file. ``tensors`` is iterated
    twice (header, then data), so pass a list or a re-iterable of cheap views."""
    tensors = list(tensors)
    write_safetensors_streamed(path, [(name, t.dtype, tuple(t.shape)) for name, t in tensors],
                               (t for _, t in tensors if t.numel()), metadata)


def write_safetensors_streamed(path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                               data: Iterable[torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write the file whose header ``entries`` describe (name, dtype, shape, in file order) from ``data``: the
    tensors' bytes in that order, in any pieces (a tensor may come as several consecutive chunks of its dtype, so
    that a file larger than memory is written a piece at a time; empty chunks are skipped), and fsync it."""
    header: dict = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"{path}: metadata must map strings to strings, got {str(metadata)[:100]}")
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in _NAMES:
            raise ValueError(f"{path}: {name} has dtype {dtype}, which safetensors cannot hold")
        if name in header or name == "__metadata__":
            raise ValueError(f"{path}: {name} is given twice (or is the reserved name __metadata__)")
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    chunks = iter(data)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in entries:
            left = math.prod(shape) * dtype.itemsize
            while left:
                t = next(chunks, None)
                if t is not None and not t.numel():
                    continue
                if t is None or t.dtype != dtype or t.numel() * t.element_size() > left:
                    raise ValueError(f"{path}: the data for {name} ({dtype}, {left} bytes to go) does not match its "
                                     f"header entry (got {None if t is None else (t.dtype, tuple(t.shape))})")
                f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
                left -= t.numel() * t.element_size()
        if any(t.numel() for t in chunks):
            raise ValueError(f"{path}: more data than the header describes")
        f.flush()
        os.fsync(f.fileno())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                 ) -> None:
    """``safetensors.torch.save_file``'s contract (a name -> tensor dict), streamed and fsynced."""
    write_safetensors(path, tensors.items(), metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (validated) file as its own copy, in file order: ``safetensors.torch.load_file``'s
    contract. To copy tensors straight into their destination without this intermediate, use ``SafetensorsFile``."""
    out = {}
    with SafetensorsFile(path) as f:
        for name in f.keys():
            out[name] = f.view(name).clone()
            f.release(name)
    return out


def _naturals(value: object) -> bool:
    """A JSON list of non-negative integers (JSON's true/false arrive as Python bools, which are ints: refused)."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
