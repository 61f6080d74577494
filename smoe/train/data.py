"""Training data: sources -> documents -> byte-level BPE -> cached token arrays -> packed, mixed batches.

A data spec is ``stdlib`` or ``PATH[@W][,PATH[@W]...]``: files or directories of ``.txt``, ``.jsonl`` (a text
field) and ``.parquet`` (a text column), or ``hf:NAME[:SPLIT]`` for a Hugging Face ``datasets`` dataset already in
the local cache. ``@W`` is a mixing weight. Every document keeps the name of the source it came from.

Tokenized splits are cached as ``.npy`` arrays (memory-mapped on load) under a key made of the inputs (paths,
sizes, mtimes, weights, options) and the tokenizer, so a rerun skips tokenization; cache entries are written to a
temporary directory and renamed, so an interrupted run never leaves a torn one.

The batch of step ``s`` is a pure function of ``(seed, s)``: resuming at any step reproduces the data order with no
iterator state to save.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

EOS = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".parquet")
CHUNK_BYTES = 16 * 1024  # .txt files without explicit separators are cut into documents of about this size
STDLIB_MAX_BYTES = 6 * 1024 * 1024  # the default corpus: enough text for tiny models, quick to tokenize
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
_FORMAT_VERSION = 1  # bump when document splitting or tokenization changes: it invalidates caches


@dataclass(frozen=True)
class Source:
    name: str  # the spec entry, e.g. "data/wiki.txt" or "stdlib"
    weight: float = 1.0


@dataclass
class Split:
    """One split (train or val): a token stream per source, each document followed by EOS."""

    tokens: dict[str, np.ndarray]  # source name -> token ids (uint16/uint32)
    n_bytes: dict[str, int]  # source name -> UTF-8 bytes of the split's text
    n_documents: dict[str, int]


@dataclass
class PreparedData:
    tokenizer: "tokenizers.Tokenizer"  # noqa: F821
    train: Split
    val: Split
    sources: list[Source]
    fingerprint: str  # identifies inputs + tokenizer; a resumed run must match
    eos_id: int = field(init=False)

    def __post_init__(self):
        self.eos_id = self.tokenizer.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]



# --- sources and documents ---------------------------------------------------------------------------------------


def parse_spec(spec: str) -> list[Source]:
    """``stdlib`` | ``PATH[@W][,...]`` | ``hf:NAME[:SPLIT]``; raises naming the bad entry."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("--data: empty data spec; give PATH[,PATH...] or stdlib")
    sources = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            raise ValueError(f"--data {spec!r}: empty entry between commas")
        name, weight = entry, 1.0
        if "@" in entry and not entry.startswith("hf:"):
            name, _, raw = entry.rpartition("@")
            try:
                weight = float(raw)
            except ValueError:
                raise ValueError(f"--data {entry!r}: weight after '@' must be a number, got {raw!r}") from None
            if not weight > 0 or weight == float("inf"):
                raise ValueError(f"--data {entry!r}: weight must be a positive number, got {raw}")
        if name != "stdlib" and not name.startswith("hf:"):
            path = Path(name)
            if not path.exists():
                raise FileNotFoundError(f"--data {name}: no such file or directory")
            if path.is_file() and path.suffix not in SUFFIXES:
                raise ValueError(f"--data {name}: unsupported file type {path.suffix!r} (supported: "
                                 f"{', '.join(SUFFIXES)})")
            if path.is_dir() and not _files_under(path):
                raise ValueError(f"--data {name}: directory holds no {', '.join(SUFFIXES)} files")
        if any(s.name == name for s in sources):
            raise ValueError(f"--data {name}: listed twice")
        sources.append(Source(name, weight))
    return sources


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def stdlib_files(max_bytes: int = STDLIB_MAX_BYTES) -> list[Path]:
    """The interpreter's standard-library sources, sorted, without test suites; the first ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP.intersection(path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    return files


def _source_files(source: Source) -> list[Path]:
    if source.name == "stdlib":
        return stdlib_files()
    if source.name.startswith("hf:"):
        return []
    return _files_under(Path(source.name))


def iter_documents(source: Source, text_field: str = "text") -> Iterator[str]:
    """The source's documents in a deterministic order."""
    if source.name == "stdlib":
        for path in stdlib_files():
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
        return
    if source.name.startswith("hf:"):
        yield from _hf_documents(source.name, text_field)
        return
    for path in _files_under(Path(source.name)):
        if path.suffix == ".txt":
            yield from split_text(path.read_text(encoding="utf-8", errors="replace"))
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield from _parquet_documents(path, text_field)


