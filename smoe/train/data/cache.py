"""Training data: sources -> documents -> byte-level BPE -> cached token arrays -> packed, mixed batches.

A data spec is ``stdlib`` or ``ENTRY[@W][,ENTRY[@W]...]`` where an entry is a file or a directory (searched
recursively, in sorted order) of ``.txt``, ``.jsonl`` (a text field per line) and ``.parquet`` (a text column), or
``hf:NAME[:SPLIT]`` / ``hf:NAME:CONFIG:SPLIT`` for a Hugging Face ``datasets`` dataset already in the local cache
(loaded offline: nothing is downloaded). ``@W`` is a mixing weight (default 1). Every document keeps the name of the
entry it came from, so results can be broken down by source.

Tokenized splits are cached as ``.npy`` arrays (memory-mapped on load) under a key made of the inputs (resolved paths,
sizes, mtimes, weights, options) and the tokenizer, so a rerun skips tokenization; a trained tokenizer is cached the
same way. Cache entries are written under a temporary name and renamed, so an interrupted run never leaves a torn one.

The batch of step ``s`` is a pure function of ``(seed, s)``: resuming at any step reproduces the data order with no
iterator state to save.

Shapes: B batch (sequences), T sequence length (tokens), N sequences.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from smoe.eval.metrics import bits_per_byte  # noqa: F401  (re-exported: BPB belongs with the byte counts here)

EOS = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_DOC_BYTES = 16 * 1024  # long .txt documents are cut (at paragraph, else line, boundaries) to about this size
MIN_VAL_BYTES = 128 * 1024  # held-out text per source, at least (but never more than a tenth of the source)
STDLIB_MAX_BYTES = 16 * 1024 * 1024  # cap on the default corpus; CPython 3.11's, as filtered, is about 8.5 MiB
# test suites, IDE/demo code, and generated tables (codec maps, pydoc's topic dump) are not representative code
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__",
                "encodings", "pydoc_data", "__phello__"}
_FORMAT_VERSION = 2  # bump when document splitting, the split or tokenization changes: it invalidates caches
_ENCODE_CHUNK = 1024  # documents per encode_batch call: bounds the memory of tokenizers' Encoding objects


@dataclass(frozen=True)
class Source:
    name: str  # the spec entry, e.g. "data/wiki.txt", "stdlib" or "hf:roneneldan/TinyStories:validation"
    weight: float = 1.0


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the Source name it came from


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

    def scaled_bytes(self, n_tokens: int) -> int:
        """UTF-8 bytes of the split's text that ``n_tokens`` of its tokens stand for, assuming the evaluated part is
        typical of the whole (bytes scaled by the fraction of tokens): use it for bits per byte when evaluation covers
        only part of the split and the tokenizer is not byte-level. For byte-level BPE ``token_byte_lengths`` gives
        the exact count instead."""
        return round(self.total_bytes * n_tokens / max(self.total_tokens, 1))


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
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def val_bytes(self) -> int:
        return self.val.total_bytes

    @property
    def val_tokens(self) -> int:
        return self.val.total_tokens


# --- the spec ------------------------------------------------------------------------------------------------------


def parse_spec(spec: str, flag: str = "--data") -> list[Source]:
    """``stdlib`` | ``PATH[@W][,...]`` | ``hf:NAME[:SPLIT][@W]``. Checks that every path exists and holds supported
    files (and that pyarrow / datasets are importable where needed) before any reading; ``flag`` names the option in
    messages."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{flag}: empty data spec; give PATH[,PATH...], hf:NAME or stdlib")
    sources: list[Source] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            raise ValueError(f"{flag} {spec!r}: empty entry between commas")
        name, weight = _split_weight(entry, flag)
        if name.startswith("hf:"):
            _hf_parts(name, flag)
            _import_datasets(name, flag)
        elif name != "stdlib":
            path = Path(name).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"{flag} {name}: no such file or directory")
            if path.is_file() and path.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{flag} {name}: unsupported file type {path.suffix!r} (supported: "
                                 f"{', '.join(SUFFIXES)}; link or rename plain text as .txt)")
            files = _files_under(path)
            if not files:
                raise ValueError(f"{flag} {name}: directory holds no {', '.join(SUFFIXES)} files")
            for f in files:
                if f.suffix.lower() == ".parquet":
                    _import_parquet(f)
        if any(s.name == name for s in sources):
            raise ValueError(f"{flag} {name}: listed twice")
        sources.append(Source(name, weight))
    return sources


