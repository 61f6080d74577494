"""Preparing data: the held-out split, tokenization, and the cache of both.

Tokenized splits are cached as ``.npy`` arrays (memory-mapped on load) under a key made of the inputs (resolved paths,
sizes, mtimes, weights, options) and the tokenizer, so a rerun skips tokenization; a trained tokenizer is cached the
same way. A cache entry is written under a temporary name, fsynced and renamed, so an interrupted run never leaves a
torn one; an entry that cannot be read all the same is a miss, and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from smoe.io.files import atomic_write_text, fsync, read_json
from smoe.io.tokenizer import EOS, load_tokenizer, tokenizer_from_str
from smoe.train.data.sources import TXT_DOC_BYTES, iter_documents, load_hf
from smoe.train.data.spec import Source, parse_spec, source_files
from smoe.train.data.tokenizer import train_tokenizer

MIN_VAL_BYTES = 128 * 1024  # held-out text per source, at least (but never more than a tenth of the source)
DEFAULT_VAL_FRACTION = 0.02  # held-out share of each source's bytes
_FORMAT_VERSION = 3  # bump when document splitting, the split or tokenization changes: it invalidates caches
_ENCODE_CHUNK = 1024  # documents per encode_batch call: bounds the memory of tokenizers' Encoding objects
# how a damaged cache entry fails to load: missing or unreadable files, bad JSON, a meta.json of the wrong shape
_UNREADABLE = (OSError, ValueError, LookupError, TypeError)


@dataclass
class Split:
    """One split (train or val): a token stream per source, each document followed by EOS."""

    tokens: dict[str, np.ndarray]  # source name -> token ids (uint16/uint32, memory-mapped when loaded from cache)
    n_bytes: dict[str, int]  # source name -> UTF-8 bytes of the split's documents (separators not counted)
    n_documents: dict[str, int]

    @property
    def source_names(self) -> list[str]:
        return list(self.tokens)

    @property
    def total_tokens(self) -> int:
        return sum(len(t) for t in self.tokens.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.n_bytes.values())


@dataclass
class PreparedData:
    tokenizer: "tokenizers.Tokenizer"  # noqa: F821
    train: Split
    val: Split
    sources: list[Source]  # the training sources, in spec order (their index is the sampler's source index)
    fingerprint: str  # identifies inputs + split + tokenizer content; a resumed run must match
    eos_id: int = field(init=False)

    def __post_init__(self):
        self.eos_id = self.tokenizer.token_to_id(EOS)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SMOE_CACHE") or Path.home() / ".cache" / "smoe")


def _input_key(sources: list[Source], text_field: str) -> list:
    """What identifies the inputs: per source its name, weight and resolved files with sizes and mtimes (an hf:
    dataset: its cache fingerprint)."""
    key = []
    for s in sources:
        if s.name.startswith("hf:"):
            files = getattr(load_hf(s.name), "_fingerprint", None)
        else:
            files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in source_files(s)]
        key.append([s.name, s.weight, files])
    return [text_field, key]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _check_disjoint(sources: list[Source], val_sources: list[Source]) -> None:
    train_files = {p.resolve(): s.name for s in sources for p in source_files(s)}
    train_names = {s.name for s in sources}
    for v in val_sources:
        if v.name.startswith("hf:") and v.name in train_names:
            raise ValueError(f"val_data {v.name}: also training data; validation text must be held out")
        for p in source_files(v):
            if p.resolve() in train_files:
                raise ValueError(f"val_data {v.name}: {p} is also training data (in data "
                                 f"{train_files[p.resolve()]}); validation text must be held out")


def prepare_data(
    spec: str,
    *,
    val_spec: str | None = None,
    tokenizer: str | Path | None = None,
    vocab_size: int = 8192,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
    log: Callable[[str], None] | None = None,
) -> PreparedData:
    """Load, split, tokenize (training a BPE tokenizer on the training split unless ``tokenizer`` names a
    tokenizer.json) and cache.

    Without ``val_spec``, each source holds out a seeded choice of whole documents: ``val_fraction`` of its bytes,
    at least ``MIN_VAL_BYTES`` (but never more than a tenth of the source), and at least one document. With
    ``val_spec``, all of it is validation and ``seed`` / ``val_fraction`` play no part.
    """
    sources = parse_spec(spec, "data")
    val_sources = parse_spec(val_spec, "val_data") if val_spec else None
    if val_sources:
        _check_disjoint(sources, val_sources)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: must lie in (0, 1), got {val_fraction}")
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    if tokenizer is None and not 256 < vocab_size <= 2**20:
        raise ValueError(f"vocab_size: must lie in (256, 1048576] for a byte-level BPE, got {vocab_size}")
    tok = _given_tokenizer(tokenizer) if tokenizer is not None else None
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    log = log or (lambda msg: None)

    # The train split depends on the inputs and, without a val spec, on the split settings; the tokenizer trained
    # on it on those and the vocab size; the cache entry on all of that, the val inputs and the tokenizer.
    split_key = [_FORMAT_VERSION, _input_key(sources, text_field),
                 [val_fraction, seed, MIN_VAL_BYTES, TXT_DOC_BYTES] if not val_sources else "all"]
    docs = None
    if tok is None:  # the tokenizer trained on this split, cached by what it was trained on
        tok_file = cache / "tokenizers" / f"{_hash([split_key, 'bpe', vocab_size])}.json"
        tok = _cached_tokenizer(tok_file)
        if tok is None:
            docs = _split_documents(sources, val_sources, val_fraction, seed, text_field)
            log(f"training a {vocab_size}-token byte-level BPE tokenizer")
            tok = train_tokenizer((d for source_docs in docs[0].values() for d in source_docs), vocab_size)
            atomic_write_text(tok_file, tok.to_str())
    # The entry is keyed by the tokenizer's content: a trained tokenizer saved and passed back as a file (as every
    # run of a head-to-head does) finds the entry its training wrote.
    entry_key = _hash([split_key, _input_key(val_sources, text_field) if val_sources else None, _hash(tok.to_str())])
    entry = cache / "data" / entry_key
    if entry.exists():
        try:
            return _load_entry(entry, sources)
        except _UNREADABLE:
            log(f"cache entry {entry} is damaged; preparing it again")
            shutil.rmtree(entry, ignore_errors=True)

    log(f"preparing data {spec!r} (cached under {entry})")
    train_docs, val_docs = docs or _split_documents(sources, val_sources, val_fraction, seed, text_field)
    log("tokenizing")
    train = _tokenize(tok, train_docs)
    val = _tokenize(tok, val_docs)
    _write_entry(entry, tok, train, val, sources, _content_fingerprint(tok, train, val, sources))
    return _load_entry(entry, sources)


def _content_fingerprint(tok, train: Split, val: Split, sources: list[Source]) -> str:
    """What a resumed run must find again: the tokenizer, every token of both splits, and each source's name and
    weight. Not the files' sizes and times, which key the cache: a corpus touched, copied back or unpacked again with
    the same text resumes."""
    digest = hashlib.sha256(tok.to_str().encode())
    digest.update(json.dumps([[s.name, s.weight] for s in sources]).encode())
    for split in (train, val):
        for name, tokens in split.tokens.items():
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(tokens).tobytes())
    return digest.hexdigest()[:20]


def _given_tokenizer(path: str | Path):
    """smoe.io.tokenizer.load_tokenizer, with ``tokenizer`` (the field) leading its error."""
    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"tokenizer {err}") from None


def _cached_tokenizer(file: Path):
    """The trained tokenizer cached in ``file``, or None when there is none or it cannot be read (then it is trained
    again and rewritten)."""
    try:
        return tokenizer_from_str(file.read_text(encoding="utf-8"), file)
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _held_out(docs: list[str], val_fraction: float, rng: np.random.Generator) -> list[int]:
    """Indices (ascending) of the documents held out for validation: taken in a seeded random order until they hold
    the target bytes, skipping documents that would overshoot it twofold."""
    sizes = [len(d.encode("utf-8")) for d in docs]
    total = sum(sizes)
    target = max(val_fraction * total, min(MIN_VAL_BYTES, total / 10))
    chosen, got = [], 0
    for i in rng.permutation(len(docs)).tolist():
        if got >= target:
            break
        if got + sizes[i] <= 2 * target:
            chosen.append(i)
            got += sizes[i]
    if not chosen:  # every document is too big: hold out the smallest
        chosen = [min(range(len(docs)), key=lambda i: (sizes[i], i))]
    if len(chosen) == len(docs):  # keep at least one training document
        chosen.pop()
    return sorted(chosen)


def _name_seed(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def _split_documents(sources, val_sources, val_fraction, seed, text_field):
    """Per source, the documents for train and for val, each in corpus order."""
    train, val = {}, {}
    for source in sources:
        docs = list(iter_documents(source, text_field))
        if not docs:
            raise ValueError(f"data {source.name}: no text found (empty corpus)")
        if val_sources:
            train[source.name] = docs
            continue
        if len(docs) < 2:
            raise ValueError(f"data {source.name}: a single document cannot be split into train and validation; "
                             "add text or give val_data")
        held = set(_held_out(docs, val_fraction, np.random.default_rng([seed, 3, _name_seed(source.name)])))
        train[source.name] = [d for i, d in enumerate(docs) if i not in held]
        val[source.name] = [d for i, d in enumerate(docs) if i in held]
    for source in val_sources or []:
        docs = list(iter_documents(source, text_field))
        if not docs:
            raise ValueError(f"val_data {source.name}: no text found (empty corpus)")
        val[source.name] = docs
    return train, val


def _tokenize(tok, docs_by_source: dict[str, list[str]]) -> Split:
    """One stream per source: each document's ids followed by EOS."""
    eos = np.array([tok.token_to_id(EOS)])
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    tokens, n_bytes, n_docs = {}, {}, {}
    for name, docs in docs_by_source.items():
        parts = []
        for i in range(0, len(docs), _ENCODE_CHUNK):
            for e in tok.encode_batch(docs[i:i + _ENCODE_CHUNK], add_special_tokens=False):
                parts += [np.asarray(e.ids, dtype=dtype), eos.astype(dtype)]
        tokens[name] = np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
        n_bytes[name] = sum(len(d.encode("utf-8")) for d in docs)
        n_docs[name] = len(docs)
    return Split(tokens, n_bytes, n_docs)


