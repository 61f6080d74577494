"""Continued training: ``TrainConfig.init_from`` starts a run from a checkpoint's weights (optimizer fresh, the
checkpoint's tokenizer kept), ``start_step`` continues the data order and schedule where that run stopped, and
``schedule_steps`` lets a run stop before its schedule ends."""

import json
import re

import numpy as np
import pytest

from smoe.cli import main
from smoe.io import checkpoint as ckpt
from smoe.train import train_model
from smoe.train.config import TrainConfig

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


def _train_rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_a_run_stopped_and_continued_is_the_uninterrupted_run_but_for_its_fresh_optimizer(text, tmp_path):
    _train(tmp_path / "whole", text, tmp_path, steps=8)
    _train(tmp_path / "a", text, tmp_path, steps=6, schedule_steps=8)  # stops 2 steps before its schedule ends
    _train(tmp_path / "b", text, tmp_path, steps=2, init_from=str(tmp_path / "a"), start_step=6)
    whole, a, b = (_train_rows(tmp_path / d) for d in ("whole", "a", "b"))
    assert [r["lr"] for r in a + b] == [r["lr"] for r in whole]  # one schedule
    # B's first step runs A's final weights on batch 7 of the same order: the uninterrupted run's 7th step exactly
    assert b[0]["loss"] == whole[6]["loss"] and [r["loss"] for r in a] == [r["loss"] for r in whole[:6]]
    start = ckpt.latest_checkpoint(tmp_path / "a").path
    assert (ckpt.latest_checkpoint(tmp_path / "b").path / "tokenizer.json").read_text() == \
        (start / "tokenizer.json").read_text()
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "b").path / "state.json").read_text())
    assert state["step"] == 2  # its own steps: the optimizer started fresh


def test_schedule_steps_must_cover_the_run():
    assert TrainConfig(steps=10, start_step=5).schedule_length == 15 and TrainConfig(steps=10).warmup == 1
    with pytest.raises(ValueError, match=r"schedule_steps: must cover start_step \+ steps \(15\), got 12"):
        TrainConfig(steps=10, start_step=5, schedule_steps=12).validate()


def test_a_different_model_config_is_refused_before_training(text, tmp_path):
    _train(tmp_path / "a", text, tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"init_from .*: its model config differs from this run's \(moe\.top_k: 2 in "
                                         r"the checkpoint, 3 here\)"):
        _train(tmp_path / "b", text, tmp_path, overrides={**TINY, "moe.top_k": 3}, steps=2,
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
    assert b["train_config"]["init_from"] == str(tmp_path / "a") and b["train_config"]["start_step"] == 0