def split_text(text: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Documents of a plain-text file: split at ``<|endoftext|>`` when the file uses it (TinyStories); otherwise
    consecutive paragraphs (or lines) are grouped into documents of about ``chunk_bytes``, so a single large file
    still splits into train and validation by document."""
    if EOS in text:
        for doc in text.split(EOS):
            if doc.strip():
                yield doc.strip("\n")
        return
    sep = "\n\n" if "\n\n" in text else "\n"
    chunk: list[str] = []
    size = 0
    for unit in text.split(sep):
        chunk.append(unit)
        size += len(unit.encode("utf-8")) + len(sep)
        if size >= chunk_bytes:
            doc = sep.join(chunk)
            if doc.strip():
                yield doc
            chunk, size = [], 0
    doc = sep.join(chunk)
    if doc.strip():
        yield doc


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{line_no}: no string field {text_field!r} (set --text-field)")
            if record[text_field].strip():
                yield record[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow (pip install 'smoe[data]')") from None
    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
    for text in table.column(text_field).to_pylist():
        if isinstance(text, str) and text.strip():
            yield text


def _hf_documents(name: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {name}: needs the `datasets` library (pip install datasets)") from None
    _, dataset, *rest = name.split(":")
    split = rest[0] if rest else "train"
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # never download at run time
    try:
        ds = datasets.load_dataset(dataset, split=split)
    except Exception as err:  # datasets raises many types; all mean "not available offline"
        raise ValueError(f"--data {name}: not in the local datasets cache ({type(err).__name__})") from None
    if text_field not in ds.column_names:
        raise ValueError(f"--data {name}: no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    for text in ds[text_field]:
        if isinstance(text, str) and text.strip():
            yield text


# --- tokenizer ---------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) with one special token, EOS; deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (EOS: 0): byte-level BPE maps each symbol of a token to one byte, so
    summing over a text's tokens gives its exact byte count, for bits per byte."""
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, idx in tokenizer.get_vocab().items():
        lengths[idx] = 0 if token == EOS else len(token)
    return lengths


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises its own Exception subclass for bad files
        raise ValueError(f"--tokenizer {path}: not a readable tokenizer.json ({err})") from None
    if tokenizer.token_to_id(EOS) is None:
        tokenizer.add_special_tokens([EOS])
    return tokenizer


# --- preparation and cache ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("SMOE_CACHE", Path.home() / ".cache" / "smoe"))


def _input_key(sources: list[Source], text_field: str) -> list:
    """What identifies the inputs: resolved files with sizes and mtimes, weights, options."""
    key = []
    for s in sources:
        files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in _source_files(s)]
        key.append([s.name, s.weight, files])
    return [_FORMAT_VERSION, text_field, key]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def prepare_data(
    spec: str,
    *,
    val_spec: str | None = None,
    tokenizer: str | Path | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.02,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
    log=None,
) -> PreparedData:
    """Load, split, tokenize (training a tokenizer on the training split unless one is given) and cache."""
    sources = parse_spec(spec)
    val_sources = parse_spec(val_spec) if val_spec else None
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: must lie in (0, 1), got {val_fraction}")
    if tokenizer is None and not 256 < vocab_size <= 2**20:
        raise ValueError(f"vocab_size: must lie in (256, 1048576] for a byte-level BPE, got {vocab_size}")
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    inputs = [_input_key(sources, text_field), _input_key(val_sources, text_field) if val_sources else None,
              val_fraction if not val_sources else None, seed]
    tok_key = _hash(tok.to_str()) if tok is not None else f"bpe{vocab_size}"
    entry = cache / "data" / _hash([inputs, tok_key])
    if (entry / "meta.json").is_file():
        return _load_entry(entry, sources)
    log = log or (lambda msg: None)
    log(f"preparing data {spec!r} (cached under {entry})")
    train_docs, val_docs = _split_documents(sources, val_sources, val_fraction, seed, text_field)
    if tok is None:
        tok = train_tokenizer([d for docs in train_docs.values() for d in docs], vocab_size)
    train = _tokenize(tok, train_docs)
    val = _tokenize(tok, val_docs)
    _write_entry(entry, tok, train, val, sources, fingerprint=entry.name)
    return _load_entry(entry, sources)


