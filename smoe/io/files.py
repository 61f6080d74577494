"""Atomic writes and checked JSON reads.

A file or directory is written under a temporary name beside its destination, fsynced, then renamed over it, so a
crash at any moment leaves either the old content or the new, never a torn file; the parent directory is fsynced
after the rename so the rename itself survives a power cut.

JSON read from disk is untrusted: ``read_json`` turns every way it can be wrong (unreadable, not UTF-8, not JSON,
nested too deep, the wrong type at the top) into one ``ValueError`` naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def fsync(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) in one step; creates the parent directory."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=indent))


def check_fresh_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` if it does not exist or is an empty directory; else raises (nothing is written)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{what} {path}: exists and is not empty; choose a new directory (nothing was written)")
    return path


def check_writable(path: str | Path, what: str = "--out") -> Path:
    """``path`` if it is a directory this process can write in, or, when it does not exist, one it could create:
    a probe file is written and removed in it or in its nearest existing ancestor. Nothing is left behind, so a
    command that fails later has written nothing."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: not writable ({existing} is not a directory)")
    probe = existing / f".write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{what} {path}: not writable ({err.strerror or err})") from None
    return path


@contextlib.contextmanager
def atomic_directory(out: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block finishes (every file in it fsynced first);
    on an error it is removed, as are the parent directories made for it, and ``out`` is untouched. ``out`` must not
    exist or be empty, unless ``replace``:
    then an existing ``out`` is swapped for the new one only once that is complete."""
    out = Path(out)
    if not replace:
        check_fresh_dir(out)
    tmp = _temporary(out)
    shutil.rmtree(tmp, ignore_errors=True)
    made = [p for p in out.parents if not p.exists()]  # parents this call creates, deepest first
    tmp.mkdir(parents=True)
    done = False
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync(f)
        if out.exists():
            if replace:
                shutil.rmtree(out)
            else:
                out.rmdir()  # empty, checked above
        os.replace(tmp, out)
        fsync(out.parent)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:  # a failure leaves no directory behind, not even the parents made for it
            for parent in made:
                with contextlib.suppress(OSError):
                    parent.rmdir()


def parse_json(text: str | bytes, where: str, expect: type | tuple[type, ...] = dict) -> Any:
    """``text`` parsed as JSON whose top level is ``expect``; one ``ValueError`` naming ``where`` otherwise."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text)
    except RecursionError:  # json's C parser counts its depth against the recursion limit
        raise ValueError(f"{where}: not valid JSON (nested too deep)") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(value, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        kinds = {"dict": "an object", "list": "an array", "str": "a string", "int": "an integer",
                 "float": "a number"}
        raise ValueError(f"{where}: expected {kinds.get(names, names)} at the top level, got "
                         f"{kinds.get(type(value).__name__, type(value).__name__)}")
    return value


def read_json(path: str | Path, expect: type | tuple[type, ...] = dict) -> Any:
    """The JSON file ``path`` (an object by default), or one ``ValueError`` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as err:
        raise ValueError(f"{path}: unreadable ({err.strerror or err})") from None
    return parse_json(data, str(path), expect)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
