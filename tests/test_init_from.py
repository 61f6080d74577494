"""Continued training: ``TrainConfig.init_from`` starts a run from a checkpoint's weights (optimizer and schedule
fresh, the checkpoint's tokenizer kept) and ``data_offset`` continues the data order where that run stopped."""

import json
import re

import numpy as np
import pytest
import torch

from smoe.cli import main
from smoe.io import checkpoint as ckpt
from smoe.train import train_model
from smoe.train.data import BatchSampler, prepare_data

TINY = {"dim": 32, "n_layers": 2, "ffn_dim": 64, "vocab_size": 300, "moe.expert_dim": 32, "attention.n_heads": 4,
        "attention.n_kv_heads": 2, "max_seq_len": 64}
FAST = dict(batch_size=4, seq_len=32, eval_batches=2, precision="fp32", lr=3e-3, eval_every=0)


@pytest.fixture
def text(tmp_path):
    rng = np.random.default_rng(0)
    words = "once upon a time a little fox found a red ball and played with it in the sun all day".split()
    path = tmp_path / "corpus.txt"
    path.write_text("<|endoftext|>".join(" ".join(rng.choice(words, 80)) for _ in range(60)))
    return path


def _train(out, text, tmp_path, overrides=TINY, **kw):
    return train_model("mixtral-tiny", out=out, data=str(text), overrides=overrides, cache_dir=tmp_path / "cache",
                       progress=False, **{**FAST, **kw})


def _first_loss(out) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if r["kind"] == "train")


def test_continued_run_starts_from_the_weights_and_reads_the_data_after_them(text, tmp_path):
    _train(tmp_path / "a", text, tmp_path, steps=6)
    start = ckpt.latest_checkpoint(tmp_path / "a").path
    _train(tmp_path / "b", text, tmp_path, steps=2, init_from=str(tmp_path / "a"), data_offset=6)

    # Its first step's loss is the one A's final weights give on batch 6 of the same data order and tokenizer.
    model, _ = ckpt.load_model(start, dtype=torch.float32)
    prepared = prepare_data(str(text), tokenizer=start / "tokenizer.json", seed=0, cache_dir=tmp_path / "cache")
    inputs, targets = BatchSampler(prepared.train, prepared.sources, 32, 4, seed=0).batch(6)[:2]
    with torch.no_grad():
        want = model.train()(inputs, labels=targets).loss.item()
    assert _first_loss(tmp_path / "b") == pytest.approx(want, rel=1e-5)
    assert (ckpt.latest_checkpoint(tmp_path / "b").path / "tokenizer.json").read_text() == \
        (start / "tokenizer.json").read_text()
    # a fresh optimizer: B's state counts only its own steps
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "b").path / "state.json").read_text())
    assert state["step"] == 2


def test_a_different_model_config_is_refused_before_training(text, tmp_path):
    _train(tmp_path / "a", text, tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"init_from .*: its model config differs from this run's \(moe\.top_k: 2 in "
                                         r"the checkpoint, 1 here\)"):
        _train(tmp_path / "b", text, tmp_path, overrides={**TINY, "moe.top_k": 1}, steps=2,
               init_from=str(tmp_path / "a"))
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.parametrize("setup, match", [
    (lambda root: None, r"--init-from .*nowhere: no such checkpoint or run directory"),
    (lambda root: (root / "nowhere").mkdir(), r"--init-from .*nowhere: not a checkpoint"),
    (lambda root: ((root / "nowhere").mkdir(), (root / "nowhere" / "config.json").write_text('{"model_type": "x"}'),
                   (root / "nowhere" / "model.safetensors").write_bytes(b"")),
     r"--init-from .*nowhere: a Hugging Face model directory; convert it first"),
])
def test_bad_init_from_is_one_line_naming_the_flag(text, tmp_path, capsys, setup, match):
    setup(tmp_path)
    assert main(["train", "--init-from", str(tmp_path / "nowhere"), "--data", str(text), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_init_from_alone_continues_the_checkpoints_model_on_the_command_line(text, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    _train(tmp_path / "a", text, tmp_path, steps=2)
    assert main(["train", "--init-from", str(tmp_path / "a"), "--data", str(text), "--steps", "1", "--batch-size",
                 "4", "--seq-len", "32", "--eval-batches", "2", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = (json.loads((tmp_path / d / "run.json").read_text()) for d in "ab")
    assert a["model_config"] == b["model_config"]
    assert b["train_config"]["init_from"] == str(tmp_path / "a") and b["train_config"]["data_offset"] == 0
