import json

import numpy as np
import pytest
import torch

from smoe.train import data as D

WORDS = "the cat sat on a mat while dogs ran far away and birds sang songs of joy".split()


def _text(seed: int, n_words: int = 60) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


@pytest.fixture
def corpus(tmp_path):
    stories = D.EOS.join(_text(i) for i in range(40))
    (tmp_path / "stories.txt").write_text(stories)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": _text(100 + i), "id": i}) + "\n")
    return tmp_path


def _prepare(spec, tmp_path, **kw):
    return D.prepare_data(spec, vocab_size=300, cache_dir=tmp_path / "cache", **kw)


def test_parse_spec_weights_and_errors(corpus):
    sources = D.parse_spec(f"{corpus / 'stories.txt'}@2,{corpus / 'docs.jsonl'}")
    assert [s.weight for s in sources] == [2.0, 1.0]
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
        D.parse_spec(str(corpus / "missing.txt"))
    with pytest.raises(ValueError, match="weight after '@' must be a number"):
        D.parse_spec(f"{corpus / 'stories.txt'}@heavy")
    (corpus / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.md: unsupported file type '\.md'"):
        D.parse_spec(str(corpus / "notes.md"))
    (corpus / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir: directory holds no"):
        D.parse_spec(str(corpus / "empty_dir"))


def test_text_splits_on_eos_or_into_chunks():
    assert list(D.split_text(f"a b{D.EOS}c d{D.EOS}")) == ["a b", "c d"]
    paragraphs = "\n\n".join(f"para {i} " + "x" * 100 for i in range(50))
    docs = list(D.split_text(paragraphs, chunk_bytes=1000))
    assert len(docs) > 3 and "\n\n".join(docs) == paragraphs  # nothing lost, nothing added


def test_jsonl_without_field_names_file_and_line(corpus):
    bad = corpus / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no string field 'text'"):
        list(D.iter_documents(D.Source(str(bad))))


def test_parquet_reads_a_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["first doc", "second doc"]}), tmp_path / "d.parquet")
    assert list(D.iter_documents(D.Source(str(tmp_path / "d.parquet")), text_field="content")) == [
        "first doc", "second doc"]


def test_stdlib_corpus_is_deterministic_and_excludes_tests():
    files = D.stdlib_files(max_bytes=200_000)
    assert files == D.stdlib_files(max_bytes=200_000) and files
    assert not any("test" in p.parts or "site-packages" in p.parts for p in files)


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(ValueError, match="blank.txt: no text found"):
        _prepare(str(tmp_path / "blank.txt"), tmp_path)


def test_prepare_splits_by_document_and_tokenizes(corpus, tmp_path):
    prepared = _prepare(str(corpus / "stories.txt"), tmp_path)
    name = str(corpus / "stories.txt")
    assert prepared.train.n_documents[name] + prepared.val.n_documents[name] == 40
    assert prepared.val.n_documents[name] >= 1
    stream = np.asarray(prepared.train.tokens[name])
    assert (stream == prepared.eos_id).sum() == prepared.train.n_documents[name]  # one EOS after each document
    text = prepared.tokenizer.decode(stream[: list(stream).index(prepared.eos_id)].tolist())
    assert text in corpus.joinpath("stories.txt").read_text()


def test_cache_hit_skips_tokenization_and_file_change_invalidates(corpus, tmp_path, monkeypatch):
    first = _prepare(str(corpus / "docs.jsonl"), tmp_path)
    monkeypatch.setattr(D, "_tokenize", lambda *a: pytest.fail("tokenized again despite a cache hit"))
    again = _prepare(str(corpus / "docs.jsonl"), tmp_path)
    assert again.fingerprint == first.fingerprint
    monkeypatch.undo()
    with open(corpus / "docs.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    assert _prepare(str(corpus / "docs.jsonl"), tmp_path).fingerprint != first.fingerprint


def test_separate_validation_spec(corpus, tmp_path):
    prepared = _prepare(str(corpus / "stories.txt"), tmp_path, val_spec=str(corpus / "docs.jsonl"))
    assert prepared.train.n_documents == {str(corpus / "stories.txt"): 40}
    assert prepared.val.n_documents == {str(corpus / "docs.jsonl"): 30}


def test_token_byte_lengths_give_exact_byte_counts(corpus, tmp_path):
    prepared = _prepare(str(corpus / "stories.txt"), tmp_path)
    text = "the cat sat on a mat, héllo"
    ids = prepared.tokenizer.encode(text).ids
    assert D.token_byte_lengths(prepared.tokenizer)[ids].sum() == len(text.encode("utf-8"))


def test_sampler_is_a_pure_function_of_step(corpus, tmp_path):
    prepared = _prepare(str(corpus / "stories.txt"), tmp_path)
    make = lambda: D.BatchSampler(prepared.train, prepared.sources, seq_len=16, batch_size=4, seed=3)  # noqa: E731
    a, b = make(), make()
    for step in (0, 5, 200, 1):
        x, y, _ = a.batch(step)
        x2, y2, _ = b.batch(step)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])


def test_sampler_mixes_sources_by_weight(corpus, tmp_path):
    spec = f"{corpus / 'stories.txt'}@3,{corpus / 'docs.jsonl'}@1"
    prepared = _prepare(spec, tmp_path)
    sampler = D.BatchSampler(prepared.train, prepared.sources, seq_len=8, batch_size=32, seed=0)
    sources = [s for step in range(32) for s in sampler.batch(step)[2]]
    assert abs(sources.count(0) / len(sources) - 0.75) < 0.01


def test_sampler_covers_an_epoch_before_repeating(corpus, tmp_path):
    prepared = _prepare(str(corpus / "stories.txt"), tmp_path)
    sampler = D.BatchSampler(prepared.train, prepared.sources, seq_len=8, batch_size=1, seed=0)
    n = sampler.n_seqs[0]
    seen = {tuple(sampler.batch(step)[0][0].tolist()) for step in range(n)}
    assert len(seen) == n


def test_seq_len_longer_than_data_is_an_error(corpus, tmp_path):
    prepared = _prepare(str(corpus / "stories.txt"), tmp_path)
    with pytest.raises(ValueError, match="--seq-len 100000: source .* fewer than one sequence"):
        D.BatchSampler(prepared.train, prepared.sources, seq_len=100_000, batch_size=2, seed=0)


def test_val_batches_are_fixed_and_in_order(corpus, tmp_path):
    prepared = _prepare(str(corpus / "stories.txt"), tmp_path)
    batches = D.val_batches(prepared.val, seq_len=8, batch_size=2, max_batches=2)
    again = D.val_batches(prepared.val, seq_len=8, batch_size=2, max_batches=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    stream = np.asarray(next(iter(prepared.val.tokens.values())))
    assert batches[0][0][0].tolist() == stream[:8].tolist()


def test_bad_tokenizer_file_is_named(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer.json"):
        D.load_tokenizer(bad)
