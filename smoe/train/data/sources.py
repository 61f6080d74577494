"""Reading a source's documents: plain text split into documents, .jsonl and .parquet text fields, and Hugging Face
``datasets`` loaded offline from the local cache."""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from smoe.io.files import parse_json
from smoe.io.tokenizer import EOS
from smoe.train.data.spec import Source, hf_parts, import_datasets, import_parquet, source_files, stdlib_files

TXT_DOC_BYTES = 16 * 1024  # long .txt documents are cut (at paragraph, else line, boundaries) to about this size


def iter_documents(source: Source, text_field: str = "text") -> Iterator[str]:
    """The source's documents (non-blank texts) in a deterministic order."""
    if source.name == "stdlib":
        for path in stdlib_files():
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
        return
    if source.name.startswith("hf:"):
        yield from _hf_documents(source.name, text_field)
        return
    for path in source_files(source):
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield from split_text(path.read_text(encoding="utf-8", errors="replace"))
        elif suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield from _parquet_documents(path, text_field)


def split_text(text: str, max_bytes: int = TXT_DOC_BYTES) -> Iterator[str]:
    """Documents of a plain-text file. A file that uses ``<|endoftext|>`` (TinyStories) is split there; otherwise
    at two or more empty lines in a row. Pieces longer than ``max_bytes`` are cut at paragraph (else line)
    boundaries, so that one large file still splits into train and validation by document."""
    if EOS in text:
        pieces = [p.strip("\n") for p in text.split(EOS)]
    else:
        pieces = re.split(r"\n{3,}", text)
    for piece in pieces:
        for doc in _cut(piece, max_bytes):
            if doc.strip():
                yield doc


def _cut(text: str, max_bytes: int, seps: tuple[str, ...] = ("\n\n", "\n")) -> Iterator[str]:
    """Consecutive units (split at ``seps[0]``) grouped into pieces of at most ``max_bytes``; a unit that is too
    long alone is cut at the next separator, and a line that is too long at character boundaries."""
    if len(text.encode("utf-8")) <= max_bytes:
        yield text
        return
    if not seps:
        for i in range(0, len(text), max_bytes):
            yield text[i:i + max_bytes]
        return
    sep, rest = seps[0], seps[1:]
    group: list[str] = []
    size = 0
    for unit in text.split(sep):
        n = len(unit.encode("utf-8")) + len(sep)
        if group and size + n > max_bytes:
            yield sep.join(group)
            group, size = [], 0
        if n > max_bytes:
            yield from _cut(unit, max_bytes, rest)
            continue
        group.append(unit)
        size += n
    if group:
        yield sep.join(group)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = parse_json(line, f"{path}:{line_no}")
            if not isinstance(record.get(text_field), str):
                raise ValueError(f"text_field {text_field!r}: {path}:{line_no} has no string field of that name")
            if record[text_field].strip():
                yield record[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    pq = import_parquet(path)
    import pyarrow as pa

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from None
    if text_field not in schema.names:
        raise ValueError(f"text_field {text_field!r}: {path} has no such column (columns: "
                         f"{', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_field!r} holds {kind}, not text")
    for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None and text.strip():
                yield text


@contextmanager
def _hf_offline(name: str):
    """Force Hugging Face offline mode: a dataset must already be in the local cache. Sets the environment (read by
    ``datasets`` at import) and the already-imported modules' flags, restoring both afterwards."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in names}
    os.environ.update(dict.fromkeys(names, "1"))
    patched = []
    try:
        datasets = import_datasets(name)
        for module in (getattr(datasets, "config", None), sys.modules.get("huggingface_hub.constants")):
            for attr in names:
                if module is not None and hasattr(module, attr):
                    patched.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, True)
        yield datasets
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_hf(name: str):
    """The ``datasets`` dataset of an ``hf:`` source, from the local cache only (nothing is downloaded)."""
    dataset, config, split = hf_parts(name)
    with _hf_offline(name) as datasets:
        try:
            return datasets.load_dataset(dataset, config, split=split)
        except Exception as err:  # datasets raises many types; all mean "not usable from the local cache"
            raise ValueError(f"{name}: not loadable offline from the local Hugging Face cache "
                             f"({type(err).__name__}: {str(err)[:200]})") from None


def _hf_documents(name: str, text_field: str) -> Iterator[str]:
    ds = load_hf(name)
    if text_field not in ds.column_names:
        raise ValueError(f"text_field {text_field!r}: {name} has no such column (columns: "
                         f"{', '.join(ds.column_names)})")
    for batch in ds.iter(batch_size=1024):
        for text in batch[text_field]:
            if isinstance(text, str) and text.strip():
                yield text
