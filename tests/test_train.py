import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from smoe.cli import main
from smoe.errors import TrainingError
from smoe.io import checkpoint as ckpt
from smoe.train import evaluate_checkpoint, train_model
from smoe.train.config import TrainConfig, from_dict

TINY = {"dim": 32, "n_layers": 2, "ffn_dim": 64, "vocab_size": 300, "moe.expert_dim": 32, "attention.n_heads": 4,
        "attention.n_kv_heads": 2, "max_seq_len": 64}
FAST = dict(batch_size=4, seq_len=32, eval_batches=2, precision="fp32", lr=3e-3)


@pytest.fixture
def text(tmp_path):
    rng = np.random.default_rng(0)
    words = "once upon a time a little fox found a red ball and played with it in the sun all day".split()
    docs = [" ".join(rng.choice(words, 80)) for _ in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("<|endoftext|>".join(docs))
    return path


def _train(out, text, tmp_path, **kw):
    options = {**FAST, "steps": 30, "eval_every": 10, **kw}
    return train_model("mixtral-tiny", out=out, data=str(text), overrides=TINY, cache_dir=tmp_path / "cache",
                       progress=False, **options)


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_writes_metrics(text, tmp_path):
    result = _train(tmp_path / "run", text, tmp_path)
    rows = _rows(tmp_path / "run")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.5
    first = train_rows[0]
    assert {"loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= first.keys()
    assert {"load_cv", "max_mean", "dropped_frac", "dead", "entropy"} <= first["router"]["0"].keys()
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert {"val_loss", "val_ppl", "val_bpb"} <= evals[0].keys()
    assert ckpt.latest_checkpoint(tmp_path / "run").step == 30


def test_resume_from_a_checkpoint_is_exact(text, tmp_path):
    full = tmp_path / "full"
    _train(full, text, tmp_path, steps=8, save_every=4, keep_last=5)
    # A second run that "died" after its step-4 checkpoint: copy that state, then resume.
    part = tmp_path / "part"
    _train(part, text, tmp_path, steps=8, save_every=4, keep_last=5)
    for later in ckpt.list_checkpoints(part)[1:]:
        shutil.rmtree(later.path)
    _train(part, text, tmp_path, steps=8, save_every=4, keep_last=5, resume=True)
    assert [r.get("loss") for r in _rows(part) if r["kind"] == "train"] == \
        [r.get("loss") for r in _rows(full) if r["kind"] == "train"]
    a = load_file(str(ckpt.latest_checkpoint(full).path / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(part).path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_recorded_before_document_boundaries_resumes_only_as_it_ran(text, tmp_path):
    out = tmp_path / "run"
    _train(out, text, tmp_path, steps=2)
    run = json.loads((out / "run.json").read_text())
    assert run["train_config"].pop("document_boundaries") == "all"  # the default: packed documents kept apart
    (out / "run.json").write_text(json.dumps(run))  # as a run written before the setting existed
    with pytest.raises(ValueError, match="^resume: document_boundaries was 'none' in .*, now 'all'"):
        _train(out, text, tmp_path, steps=3, resume=True)
    assert _train(out, text, tmp_path, steps=3, resume=True, document_boundaries="none").step == 3


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(text, tmp_path):
    """A real process killed with SIGKILL mid-run and resumed ends bit-identical to an uninterrupted one."""
    env = {**os.environ, "SMOE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    base = [sys.executable, "-m", "smoe", "train", "--preset", "mixtral-tiny", *sets, "--data", str(text),
            "--steps", "40", "--batch-size", "4", "--seq-len", "32", "--precision", "fp32", "--save-every", "5",
            "--eval-every", "20", "--eval-batches", "2", "--quiet"]
    subprocess.run([*base, "--out", str(tmp_path / "full")], env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*base, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(killed) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = ckpt.latest_checkpoint(killed).step
    assert stopped_at < 40
    subprocess.run([*base, "--out", str(killed), "--resume"], env=env, check=True, capture_output=True)

    losses = lambda out: [r.get("loss") for r in _rows(out) if r["kind"] == "train"]  # noqa: E731
    assert losses(killed) == losses(tmp_path / "full")
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "full").path / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(killed).path / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_is_skipped_then_stops_keeping_the_checkpoint(text, tmp_path, monkeypatch):
    from smoe.models import transformer

    real = transformer._cross_entropy
    calls = {"n": 0}

    def flaky(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] > 4 else loss  # finite for the first 4 training steps

    monkeypatch.setattr(transformer, "_cross_entropy", flaky)
    with pytest.raises(TrainingError, match=r"step 7: non-finite loss or gradient for 3 consecutive steps.*"
                                            r"step_00000004"):
        _train(tmp_path / "run", text, tmp_path, steps=20, save_every=4, eval_every=0, max_bad_steps=3)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows if r.get("skipped")] == [5, 6, 7]
    assert ckpt.latest_checkpoint(tmp_path / "run").step == 4


@pytest.mark.parametrize("kw, match", [
    ({"seq_len": 128}, r"seq_len 128: exceeds the model's max_seq_len \(64\)"),
    ({"overrides": {**TINY, "moe.top_kk": 2}}, r"moe\.top_kk: unknown field"),
    ({"data": "/no/such/file.txt"}, r"/no/such/file\.txt: no such file"),
    ({"batch_size": 3, "grad_accum": 2}, r"grad_accum: must divide batch_size"),
    ({"overrides": {**TINY, "moe.top_k": 1}}, r"moe\.top_k 1 with moe\.norm_topk_prob true: .* the LM loss never "
                                              r"reaches the router .* set moe\.norm_topk_prob=false"),
    ({"final_eval_batches": 1}, r"final_eval_batches: must be at least eval_batches \(2\), got 1"),
    ({"split_seed": -1}, r"split_seed: must be >= 0"),
])
def test_bad_input_fails_before_training(text, tmp_path, kw, match):
    options = {**FAST, "steps": 2, **kw}
    overrides = options.pop("overrides", TINY)
    data = options.pop("data", str(text))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train_model("mixtral-tiny", out=tmp_path / "run", data=data, overrides=overrides,
                    cache_dir=tmp_path / "cache", progress=False, **options)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_run_json_records_the_tokenizer_and_validation_hashes_and_the_last_evaluation_reads_more(text, tmp_path):
    _train(tmp_path / "a", text, tmp_path, steps=4, eval_every=2, final_eval_batches=4, seed=1, split_seed=0)
    _train(tmp_path / "b", text, tmp_path, steps=4, eval_every=2, final_eval_batches=4, seed=2, split_seed=0)
    _train(tmp_path / "c", text, tmp_path, steps=4, eval_every=2, final_eval_batches=4, seed=2)
    saved = {name: json.loads((tmp_path / name / "run.json").read_text()) for name in "abc"}
    # one held-out split (split_seed) gives one validation set whatever the seed; the seed's own split another
    assert saved["a"]["validation_sha256"] == saved["b"]["validation_sha256"] != saved["c"]["validation_sha256"]
    assert len({s["tokenizer_sha256"] for s in saved.values()}) == 2 and len(saved["a"]["tokenizer_sha256"]) == 64
    evals = [r for r in _rows(tmp_path / "a") if r["kind"] == "eval"]
    # periodic evaluations read the first eval_batches (2 x 4 x 32 targets), the last all four batches, and also
    # reports the periodic set's loss so the curve ends on the text it ran on
    assert [r["val_tokens"] for r in evals] == [256, 512] and "val_loss_curve" not in evals[0]
    assert evals[-1]["val_loss_curve"] != evals[-1]["val_loss"]
    assert all(r["mfu"] is None for r in _rows(tmp_path / "a") if r["kind"] == "train")  # no CPU peak


def test_out_dir_of_another_run_is_left_untouched(text, tmp_path):
    _train(tmp_path / "run", text, tmp_path, steps=2)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="holds a run of a different model config"):
        train_model("mixtral-tiny", out=tmp_path / "run", data=str(text), overrides={**TINY, "moe.top_k": 3},
                    cache_dir=tmp_path / "cache", progress=False, **FAST, steps=2)
    with pytest.raises(ValueError, match="holds a run at step 2; pass `resume`"):
        _train(tmp_path / "run", text, tmp_path, steps=2)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_unwritable_out_dir_is_a_clear_error(text, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        _train(blocker / "run", text, tmp_path, steps=2)


@pytest.mark.parametrize("out", ["e5", "new/e5"])
def test_an_error_before_training_leaves_no_out_directory(tmp_path, monkeypatch, capsys, out):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "mixtral-tiny", "--data", "missing.txt", "--out", out]) == 2
    assert "--data missing.txt: no such file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither e5 nor a parent made for it


def test_eval_reports_loss_perplexity_and_bpb(text, tmp_path):
    _train(tmp_path / "run", text, tmp_path, steps=5)
    result = evaluate_checkpoint(tmp_path / "run", data=str(text), seq_len=32, batch_size=4, max_batches=2,
                                 precision="fp32")
    assert result["val_ppl"] == pytest.approx(np.exp(result["val_loss"]))
    assert 0 < result["val_bpb"] < 10 and result["tokens"] == 2 * 4 * 32


def test_analyze_command_reports_routing_of_a_trained_run(text, tmp_path, capsys):

    _train(tmp_path / "run", text, tmp_path, steps=6, save_every=3, keep_last=3)
    assert main(["analyze", str(tmp_path / "run"), "--data", str(text), "--seq-len", "16", "--sequences", "8"]) == 0
    out = capsys.readouterr().out
    assert "same first expert" in out and "knock-out top1_routed" in out and "saturation at step 3" in out
    assert "redundancy, loss" in out and "(12.5% of routed experts)" in out
    result = json.loads((ckpt.latest_checkpoint(tmp_path / "run").path / "analysis.json").read_text())
    assert set(result["layers"]) == {"0", "1"} and result["saturation"]["3"] <= 1.0


def test_auto_precision_resolves_to_bf16_only_where_it_is_faster(text, tmp_path, monkeypatch):
    from smoe.device import resolve_precision

    cpu = torch.device("cpu")
    for amx in (False, True):  # AVX512-BF16 without AMX trains slower in bf16 than in fp32
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr("smoe.kernels.native_low_precision", lambda dtype: True)
        assert resolve_precision("auto", cpu) == ("bf16" if amx else "fp32")
    monkeypatch.undo()
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    _train(tmp_path / "run", text, tmp_path, steps=1, precision="auto", log=lambda m: None)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())["train_config"]["precision"]
    assert saved == resolve_precision("auto", cpu)  # the resolved value, not "auto"


