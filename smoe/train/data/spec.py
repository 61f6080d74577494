"""Data specs: ``stdlib`` or ``ENTRY[@W][,ENTRY[@W]...]`` parsed into weighted sources, and the files each names.

Errors start with the field the spec came from (``data`` or ``val_data``), for the command line to map to its flag.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUFFIXES = (".txt", ".jsonl", ".parquet")
STDLIB_MAX_BYTES = 16 * 1024 * 1024  # cap on the default corpus; CPython 3.11's, as filtered, is about 8.5 MiB
# test suites, IDE/demo code, and generated tables (codec maps, pydoc's topic dump) are not representative code
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__",
                "encodings", "pydoc_data", "__phello__"}


@dataclass(frozen=True)
class Source:
    name: str  # the spec entry, e.g. "data/wiki.txt", "stdlib" or "hf:roneneldan/TinyStories:validation"
    weight: float = 1.0


def parse_spec(spec: str, field: str = "data") -> list[Source]:
    """``stdlib`` | ``PATH[@W][,...]`` | ``hf:NAME[:SPLIT][@W]``. Checks that every path exists and holds supported
    files (and that pyarrow / datasets are importable where needed) before any reading; ``field`` (``data`` or
    ``val_data``) starts every message."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{field}: empty data spec; give PATH[,PATH...], hf:NAME or stdlib")
    sources: list[Source] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            raise ValueError(f"{field} {spec!r}: empty entry between commas")
        name, weight = _split_weight(entry, field)
        if name.startswith("hf:"):
            hf_parts(name, field)
            import_datasets(f"{field} {name}")
        elif name != "stdlib":
            path = Path(name).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"{field} {name}: no such file or directory")
            if path.is_file() and path.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{field} {name}: unsupported file type {path.suffix!r} (supported: "
                                 f"{', '.join(SUFFIXES)}; link or rename plain text as .txt)")
            files = files_under(path)
            if not files:
                raise ValueError(f"{field} {name}: directory holds no {', '.join(SUFFIXES)} files")
            for f in files:
                if f.suffix.lower() == ".parquet":
                    import_parquet(f)
        if any(s.name == name for s in sources):
            raise ValueError(f"{field} {name}: listed twice")
        sources.append(Source(name, weight))
    return sources


def _split_weight(entry: str, field: str) -> tuple[str, float]:
    """``name@W`` -> (name, W). An existing path that contains '@' is taken whole."""
    if "@" not in entry or Path(entry).expanduser().exists():
        return entry, 1.0
    name, _, raw = entry.rpartition("@")
    if not name:
        raise ValueError(f"{field} {entry!r}: nothing before the '@' weight")
    try:
        weight = float(raw)
    except ValueError:
        raise ValueError(f"{field} {entry!r}: weight after '@' must be a number, got {raw!r}") from None
    if not (weight > 0 and np.isfinite(weight)):
        raise ValueError(f"{field} {entry!r}: weight must be a positive finite number, got {raw}")
    return name, weight


def hf_parts(name: str, field: str = "data") -> tuple[str, str | None, str]:
    """``hf:NAME`` | ``hf:NAME:SPLIT`` | ``hf:NAME:CONFIG:SPLIT`` -> (name, config, split); the split defaults to
    train."""
    parts = name[len("hf:"):].split(":")
    if len(parts) > 3 or not all(parts):
        raise ValueError(f"{field} {name}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    return parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else "train"


def import_datasets(where: str):
    """The ``datasets`` module; ``where`` (the field and entry asking for it) starts the error when it is missing."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{where}: hf: sources need the `datasets` library (pip install datasets)") from None
    return datasets


def import_parquet(path: Path):
    """``pyarrow.parquet``; the error when it is missing names the .parquet file that needs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow (pip install 'smoe[data]')") from None
    return pq


def files_under(path: Path) -> list[Path]:
    """A file itself, or a directory's supported files (hidden ones skipped) sorted by relative path."""
    if path.is_file():
        return [path]
    found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def stdlib_files(max_bytes: int = STDLIB_MAX_BYTES) -> list[Path]:
    """The running interpreter's standard-library ``.py`` files, sorted by relative path, without test suites,
    IDE/demo code and generated tables; the sorted prefix that fits in ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]  # prune: site-packages alone can be huge
        found += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    files, total = [], 0
    for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


def source_files(source: Source) -> list[Path]:
    """The files a source reads, in reading order; none for an hf: dataset."""
    if source.name == "stdlib":
        return stdlib_files()
    if source.name.startswith("hf:"):
        return []
    return files_under(Path(source.name).expanduser())