def _split_weight(entry: str, flag: str) -> tuple[str, float]:
    """``name@W`` -> (name, W). An existing path that contains '@' is taken whole."""
    if "@" not in entry or Path(entry).expanduser().exists():
        return entry, 1.0
    name, _, raw = entry.rpartition("@")
    if not name:
        raise ValueError(f"{flag} {entry!r}: nothing before the '@' weight")
    try:
        weight = float(raw)
    except ValueError:
        raise ValueError(f"{flag} {entry!r}: weight after '@' must be a number, got {raw!r}") from None
    if not (weight > 0 and np.isfinite(weight)):
        raise ValueError(f"{flag} {entry!r}: weight must be a positive finite number, got {raw}")
    return name, weight


def _files_under(path: Path) -> list[Path]:
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


def _source_files(source: Source) -> list[Path]:
    if source.name == "stdlib":
        return stdlib_files()
    if source.name.startswith("hf:"):
        return []
    return _files_under(Path(source.name).expanduser())


# --- documents -----------------------------------------------------------------------------------------------------


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
    for path in _source_files(source):
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield from split_text(path.read_text(encoding="utf-8", errors="replace"))
        elif suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        else:
            yield from _parquet_documents(path, text_field)


def load_documents(sources: list[Source], text_field: str = "text") -> list[Document]:
    """Every document of every source, in spec order, each tagged with its source name."""
    return [Document(text, s.name) for s in sources for text in iter_documents(s, text_field)]


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
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{line_no}: no string field {text_field!r} (set --text-field)")
            if record[text_field].strip():
                yield record[text_field]


def _import_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow (pip install 'smoe[data]')") from None
    return pq


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    pq = _import_parquet(path)
    import pyarrow as pa

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from None
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}; set --text-field)")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_field!r} holds {kind}, not text")
    for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None and text.strip():
                yield text