# --- run directories and checkpoints that survive more than an interrupted write ---------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_manifest_records_every_file_and_detects_later_damage(text, tmp_path):
    _train(tmp_path / "run", text, tmp_path, steps=4)
    path = ckpt.latest_checkpoint(tmp_path / "run").path
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert set(manifest) == {"model.safetensors", "optimizer.safetensors", "state.json", "config.json",
                             "tokenizer.json"}
    assert ckpt.damage(path) is None
    state = path / "state.json"
    state.write_text(state.read_text().replace('"step": 4', '"step": 5'))  # same size, other content
    assert "state.json: content differs from the SHA-256" in ckpt.damage(path)
    _truncate(path / "model.safetensors")
    assert "model.safetensors" in ckpt.damage(path) and "truncated" in ckpt.damage(path)


def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(text, tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, text, tmp_path, steps=4, save_every=2)  # checkpoints at steps 2 and 4
    _truncate(ckpt.latest_checkpoint(run).path / "model.safetensors")
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
    assert ckpt.damage(ckpt.latest_checkpoint(run).path) is None  # step 4 was written anew


def test_loading_a_damaged_checkpoint_is_one_line_naming_the_file(text, tmp_path, capsys):
    _train(tmp_path / "run", text, tmp_path, steps=4)
    model_file = ckpt.latest_checkpoint(tmp_path / "run").path / "model.safetensors"
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
        _train(out, text, tmp_path, steps=4)
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
    _train(tmp_path / "run", text, tmp_path, steps=5, eval_every=0, save_every_minutes=10.0, keep_last=10)
    saved = [c.step for c in ckpt.list_checkpoints(tmp_path / "run")]
    assert saved == [2, 4, 5]  # ten minutes after each save, and the last step
    _train(tmp_path / "off", text, tmp_path, steps=3, eval_every=0, save_every_minutes=0.0, keep_last=10)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "off")] == [3]


