import itertools
import json
import os
import shutil
import sys
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from smoe.io.tokenizer import EOS
from smoe.train.data import cache
from smoe.train.data.cache import prepare_data
from smoe.train.data.sampler import BatchSampler, _slot_counts, val_batches, val_sequences
from smoe.train.data.sources import iter_documents, split_text
from smoe.train.data.spec import Source, parse_spec, stdlib_files
from smoe.train.data.tokenizer import token_byte_lengths, train_tokenizer
from smoe.train.metrics import bits_per_byte

WORDS = "the cat sat on a mat while dogs ran far away and birds sang songs of joy".split()


def _text(seed: int, n_words: int = 60) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words)) + f" doc{seed}"  # the tag makes every document unique


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "stories.txt").write_text(EOS.join(_text(i) for i in range(40)))
    with open(root / "docs.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": _text(100 + i), "id": i}) + "\n")
    return root


def _prepare(data, tmp_path, **kw):
    return prepare_data(data, vocab_size=300, cache_dir=tmp_path / "cache", **kw)


def _docs(data, **kw):
    """Every document of every source of ``data``, in spec order."""
    return [d for s in parse_spec(data) for d in iter_documents(s, **kw)]


# --- formats -------------------------------------------------------------------------------------------------------


def test_txt_splits_on_endoftext():
    assert list(split_text(f"a b\n{EOS}\nc d{EOS}")) == ["a b", "c d"]


def test_txt_splits_on_two_empty_lines_but_keeps_paragraphs_together():
    assert list(split_text("a\n\nb\n\n\nc\n\n\n\n\nd")) == ["a\n\nb", "c", "d"]


def test_long_txt_is_cut_at_paragraph_boundaries_without_loss():
    paragraphs = "\n\n".join(f"para {i} " + "x" * 100 for i in range(50))
    docs = list(split_text(paragraphs, max_bytes=1000))
    assert len(docs) > 3 and all(len(d) <= 1000 for d in docs)
    assert "\n\n".join(docs) == paragraphs


def test_overlong_line_is_cut():
    docs = list(split_text("y" * 5000, max_bytes=1000))
    assert len(docs) == 5 and "".join(docs) == "y" * 5000


def test_jsonl_reads_the_configured_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "first"}\n\n{"body": "second", "text": 3}\n')
    assert _docs(str(path), text_field="body") == ["first", "second"]


def test_parquet_reads_a_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["first doc", None, "second doc"]}), tmp_path / "d.parquet")
    assert _docs(str(tmp_path / "d.parquet"), text_field="content") == ["first doc", "second doc"]


def test_parquet_without_pyarrow_names_the_file(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"d\.parquet: reading \.parquet needs pyarrow"):
        parse_spec(str(tmp_path))


def test_directory_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "c.jsonl").write_text('{"text": "three"}\n')
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    assert _docs(f"{tmp_path}/") == ["one", "two", "three"]


def test_splits_keep_documents_by_source_name(corpus, tmp_path):
    prepared = _prepare(f"{corpus / 'stories.txt'}@2,{corpus / 'docs.jsonl'}", tmp_path)
    assert prepared.source_names == [str(corpus / "stories.txt"), str(corpus / "docs.jsonl")]
    assert {name: prepared.train.n_documents[name] + prepared.val.n_documents[name]
            for name in prepared.source_names} == {str(corpus / "stories.txt"): 40, str(corpus / "docs.jsonl"): 30}


def test_stdlib_discovery_is_sorted_deterministic_and_excludes_tests():
    files = stdlib_files(max_bytes=300_000)
    assert files and files == stdlib_files(max_bytes=300_000)
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and sum(p.stat().st_size for p in files) <= 300_000
    assert not any(set(p.relative_to(root).parts) & {"test", "tests", "site-packages", "idlelib", "encodings"}
                   for p in stdlib_files())


def test_stdlib_spec_yields_one_document_per_file():
    first = list(itertools.islice(iter_documents(Source("stdlib")), 3))
    expected = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()
                if p.read_text(encoding="utf-8", errors="replace").strip()][:3]
    assert first == expected


# --- Hugging Face datasets -----------------------------------------------------------------------------------------


class _FakeDataset:
    column_names = ["text"]
    _fingerprint = "fake-fingerprint"

    def __init__(self, texts):
        self.texts = texts

    def iter(self, batch_size):
        for i in range(0, len(self.texts), batch_size):
            yield {"text": self.texts[i:i + batch_size]}