def _hf_parts(name: str, flag: str = "--data") -> tuple[str, str | None, str]:
    """``hf:NAME`` | ``hf:NAME:SPLIT`` | ``hf:NAME:CONFIG:SPLIT`` -> (name, config, split); the split defaults to
    train."""
    parts = name[len("hf:"):].split(":")
    if len(parts) > 3 or not all(parts):
        raise ValueError(f"{flag} {name}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    return parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else "train"


def _import_datasets(name: str, flag: str = "--data"):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{flag} {name}: hf: sources need the `datasets` library (pip install datasets)") from None
    return datasets


@contextmanager
def _hf_offline():
    """Force Hugging Face offline mode: a dataset must already be in the local cache. Sets the environment (read by
    ``datasets`` at import) and the already-imported modules' flags, restoring both afterwards."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in names}
    os.environ.update(dict.fromkeys(names, "1"))
    patched = []
    try:
        datasets = _import_datasets("hf:")
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


def _load_hf(name: str, flag: str = "--data"):
    dataset, config, split = _hf_parts(name, flag)
    _import_datasets(name, flag)
    with _hf_offline() as datasets:
        try:
            return datasets.load_dataset(dataset, config, split=split)
        except Exception as err:  # datasets raises many types; all mean "not usable from the local cache"
            raise ValueError(f"{flag} {name}: not loadable offline from the local Hugging Face cache "
                             f"({type(err).__name__}: {str(err)[:200]})") from None


def _hf_documents(name: str, text_field: str) -> Iterator[str]:
    ds = _load_hf(name)
    if text_field not in ds.column_names:
        raise ValueError(f"--data {name}: no column {text_field!r} (columns: {', '.join(ds.column_names)}; "
                         "set --text-field)")
    for batch in ds.iter(batch_size=1024):
        for text in batch[text_field]:
            if isinstance(text, str) and text.strip():
                yield text


# --- tokenizer -----------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) with one special token, EOS; deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path):
    """A ``tokenizer.json``; EOS is added as a special token when the file lacks it."""
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {path}: no such file")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for bad files
        raise ValueError(f"--tokenizer {path}: not a readable tokenizer.json ({err})") from None
    if tokenizer.token_to_id(EOS) is None:
        tokenizer.add_special_tokens([EOS])
    return tokenizer


def _is_byte_level(tokenizer) -> bool:
    spec = json.loads(tokenizer.to_str())

    def has(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(spec.get("pre_tokenizer")) or has(spec.get("decoder"))


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for; special tokens (EOS) count 0. Exact for byte-level BPE (every symbol of
    a token is one byte), so summing over a text's tokens gives its byte count, for bits per byte. For other
    tokenizers an approximation (sentencepiece's '▁' and <0xNN> byte tokens count one byte each)."""
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    added = tokenizer.get_added_tokens_decoder()
    byte_level = _is_byte_level(tokenizer)
    for token, idx in tokenizer.get_vocab().items():
        if idx in added:
            lengths[idx] = 0 if added[idx].special else len(added[idx].content.encode("utf-8"))
        elif byte_level:
            lengths[idx] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            lengths[idx] = 1
        else:
            lengths[idx] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


# --- preparation and cache -----------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("SMOE_CACHE") or Path.home() / ".cache" / "smoe")


def _input_key(sources: list[Source], text_field: str) -> list:
    """What identifies the inputs: per source its name, weight and resolved files with sizes and mtimes (an hf:
    dataset: its cache fingerprint)."""
    key = []
    for s in sources:
        if s.name.startswith("hf:"):
            files = getattr(_load_hf(s.name), "_fingerprint", None)
        else:
            files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in _source_files(s)]
        key.append([s.name, s.weight, files])
    return [text_field, key]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _check_disjoint(sources: list[Source], val_sources: list[Source]) -> None:
    train_files = {p.resolve(): s.name for s in sources for p in _source_files(s)}
    train_names = {s.name for s in sources}
    for v in val_sources:
        if v.name.startswith("hf:") and v.name in train_names:
            raise ValueError(f"--val-data {v.name}: also training data; validation text must be held out")
        for p in _source_files(v):
            if p.resolve() in train_files:
                raise ValueError(f"--val-data {v.name}: {p} is also training data (in --data "
                                 f"{train_files[p.resolve()]}); validation text must be held out")


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
    log: Callable[[str], None] | None = None,
) -> PreparedData:
    """Load, split, tokenize (training a BPE tokenizer on the training split unless ``tokenizer`` names a
    tokenizer.json) and cache.

    Without ``val_spec``, each source holds out a seeded choice of whole documents: ``val_fraction`` of its bytes,
    at least ``MIN_VAL_BYTES`` (but never more than a tenth of the source), and at least one document. With
    ``val_spec``, all of it is validation and ``seed`` / ``val_fraction`` play no part.
    """
    sources = parse_spec(spec, "--data")
    val_sources = parse_spec(val_spec, "--val-data") if val_spec else None
    if val_sources:
        _check_disjoint(sources, val_sources)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: must lie in (0, 1), got {val_fraction}")
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    if tokenizer is None and not 256 < vocab_size <= 2**20:
        raise ValueError(f"vocab_size: must lie in (256, 1048576] for a byte-level BPE, got {vocab_size}")
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    log = log or (lambda msg: None)

    # The train split depends on the inputs and, without a val spec, on the split settings; the tokenizer trained
    # on it on those and the vocab size; the cache entry on all of that, the val inputs and the tokenizer.
    split_key = [_FORMAT_VERSION, _input_key(sources, text_field),
                 [val_fraction, seed, MIN_VAL_BYTES, TXT_DOC_BYTES] if not val_sources else "all"]
    tok_train_key = _hash([split_key, "bpe", vocab_size])
    tok_id = _hash(tok.to_str()) if tok is not None else f"trained-{tok_train_key}"
    entry_key = _hash([split_key, _input_key(val_sources, text_field) if val_sources else None, tok_id])
    entry = cache / "data" / entry_key
    if (entry / "meta.json").is_file():
        return _load_entry(entry, sources)

    log(f"preparing data {spec!r} (cached under {entry})")
    train_docs, val_docs = _split_documents(sources, val_sources, val_fraction, seed, text_field)
    if tok is None:
        tok_file = cache / "tokenizers" / f"{tok_train_key}.json"
        if tok_file.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
        else:
            log(f"training a {vocab_size}-token byte-level BPE tokenizer")
            tok = train_tokenizer((d for docs in train_docs.values() for d in docs), vocab_size)
            _atomic_write_text(tok_file, tok.to_str())
    log("tokenizing")
    train = _tokenize(tok, train_docs)
    val = _tokenize(tok, val_docs)
    fingerprint = _hash([entry_key, hashlib.sha256(tok.to_str().encode()).hexdigest()])
    _write_entry(entry, tok, train, val, sources, fingerprint)
    return _load_entry(entry, sources)


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
            raise ValueError(f"--data {source.name}: no text found (empty corpus)")
        if val_sources:
            train[source.name] = docs
            continue
        if len(docs) < 2:
            raise ValueError(f"--data {source.name}: a single document cannot be split into train and validation; "
                             "add text or give --val-data")
        held = set(_held_out(docs, val_fraction, np.random.default_rng([seed, 3, _name_seed(source.name)])))
        train[source.name] = [d for i, d in enumerate(docs) if i not in held]
        val[source.name] = [d for i, d in enumerate(docs) if i in held]
    for source in val_sources or []:
        docs = list(iter_documents(source, text_field))
        if not docs:
            raise ValueError(f"--val-data {source.name}: no text found (empty corpus)")
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


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_entry(entry: Path, tok, train: Split, val: Split, sources, fingerprint: str) -> None:
    """Write into a temporary directory, then rename it to ``entry`` in one step."""
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
        (tmp / "tokenizer.json").write_text(tok.to_str())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not a concurrent run finishing first: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def tokenize_documents(spec: str, tokenizer, text_field: str = "text") -> Split:
    """Every document of ``spec`` tokenized with ``tokenizer`` (no split, no cache): an evaluation set."""
    docs = {s.name: list(iter_documents(s, text_field)) for s in parse_spec(spec)}
    for name, found in docs.items():
        if not found:
            raise ValueError(f"--data {name}: no text found (empty corpus)")
    return _tokenize(tokenizer, docs)