def _split_documents(sources, val_sources, val_fraction, seed, text_field):
    """Per source, documents for train and val. Without a val spec, a seeded choice of whole documents."""
    train, val = {}, {}
    for index, source in enumerate(sources):
        docs = list(iter_documents(source, text_field))
        if not docs:
            raise ValueError(f"--data {source.name}: no text found (empty corpus)")
        if val_sources:
            train[source.name] = docs
            continue
        if len(docs) < 2:
            raise ValueError(f"--data {source.name}: a single document cannot be split into train and validation; "
                             "add text or give --val-data")
        n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
        chosen = set(np.random.default_rng([seed, index]).permutation(len(docs))[:n_val].tolist())
        train[source.name] = [d for i, d in enumerate(docs) if i not in chosen]
        val[source.name] = [d for i, d in enumerate(docs) if i in chosen]
    for source in val_sources or []:
        docs = list(iter_documents(source, text_field))
        if not docs:
            raise ValueError(f"--val-data {source.name}: no text found (empty corpus)")
        val[source.name] = docs
    return train, val


def _tokenize(tok, docs_by_source: dict[str, list[str]]) -> Split:
    eos = tok.token_to_id(EOS)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    tokens, n_bytes, n_docs = {}, {}, {}
    for name, docs in docs_by_source.items():
        encoded = tok.encode_batch(docs, add_special_tokens=False)
        total = sum(len(e.ids) + 1 for e in encoded)
        stream = np.empty(total, dtype=dtype)
        pos = 0
        for e in encoded:
            stream[pos:pos + len(e.ids)] = e.ids
            stream[pos + len(e.ids)] = eos
            pos += len(e.ids) + 1
        tokens[name], n_bytes[name], n_docs[name] = stream, sum(len(d.encode("utf-8")) for d in docs), len(docs)
    return Split(tokens, n_bytes, n_docs)


def _write_entry(entry: Path, tok, train: Split, val: Split, sources, fingerprint: str) -> None:
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {"splits": {}, "fingerprint": fingerprint, "sources": [s.name for s in sources]}
    for split_name, split in (("train", train), ("val", val)):
        meta["splits"][split_name] = []
        for i, (name, arr) in enumerate(split.tokens.items()):
            np.save(tmp / f"{split_name}_{i}.npy", arr)
            meta["splits"][split_name].append({"source": name, "file": f"{split_name}_{i}.npy",
                                               "bytes": split.n_bytes[name], "documents": split.n_documents[name]})
    (tmp / "tokenizer.json").write_text(tok.to_str())
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if entry.exists():  # a concurrent run finished first: keep its copy
        shutil.rmtree(tmp)
        return
    os.replace(tmp, entry)


def _load_entry(entry: Path, sources: list[Source]) -> PreparedData:
    from tokenizers import Tokenizer

    meta = json.loads((entry / "meta.json").read_text())
    splits = {}
    for split_name, items in meta["splits"].items():
        splits[split_name] = Split(
            tokens={it["source"]: np.load(entry / it["file"], mmap_mode="r") for it in items},
            n_bytes={it["source"]: it["bytes"] for it in items},
            n_documents={it["source"]: it["documents"] for it in items},
        )
    tok = Tokenizer.from_str((entry / "tokenizer.json").read_text())
    return PreparedData(tok, splits["train"], splits["val"], sources, meta["fingerprint"])


# --- batches -----------------------------------------------------------------------------------------------------