@pytest.fixture
def fake_datasets(monkeypatch):
    module = types.ModuleType("datasets")
    module.config = types.SimpleNamespace(HF_DATASETS_OFFLINE=False)
    module.calls = []

    def load_dataset(name, config, split):
        module.calls.append((name, config, split, os.environ.get("HF_DATASETS_OFFLINE"),
                             module.config.HF_DATASETS_OFFLINE))
        return _FakeDataset([_text(i) for i in range(20)])

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    return module


def test_hf_source_loads_offline_from_the_cache(fake_datasets):
    assert len(_docs("hf:org/stories:validation")) == 20
    assert fake_datasets.calls == [("org/stories", None, "validation", "1", True)]
    assert "HF_DATASETS_OFFLINE" not in os.environ and fake_datasets.config.HF_DATASETS_OFFLINE is False


def test_hf_source_prepares_with_a_weight(fake_datasets, tmp_path):
    prepared = _prepare("hf:org/stories:cfg:train@2", tmp_path)
    assert prepared.sources == [Source("hf:org/stories:cfg:train", 2.0)]
    name = "hf:org/stories:cfg:train"
    assert prepared.train.n_documents[name] + prepared.val.n_documents[name] == 20


def test_hf_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="^data hf:org/x: hf: sources need the `datasets` library"):
        parse_spec("hf:org/x")


# --- spec errors ---------------------------------------------------------------------------------------------------


def test_weights_parse(corpus):
    sources = parse_spec(f"{corpus / 'stories.txt'}@2.5,{corpus}/@1,{corpus / 'docs.jsonl'}")
    assert [(s.name, s.weight) for s in sources] == [
        (str(corpus / "stories.txt"), 2.5), (f"{corpus}/", 1.0), (str(corpus / "docs.jsonl"), 1.0)]


def test_existing_path_with_an_at_sign_is_not_a_weight(tmp_path):
    (tmp_path / "v@2.txt").write_text("x")
    assert parse_spec(str(tmp_path / "v@2.txt")) == [Source(str(tmp_path / "v@2.txt"), 1.0)]


@pytest.mark.parametrize("entry, error, message", [
    ("missing.txt", FileNotFoundError, r"^data missing\.txt: no such file or directory"),
    ("stories.txt@heavy", ValueError, r"^data 'stories\.txt@heavy': weight after '@' must be a number"),
    ("stories.txt@-1", ValueError, r"^data 'stories\.txt@-1': weight must be a positive"),
    ("notes.md", ValueError, r"^data notes\.md: unsupported file type '\.md'"),
    ("empty_dir", ValueError, r"^data empty_dir: directory holds no \.txt"),
    ("stories.txt,stories.txt", ValueError, r"^data stories\.txt: listed twice"),
    ("hf:", ValueError, r"^data hf:: expected hf:NAME"),
])
def test_bad_spec_entries_are_named(corpus, monkeypatch, entry, error, message):
    (corpus / "notes.md").write_text("x")
    (corpus / "empty_dir").mkdir()
    monkeypatch.chdir(corpus)
    with pytest.raises(error, match=message):
        parse_spec(entry)


def test_validation_spec_errors_name_val_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^val_data .*missing\.txt: no such file"):
        _prepare("stdlib", tmp_path, val_spec=str(tmp_path / "missing.txt"))


def test_jsonl_line_without_the_field_names_text_field_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(ValueError, match=r"^text_field 'text': .*bad\.jsonl:2 has no string field"):
        _docs(str(bad))


@pytest.mark.parametrize("line, message", [
    ("[" * 100_000 + "]" * 100_000, r"bad\.jsonl:2: not valid JSON \(nested too deep\)"),
    ('["a list"]', r"bad\.jsonl:2: expected an object at the top level, got an array"),
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
])
def test_bad_jsonl_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        _docs(str(bad))


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(ValueError, match=r"^data .*blank\.txt: no text found"):
        _prepare(str(tmp_path / "blank.txt"), tmp_path)


def test_single_document_cannot_be_split(tmp_path):
    (tmp_path / "one.txt").write_text("just one short document")
    with pytest.raises(ValueError, match=r"^data .*one\.txt: a single document cannot be split"):
        _prepare(str(tmp_path / "one.txt"), tmp_path)