# --- batches -------------------------------------------------------------------------------------------------------


class BatchSampler:
    """Fixed-length sequences (seq_len inputs + the shifted targets, non-overlapping windows of each source's
    stream) drawn as a pure function of (seed, step).

    The global sequence stream is cut into cycles of ``PATTERN`` slots. Each cycle holds every source in proportion
    to its weight (largest remainder, at least one slot each) in a seeded order redrawn per cycle, so mixing is exact
    over every cycle rather than only in expectation. The k-th slot of a source takes the k-th sequence of that
    source's seeded permutation, redrawn every epoch: each epoch visits every sequence once. Both orders are computed
    from (seed, cycle) and (seed, source, epoch), so ``batch(step)`` needs no history.
    """

    PATTERN = 1024

    def __init__(self, split: Split, sources: list[Source], seq_len: int, batch_size: int, seed: int):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size: must be >= 1, got {seq_len} and {batch_size}")
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.source_names = [s.name for s in sources]
        self.streams = [split.tokens[s.name] for s in sources]
        self.n_seqs = [(len(t) - 1) // seq_len if len(t) else 0 for t in self.streams]
        for s, n in zip(sources, self.n_seqs):
            if n < 1:
                raise ValueError(f"--seq-len {seq_len}: training source {s.name} has only {len(split.tokens[s.name])}"
                                 f" tokens, fewer than one sequence of seq_len + 1")
        if sum(self.n_seqs) < batch_size:
            raise ValueError(f"--seq-len {seq_len}: the training data holds {sum(self.n_seqs)} sequences of "
                             f"{seq_len} tokens, fewer than one batch of {batch_size}; lower --seq-len or "
                             "--batch-size, or add data")
        self.cycle_len = max(self.PATTERN, len(sources))
        self.per_cycle = _slot_counts([s.weight for s in sources], self.cycle_len)
        self._cycle_cache: tuple[int, np.ndarray, np.ndarray] | None = None  # pure caches of derived orders
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    def _cycle(self, cycle: int) -> tuple[np.ndarray, np.ndarray]:
        """The cycle's slot -> source, and slot -> rank among that source's slots."""
        if self._cycle_cache is None or self._cycle_cache[0] != cycle:
            slots = np.repeat(np.arange(len(self.per_cycle)), self.per_cycle)
            slots = np.random.default_rng([self.seed, 1, cycle]).permutation(slots)
            starts = np.cumsum(self.per_cycle) - self.per_cycle  # where each source's run begins once sorted
            rank = np.empty_like(slots)
            rank[np.argsort(slots, kind="stable")] = np.arange(len(slots)) - np.repeat(starts, self.per_cycle)
            self._cycle_cache = (cycle, slots, rank)
        return self._cycle_cache[1], self._cycle_cache[2]

    def _sequence(self, g: int) -> tuple[int, int]:
        """Global sequence number -> (source index, sequence index within that source's stream)."""
        cycle, slot = divmod(g, self.cycle_len)
        slots, rank = self._cycle(cycle)
        s = int(slots[slot])
        epoch, pos = divmod(cycle * int(self.per_cycle[s]) + int(rank[slot]), self.n_seqs[s])
        cached = self._perm_cache.get(s)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, 2, s, epoch]).permutation(self.n_seqs[s]))
            self._perm_cache[s] = cached
        return s, int(cached[1][pos])

    def sources(self, step: int) -> list[int]:
        """The source index (into the sources given) of each row of ``batch(step)``."""
        return [self._sequence(g)[0] for g in range(step * self.batch_size, (step + 1) * self.batch_size)]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BT, targets_BT) int64 for ``step``; targets are the inputs shifted by one token."""
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        rows = []
        for g in range(step * self.batch_size, (step + 1) * self.batch_size):
            s, j = self._sequence(g)
            start = j * self.seq_len
            rows.append(np.asarray(self.streams[s][start:start + self.seq_len + 1], dtype=np.int64))
        seqs_BT1 = torch.from_numpy(np.stack(rows))
        return seqs_BT1[:, :-1], seqs_BT1[:, 1:]


def _slot_counts(weights: list[float], length: int) -> np.ndarray:
    """Integer slots per source summing to ``length``, proportional to the weights, at least one each."""
    ideal = np.asarray(weights, dtype=np.float64) / sum(weights) * length
    counts = np.maximum(1, np.floor(ideal)).astype(np.int64)
    while counts.sum() > length:  # the minimum of one pushed the total over: take from the most over-served
        counts[np.argmax(np.where(counts > 1, counts - ideal, -np.inf))] -= 1
    while counts.sum() < length:  # largest remainder fills the rest
        counts[np.argmax(ideal - counts)] += 1
    return counts


def val_sequences(split: Split, seq_len: int, max_sequences: int) -> tuple[torch.Tensor, list[int]]:
    """Up to ``max_sequences`` non-overlapping sequences of seq_len + 1 tokens from the validation streams, and the
    source index of each: a fixed evaluation set. Sources take turns (sequence 0 of each, then sequence 1, ...), so a
    cap on the count still covers every source; within a source the sequences follow its stream in order."""
    streams = list(split.tokens.values())
    counts = [(len(t) - 1) // seq_len if len(t) else 0 for t in streams]
    rows, sources = [], []
    for j in range(max(counts, default=0)):
        if len(rows) == max_sequences:
            break
        for s, stream in enumerate(streams):
            if j < counts[s] and len(rows) < max_sequences:
                rows.append(np.asarray(stream[j * seq_len:j * seq_len + seq_len + 1], dtype=np.int64))
                sources.append(s)
    if not rows:
        raise ValueError(f"validation data: {split.total_tokens} tokens, fewer than one sequence of seq_len + 1 = "
                         f"{seq_len + 1}; add validation text or lower --seq-len")
    return torch.from_numpy(np.stack(rows)), sources


def val_batches(split: Split, seq_len: int, batch_size: int, max_batches: int) -> list[tuple[torch.Tensor, ...]]:
    """``val_sequences`` cut into (inputs_BT, targets_BT) batches; the same list every call."""
    seqs_NT1, _ = val_sequences(split, seq_len, batch_size * max_batches)
    return [(t[:, :-1], t[:, 1:]) for t in seqs_NT1.split(batch_size)]