class BatchSampler:
    """Fixed-length sequences (seq_len inputs + the shifted targets) drawn as a pure function of (seed, step).

    Sources are interleaved by weight through a seeded pattern of ``PATTERN`` slots holding each source in
    proportion to its weight; within a source, sequences follow a seeded permutation that is redrawn every epoch.
    """

    PATTERN = 1024

    def __init__(self, split: Split, sources: list[Source], seq_len: int, batch_size: int, seed: int):
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.streams = [split.tokens[s.name] for s in sources]
        self.n_seqs = [(len(t) - 1) // seq_len for t in self.streams]
        for s, n in zip(sources, self.n_seqs):
            if n < 1:
                raise ValueError(f"--seq-len {seq_len}: source {s.name} has only {len(split.tokens[s.name])} "
                                 "training tokens, fewer than one sequence")
        self.source_of_slot, self.rank_of_slot, self.per_pattern = self._pattern([s.weight for s in sources])
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation): a pure cache

    def _pattern(self, weights: list[float]):
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        counts = np.maximum(1, np.floor(w * self.PATTERN)).astype(np.int64)
        while counts.sum() < self.PATTERN:  # largest remainder fills the rest
            counts[np.argmax(w * self.PATTERN - counts)] += 1
        slots = np.repeat(np.arange(len(w)), counts)
        slots = np.random.default_rng([self.seed, 7]).permutation(slots)
        rank = np.zeros_like(slots)
        seen = np.zeros(len(w), dtype=np.int64)
        for i, s in enumerate(slots):
            rank[i], seen[s] = seen[s], seen[s] + 1
        return slots, rank, counts

    def _sequence_index(self, source: int, k: int) -> int:
        n = self.n_seqs[source]
        epoch, pos = divmod(k, n)
        if self._perms.get(source, (None,))[0] != epoch:
            self._perms[source] = (epoch, np.random.default_rng([self.seed, source, epoch]).permutation(n))
        return int(self._perms[source][1][pos])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(inputs_BT, targets_BT, source index of each row) for ``step``."""
        rows, sources = [], []
        for g in range(step * self.batch_size, (step + 1) * self.batch_size):
            slot = g % self.PATTERN
            s = int(self.source_of_slot[slot])
            k = (g // self.PATTERN) * int(self.per_pattern[s]) + int(self.rank_of_slot[slot])
            start = self._sequence_index(s, k) * self.seq_len
            rows.append(np.asarray(self.streams[s][start:start + self.seq_len + 1], dtype=np.int64))
            sources.append(s)
        seqs = torch.from_numpy(np.stack(rows))
        return seqs[:, :-1], seqs[:, 1:], sources


def tokenize_documents(spec: str, tokenizer, text_field: str = "text") -> Split:
    """Every document of ``spec`` tokenized with ``tokenizer`` (no split, no cache): an evaluation set."""
    docs = {s.name: list(iter_documents(s, text_field)) for s in parse_spec(spec)}
    for name, found in docs.items():
        if not found:
            raise ValueError(f"--data {name}: no text found (empty corpus)")
    return _tokenize(tokenizer, docs)


def val_sequences(split: Split, seq_len: int, max_sequences: int) -> tuple[torch.Tensor, list[int]]:
    """Up to ``max_sequences`` non-overlapping sequences of seq_len + 1 tokens from the validation streams, source
    by source in order, and the source index of each: a fixed evaluation set."""
    rows, sources = [], []
    for s, stream in enumerate(split.tokens.values()):
        for j in range((len(stream) - 1) // seq_len):
            if len(rows) == max_sequences:
                break
            rows.append(np.asarray(stream[j * seq_len:j * seq_len + seq_len + 1], dtype=np.int64))
            sources.append(s)
    if not rows:
        raise ValueError(f"validation data: fewer than {seq_len + 1} tokens; add validation text or lower --seq-len")
    return torch.from_numpy(np.stack(rows)), sources


def val_batches(split: Split, seq_len: int, batch_size: int, max_batches: int) -> list[tuple[torch.Tensor, ...]]:
    """``val_sequences`` cut into (inputs, targets) batches."""
    seqs, _ = val_sequences(split, seq_len, batch_size * max_batches)
    return [(t[:, :-1], t[:, 1:]) for t in seqs.split(batch_size)]