def test_validation_overlapping_training_is_an_error(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"^val_data .*stories\.txt is also training data"):
        _prepare(str(corpus), tmp_path, val_spec=str(corpus / "stories.txt"))


# --- tokenizer -----------------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_text_and_is_deterministic():
    texts = [_text(i) for i in range(30)]
    tok = train_tokenizer(texts, vocab_size=300)
    sample = "the cat sat — on a mat, héllo 🐈\n\tdoc7"
    assert tok.decode(tok.encode(sample).ids) == sample
    assert tok.to_str() == train_tokenizer(texts, vocab_size=300).to_str()


def test_eos_is_one_special_token():
    tok = train_tokenizer([_text(0)], vocab_size=300)
    assert tok.encode(f"a{EOS}b").ids.count(tok.token_to_id(EOS)) == 1


def test_unreadable_tokenizer_file_is_named(corpus, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match=r"^tokenizer .*tokenizer\.json: not a readable tokenizer\.json"):
        _prepare(str(corpus), tmp_path, tokenizer=bad)


def test_missing_tokenizer_file_is_named(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^tokenizer .*nope\.json: no such file"):
        _prepare(str(corpus), tmp_path, tokenizer=tmp_path / "nope.json")


def test_given_tokenizer_is_used_as_is(corpus, tmp_path):
    trained = _prepare(str(corpus / "stories.txt"), tmp_path)
    (tmp_path / "tok.json").write_text(trained.tokenizer.to_str())
    given = _prepare(str(corpus / "stories.txt"), tmp_path, tokenizer=tmp_path / "tok.json")
    name = str(corpus / "stories.txt")
    assert given.tokenizer.to_str() == trained.tokenizer.to_str()
    assert np.array_equal(given.train.tokens[name], trained.train.tokens[name])


# --- cache ---------------------------------------------------------------------------------------------------------


def test_rerun_hits_the_cache_without_reading_or_tokenizing(corpus, tmp_path, monkeypatch):
    first = _prepare(str(corpus / "docs.jsonl"), tmp_path)
    for name in ("_tokenize", "train_tokenizer", "iter_documents"):
        monkeypatch.setattr(cache, name, lambda *a, **k: pytest.fail("data prepared again despite a cache hit"))
    again = _prepare(str(corpus / "docs.jsonl"), tmp_path)
    assert again.fingerprint == first.fingerprint
    assert isinstance(again.train.tokens[str(corpus / "docs.jsonl")], np.memmap)


def test_changed_file_changes_the_cache_key(corpus, tmp_path):
    first = _prepare(str(corpus / "docs.jsonl"), tmp_path)
    with open(corpus / "docs.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert _prepare(str(corpus / "docs.jsonl"), tmp_path).fingerprint != first.fingerprint


def test_same_text_keeps_the_fingerprint_whatever_the_files_times(corpus, tmp_path):
    """A resume checks the fingerprint: a corpus unpacked again (new mtimes, same text) must not block it."""
    first = _prepare(str(corpus / "docs.jsonl"), tmp_path)
    os.utime(corpus / "docs.jsonl", ns=(1, 1))
    again = _prepare(str(corpus / "docs.jsonl"), tmp_path)
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 2  # the times key the cache: prepared again
    assert again.fingerprint == first.fingerprint


def test_trained_tokenizer_is_cached_on_its_own(corpus, tmp_path, monkeypatch):
    first = _prepare(str(corpus / "docs.jsonl"), tmp_path)
    shutil.rmtree(tmp_path / "cache" / "data")
    monkeypatch.setattr(cache, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer trained again"))
    assert _prepare(str(corpus / "docs.jsonl"), tmp_path).fingerprint == first.fingerprint



def test_unreadable_cached_tokenizer_is_trained_again(corpus, tmp_path):
    first = _prepare(str(corpus / "docs.jsonl"), tmp_path)
    shutil.rmtree(tmp_path / "cache" / "data")
    (tok_file,) = (tmp_path / "cache" / "tokenizers").iterdir()
    tok_file.write_text("{")
    assert _prepare(str(corpus / "docs.jsonl"), tmp_path).fingerprint == first.fingerprint
    assert tok_file.read_text() == first.tokenizer.to_str()

def test_interrupted_write_leaves_no_cache_entry(corpus, tmp_path, monkeypatch):
    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _prepare(str(corpus / "docs.jsonl"), tmp_path)
    assert list((tmp_path / "cache" / "data").iterdir()) == []
    monkeypatch.undo()
    assert _prepare(str(corpus / "docs.jsonl"), tmp_path).train.total_tokens > 0



@pytest.mark.parametrize("damage", ["corrupt meta.json", "missing tokens"])
def test_damaged_cache_entry_is_rebuilt(corpus, tmp_path, damage):
    name = str(corpus / "docs.jsonl")
    first = _prepare(name, tmp_path)
    (entry,) = (tmp_path / "cache" / "data").iterdir()
    if damage == "corrupt meta.json":
        (entry / "meta.json").write_text('{"splits": ')
    else:
        (entry / "train_0.npy").unlink()
    again = _prepare(name, tmp_path)
    assert again.fingerprint == first.fingerprint
    assert np.array_equal(again.train.tokens[name], first.train.tokens[name])
    assert (entry / "meta.json").is_file() and (entry / "train_0.npy").is_file()

def test_small_vocab_is_stored_as_uint16(corpus, tmp_path):
    prepared = _prepare(str(corpus / "docs.jsonl"), tmp_path)
    assert prepared.train.tokens[str(corpus / "docs.jsonl")].dtype == np.uint16


# --- split ---------------------------------------------------------------------------------------------------------


def _split_texts(prepared, name):
    """Each split's documents, decoded from the token stream (split at EOS)."""
    out = []
    for split in (prepared.train, prepared.val):
        text = prepared.tokenizer.decode(np.asarray(split.tokens[name]).tolist(), skip_special_tokens=False)
        out.append([d for d in text.split(EOS) if d])
    return out


def test_split_is_by_document_disjoint_and_complete(corpus, tmp_path):
    name = str(corpus / "stories.txt")
    train, val = _split_texts(_prepare(name, tmp_path), name)
    assert val and not set(train) & set(val)
    assert sorted(train + val) == sorted(_text(i) for i in range(40))


def test_split_is_deterministic_and_seeded(corpus, tmp_path):
    name = str(corpus / "stories.txt")
    a = _prepare(name, tmp_path / "a")
    b = _prepare(name, tmp_path / "b")
    c = _prepare(name, tmp_path / "c", seed=1)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.val.tokens[name], b.val.tokens[name])
    assert _split_texts(a, name)[1] != _split_texts(c, name)[1]


def test_separate_validation_spec_holds_all_validation(corpus, tmp_path):
    prepared = _prepare(str(corpus / "stories.txt"), tmp_path, val_spec=str(corpus / "docs.jsonl"))
    assert prepared.train.n_documents == {str(corpus / "stories.txt"): 40}
    assert prepared.val.n_documents == {str(corpus / "docs.jsonl"): 30}
    assert prepared.val.total_bytes == sum(len(_text(100 + i).encode()) for i in range(30))
    other_seed = _prepare(str(corpus / "stories.txt"), tmp_path, val_spec=str(corpus / "docs.jsonl"), seed=5)
    assert other_seed.fingerprint == prepared.fingerprint  # the seed only chooses a held-out share


# --- packing and sampling ------------------------------------------------------------------------------------------


@pytest.fixture
def stories(corpus, tmp_path):
    return _prepare(str(corpus / "stories.txt"), tmp_path)


def test_packing_puts_eos_after_every_document(stories, corpus):
    stream = np.asarray(stories.train.tokens[str(corpus / "stories.txt")])
    eos = np.flatnonzero(stream == stories.eos_id)
    assert len(eos) == stories.train.n_documents[str(corpus / "stories.txt")] and eos[-1] == len(stream) - 1
    first = stories.tokenizer.decode(stream[:eos[0]].tolist())
    assert first in {_text(i) for i in range(40)}


def test_targets_are_inputs_shifted_by_one(stories):
    sampler = BatchSampler(stories.train, stories.sources, seq_len=16, batch_size=4, seed=3)
    x, y = sampler.batch(2)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_sampler_is_a_pure_function_of_step(stories):
    def make():
        return BatchSampler(stories.train, stories.sources, seq_len=16, batch_size=4, seed=3)

    continued = make()
    straight = [continued.batch(step) for step in range(12)]
    resumed = make()
    for step in (7, 8, 9, 10, 11, 0):  # a resume at step 7, then a jump back
        assert all(torch.equal(a, b) for a, b in zip(resumed.batch(step), straight[step], strict=True))
    assert not torch.equal(straight[0][0], straight[1][0])


def test_sampler_covers_an_epoch_before_repeating(stories):
    # By sequence index, not content: two windows of the stream may hold the same tokens.
    sampler = BatchSampler(stories.train, stories.sources, seq_len=8, batch_size=1, seed=0)
    n = sampler.n_seqs[0]
    assert sorted(sampler._sequence(g)[1] for g in range(n)) == list(range(n))
    assert sorted(sampler._sequence(g)[1] for g in range(n, 2 * n)) == list(range(n))


def test_sampler_mixes_sources_by_weight(corpus, tmp_path):
    prepared = _prepare(f"{corpus / 'stories.txt'}@3,{corpus / 'docs.jsonl'}@1", tmp_path)
    sampler = BatchSampler(prepared.train, prepared.sources, seq_len=8, batch_size=32, seed=0)
    drawn = [s for step in range(40) for s in sampler.sources(step)]
    assert abs(drawn.count(0) / len(drawn) - 0.75) < 0.02
    assert drawn[:BatchSampler.PATTERN].count(0) == 768  # exact within every cycle


def test_sampler_rows_come_from_the_source_it_names(corpus, tmp_path):
    prepared = _prepare(f"{corpus / 'stories.txt'},{corpus / 'docs.jsonl'}", tmp_path)
    sampler = BatchSampler(prepared.train, prepared.sources, seq_len=8, batch_size=8, seed=1)
    x, y = sampler.batch(3)
    for row, s in zip(torch.cat([x, y[:, -1:]], 1), sampler.sources(3), strict=True):
        stream = np.asarray(prepared.train.tokens[prepared.source_names[s]])
        windows = stream[: (len(stream) - 1) // 8 * 8 + 1]
        start = next(i for i in range(0, len(windows) - 8, 8) if (windows[i:i + 9] == row.numpy()).all())
        assert start % 8 == 0


def test_slot_counts_honour_tiny_weights():
    counts = _slot_counts([10_000, 1, 1], 1024)
    assert counts.sum() == 1024 and counts.min() == 1


def test_seq_len_longer_than_a_source_is_an_error(stories):
    with pytest.raises(ValueError, match=r"^seq_len 100000: training source .*stories\.txt has only"):
        BatchSampler(stories.train, stories.sources, seq_len=100_000, batch_size=2, seed=0)


def test_batch_larger_than_the_data_is_an_error(stories):
    n = sum(len(t) for t in stories.train.tokens.values())
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        BatchSampler(stories.train, stories.sources, seq_len=n // 10, batch_size=64, seed=0)



def test_seq_len_longer_than_the_validation_data_is_an_error(stories):
    with pytest.raises(ValueError, match=r"^seq_len 100000: the validation data holds"):
        val_sequences(stories.val, seq_len=100_000, max_sequences=4)

def test_val_batches_are_fixed_and_follow_the_stream(stories):
    batches = val_batches(stories.val, seq_len=8, batch_size=2, max_batches=2)
    again = val_batches(stories.val, seq_len=8, batch_size=2, max_batches=2)
    assert len(batches) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    stream = np.asarray(next(iter(stories.val.tokens.values())))
    assert torch.cat([x for x, _ in batches]).flatten().tolist() == stream[:32].tolist()


def test_val_sequences_cover_every_source_under_a_cap(corpus, tmp_path):
    prepared = _prepare(f"{corpus / 'stories.txt'},{corpus / 'docs.jsonl'}", tmp_path)
    seqs, sources = val_sequences(prepared.val, seq_len=8, max_sequences=4)
    assert seqs.shape == (4, 9) and sources == [0, 1, 0, 1]


# --- bits per byte -------------------------------------------------------------------------------------------------


def test_bits_per_byte():
    assert bits_per_byte(np.log(2), n_tokens=3, n_bytes=3) == pytest.approx(1.0)
    assert bits_per_byte(np.log(2), n_tokens=1, n_bytes=4) == pytest.approx(0.25)


def test_token_byte_lengths_give_exact_byte_counts(stories):
    text = f"the cat sat on a mat, héllo 🐈{EOS}next"
    ids = stories.tokenizer.encode(text).ids
    assert token_byte_lengths(stories.tokenizer)[ids].sum() == len(text.encode("utf-8")) - len(EOS)