def test_run_json_is_a_run_config_for_another_run(text, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "cache"))
    _train(tmp_path / "a", text, tmp_path, steps=2)
    assert main(["train", "--config", str(tmp_path / "a" / "run.json"), "--out", str(tmp_path / "b"), "--quiet",
                 "--keep-last", "5"]) == 0  # a flag given beside --config overrides the file
    a, b = (json.loads((tmp_path / d / "run.json").read_text()) for d in "ab")
    assert a["model_config"] == b["model_config"] and a["data_config"] == b["data_config"]
    assert b["train_config"] == {**a["train_config"], "keep_last": 5}
    wa, wb = (ckpt.read_tensors(ckpt.latest_checkpoint(tmp_path / d).path, "model") for d in "ab")
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


def test_loading_the_model_checks_only_the_files_it_reads(text, tmp_path):
    _train(tmp_path / "run", text, tmp_path, steps=2)
    path = ckpt.latest_checkpoint(tmp_path / "run").path
    _truncate(path / "optimizer.safetensors")  # damages a resume, not an evaluation
    model, _ = ckpt.load_model(path)
    assert model is not None and "optimizer.safetensors" in ckpt.damage(path)
    assert ckpt.latest_intact(tmp_path / "run") is None


def test_save_at_adds_checkpoints_and_survives_the_run_config_round_trip(text, tmp_path):
    _train(tmp_path / "run", text, tmp_path, steps=6, eval_every=0, save_every=3, save_at=(1,), keep_last=5)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "run")] == [1, 3, 6]
    # run.json holds a JSON list; a run config read back from it has the tuple again
    assert from_dict(TrainConfig, {"save_at": [1, 2]}, "run config").save_at == (1, 2)
    with pytest.raises(ValueError, match="save_at"):
        TrainConfig(save_at=(0,)).validate()


