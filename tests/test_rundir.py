"""Run directories and checkpoints that survive more than an interrupted write: damaged files, foreign
directories, time-based saves, run configs."""

import json
import shutil

import numpy as np
import pytest
import torch

from smoe.cli import main
from smoe.io import checkpoint as layout
from smoe.train import train_model

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


def _train(out, text, tmp_path, **kw):
    return train_model("mixtral-tiny", out=out, data=str(text), overrides=TINY, cache_dir=tmp_path / "cache",
                       progress=False, log=lambda m: None, **{**FAST, "steps": 4, **kw})


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_manifest_records_every_file_and_detects_later_damage(text, tmp_path):
    _train(tmp_path / "run", text, tmp_path)
    path = layout.latest_checkpoint(tmp_path / "run").path
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model.safetensors", "optimizer.safetensors", "state.json", "config.json",
                             "tokenizer.json"}
    assert layout.damage(path) is None
    state = path / "state.json"
    state.write_text(state.read_text().replace('"step": 4', '"step": 5'))  # same size, other content
    assert "state.json: content differs from the SHA-256" in layout.damage(path)
    _truncate(path / "model.safetensors")
    assert "model.safetensors" in layout.damage(path) and "truncated" in layout.damage(path)


def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(text, tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, text, tmp_path, save_every=2)  # checkpoints at steps 2 and 4
    _truncate(layout.latest_checkpoint(run).path / "model.safetensors")
    args = ["train", "--preset", "mixtral-tiny", "--data", str(text), "--out", str(run), "--resume", "--quiet",
            "--steps", "6", "--save-every", "2", "--eval-every", "0", "--batch-size", "4", "--seq-len", "32",
            "--eval-batches", "2", "--precision", "fp32", "--lr", "3e-3"]
    args += [a for key, value in TINY.items() for a in ("--set", f"{key}={value}")]
    monkey_cache = {"SMOE_CACHE": str(tmp_path / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in monkey_cache.items():
            mp.setenv(k, v)
        assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_00000004" in err and "truncated" in err
    assert "resuming from" in err and "step_00000002 (step 2)" in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert layout.damage(layout.latest_checkpoint(run).path) is None  # step 4 was written anew


def test_loading_a_damaged_checkpoint_is_one_line_naming_the_file(text, tmp_path, capsys):
    _train(tmp_path / "run", text, tmp_path)
    model_file = layout.latest_checkpoint(tmp_path / "run").path / "model.safetensors"
    _truncate(model_file)
    assert main(["eval", str(tmp_path / "run"), "--data", str(text), "--seq-len", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(model_file) in err and "\n" not in err
    (model_file.parent / "manifest.json").unlink()  # without the manifest the header check still names it
    assert main(["generate", str(tmp_path / "run"), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(model_file) in err and "truncated" in err and "\n" not in err


def test_out_that_is_not_a_run_is_refused_and_left_untouched(text, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own notes\n")
    with pytest.raises(ValueError, match=r"not empty and not a smoe run \(no run.json; holds 'metrics.jsonl'\)"):
        _train(out, text, tmp_path)
    assert (out / "metrics.jsonl").read_text() == "my own notes\n" and sorted(p.name for p in out.iterdir()) == [
        "metrics.jsonl"]
    assert main(["train", "--preset", "mixtral-tiny", "--out", str(out), "--steps", "1"]) == 2
    assert "--out " + str(out) in capsys.readouterr().err


def test_a_fresh_run_in_its_own_directory_starts_its_metrics_anew(text, tmp_path):
    run = tmp_path / "run"
    _train(run, text, tmp_path, steps=2)
    shutil.rmtree(run / "checkpoints")  # e.g. a run stopped before its first checkpoint
    _train(run, text, tmp_path, steps=3)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]


def test_time_based_checkpoints(text, tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 300))  # each call to the clock is five minutes later
    monkeypatch.setattr("smoe.train.loop.time.monotonic", lambda: next(clock))
    _train(tmp_path / "run", text, tmp_path, steps=5, save_every_minutes=10.0, keep_last=10)
    saved = [c.step for c in layout.list_checkpoints(tmp_path / "run")]
    assert saved == [2, 4, 5]  # ten minutes after each save, and the last step
    _train(tmp_path / "off", text, tmp_path, steps=3, save_every_minutes=0.0, keep_last=10)
    assert [c.step for c in layout.list_checkpoints(tmp_path / "off")] == [3]


def test_run_json_is_a_run_config_for_another_run(text, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    _train(tmp_path / "a", text, tmp_path, steps=2)
    assert main(["train", "--config", str(tmp_path / "a" / "run.json"), "--out", str(tmp_path / "b"), "--quiet",
                 "--keep-last", "5"]) == 0  # a flag given beside --config overrides the file
    a, b = (json.loads((tmp_path / d / "run.json").read_text()) for d in "ab")
    assert a["model_config"] == b["model_config"] and a["data_config"] == b["data_config"]
    assert b["train_config"] == {**a["train_config"], "keep_last": 5}
    wa, wb = (layout.read_tensors(layout.latest_checkpoint(tmp_path / d).path, "model") for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # the same run, again


@pytest.mark.parametrize("content, match", [
    ('{"train_config": {}}', "no 'model_config'"),
    ('{"model_config": {"dim": 8}, "train_config": {"stepz": 3}}', "model_config"),
    ("[1, 2]", "expected an object"),
    ("[" * 100_000, "nested too deep"),
])
def test_bad_run_config_is_one_line_naming_the_file(tmp_path, capsys, content, match):
    path = tmp_path / "cfg.json"
    path.write_text(content)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and match in err and "\n" not in err
    assert not (tmp_path / "o").exists()
