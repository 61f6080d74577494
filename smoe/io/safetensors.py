"""Tensor-by-tensor safetensors I/O, so that loading and exporting a model never holds a second copy of it.

The ``safetensors`` package reads a tensor into a fresh allocation and writes a whole dict at once; here a reader
exposes each tensor as a zero-copy view of a memory map (copied straight into its destination, then its pages are
released from this process's resident set), and a writer streams tensors to disk one at a time. The format is the
published one: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` padded
with spaces to a multiple of 8 bytes, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterable

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsFile:
    """The header of one ``.safetensors`` file, validated on open (every tensor lies inside the file), and
    zero-copy views of its tensors. Use as a context manager; views die with it."""

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
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{self.path}: unreadable safetensors header ({err})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{self.path}: {name} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if end - begin != dtype.itemsize * _numel(shape):
                raise ValueError(f"{self.path}: {name} has {end - begin} bytes for shape {list(shape)}")
            if self._start + end > size:
                raise ValueError(f"{self.path}: truncated; {name} ends at byte {self._start + end} of {size}")
            self._entries[name] = (dtype, shape, self._start + begin, self._start + end)
        # In file order, so that streaming every tensor reads the file front to back.
        self._entries = dict(sorted(self._entries.items(), key=lambda item: item[1][2]))
        self._file = None
        self._map: mmap.mmap | None = None

    def keys(self):
        return self._entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

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


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]
                      ) -> None:
    """Write ``(name, tensor)`` pairs, streaming one tensor at a time. ``tensors`` is iterated twice (header, then
    data), so pass a list or a re-iterable of cheap views."""
    tensors = list(tensors)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _NAMES:
            raise ValueError(f"{path}: {name} has dtype {t.dtype}, which safetensors cannot hold")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in tensors:
            if t.numel():
                f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