def test_clipping_scales_only_gradients_over_the_limit():
    from smoe.train.loop import _clip

    model = torch.nn.Linear(4, 3)
    for scale, want in ((10.0, 1.0), (0.1, None)):
        for p in model.parameters():
            p.grad = torch.full_like(p, scale)
        before = [p.grad.clone() for p in model.parameters()]
        norm = _clip(model, 1.0)
        assert norm == pytest.approx(scale * 15**0.5)
        after = torch.cat([p.grad.flatten() for p in model.parameters()])
        if want is None:
            assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before, strict=True))
        else:
            assert float(after.norm()) == pytest.approx(want, rel=1e-5)


def test_older_checkpoints_keep_only_the_model_and_still_load_and_resume_uses_the_newest(text, tmp_path):
    run = tmp_path / "run"
    _train(run, text, tmp_path, steps=6, eval_every=0, save_every=2, keep_last=5, keep_optimizer=1)
    assert [c.step for c in ckpt.list_checkpoints(run)] == [6]
    older = ckpt.list_checkpoints(run, resumable=False)
    assert [c.step for c in older] == [2, 4, 6]
    assert not list(older[0].path.glob("optimizer*")) and ckpt.damage(older[0].path) is None
    model, path = ckpt.load_model(older[0].path)
    assert path == older[0].path
    # resuming for more steps starts from the newest (the only resumable one) and prunes as before
    _train(run, text, tmp_path, steps=8, eval_every=0, save_every=2, keep_last=5, keep_optimizer=1, resume=True)
    assert [c.step for c in ckpt.list_checkpoints(run, resumable=False)] == [2, 4, 6, 8]
    assert [c.step for c in ckpt.list_checkpoints(run)] == [8]


def test_a_run_whose_checkpoints_are_all_model_only_still_loads(text, tmp_path):
    run = tmp_path / "run"
    _train(run, text, tmp_path, steps=4, eval_every=0, save_every=2, keep_last=5)
    for c in ckpt.list_checkpoints(run):
        ckpt.drop_optimizer(c.path)  # what a finished suite may do to save disk
    model, path = ckpt.load_model(run)
    assert path.name == "step_00000004"