def _write_entry(entry: Path, tok, train: Split, val: Split, sources, fingerprint: str) -> None:
    """Write into a temporary directory, fsync its files, then rename it to ``entry`` in one step. (Not
    smoe.io.files.atomic_directory: when a concurrent run renamed its identical entry into place first, that one is
    kept and this copy dropped.)"""
    tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        meta = {"format": _FORMAT_VERSION, "fingerprint": fingerprint, "sources": [s.name for s in sources],
                "splits": {}}
        for split_name, split in (("train", train), ("val", val)):
            meta["splits"][split_name] = []
            for i, (name, arr) in enumerate(split.tokens.items()):
                np.save(tmp / f"{split_name}_{i}.npy", arr)
                meta["splits"][split_name].append({"source": name, "file": f"{split_name}_{i}.npy",
                                                   "bytes": split.n_bytes[name],
                                                   "documents": split.n_documents[name]})
        (tmp / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for f in tmp.iterdir():
            fsync(f)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not a concurrent run finishing first: a real failure
                raise
        fsync(entry.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_entry(entry: Path, sources: list[Source]) -> PreparedData:
    """The cache entry; raises one of ``_UNREADABLE`` when it is damaged."""
    meta = read_json(entry / "meta.json")
    splits = {}
    for split_name, items in meta["splits"].items():
        splits[split_name] = Split(
            tokens={it["source"]: np.load(entry / it["file"], mmap_mode="r") for it in items},
            n_bytes={it["source"]: it["bytes"] for it in items},
            n_documents={it["source"]: it["documents"] for it in items},
        )
    tok_file = entry / "tokenizer.json"
    tok = tokenizer_from_str(tok_file.read_text(encoding="utf-8"), tok_file)
    return PreparedData(tok, splits["train"], splits["val"], sources, meta["fingerprint"])


def tokenize_documents(spec: str, tokenizer, text_field: str = "text") -> Split:
    """Every document of ``spec`` tokenized with ``tokenizer`` (no split, no cache): an evaluation set."""
    docs = {s.name: list(iter_documents(s, text_field)) for s in parse_spec(spec)}
    for name, found in docs.items():
        if not found:
            raise ValueError(f"data {name}: no text found (empty corpus)")
    return _tokenize(tokenizer, docs)
