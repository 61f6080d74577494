import json
import subprocess
import sys

import pytest

from smoe.cli import main


def test_inspect_json_has_the_contract_keys(capsys):
    assert main(["inspect", "deepseek-v3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"total_params", "active_params", "active_params_excl_embedding"} <= report.keys()
    assert round(report["total_params"] / 1e9, 1) == 671.0


def test_inspect_text_shows_deepseek_v3_total(capsys):
    assert main(["inspect", "deepseek-v3"]) == 0
    assert "671.0B" in capsys.readouterr().out


# Each hybrid: its softmax layers' cache per token (bf16 keys and values, or MLA's latent and rope key) and its linear
# layers' state per sequence (fp32 (heads x key dim x value dim) + bf16 convolution history of (kernel - 1) taps).
HYBRIDS = [
    ("qwen3-next-80b-a3b", 12 * 2 * 2 * 256 * 2, 36 * (32 * 128 * 128 * 4 + (2048 + 2048 + 4096) * 3 * 2),
     "KV cache / token      bf16 24.00 KiB", "recurrent state / seq bf16 73.69 MiB", 36),
    ("minimax-text-01", 10 * 2 * 8 * 128 * 2, 70 * 64 * 128 * 128 * 4,
     "KV cache / token      bf16 40.00 KiB", "recurrent state / seq bf16 280.00 MiB", 70),
    ("kimi-linear-48b-a3b", 7 * (512 + 64) * 2, 20 * (32 * 128 * 128 * 4 + 3 * 4096 * 3 * 2),
     "KV cache / token      bf16 7.88 KiB", "recurrent state / seq bf16 41.41 MiB", 20),
]


@pytest.mark.parametrize("name, kv_per_token, state, kv_line, state_line, n_linear", HYBRIDS)
def test_inspect_shows_a_hybrids_recurrent_state_per_sequence_beside_its_kv_cache_per_token(
        capsys, name, kv_per_token, state, kv_line, state_line, n_linear):
    text, reports = {}, {}
    for seq_len in ("1024", "65536"):
        assert main(["inspect", name, "--seq-len", seq_len]) == 0
        text[seq_len] = capsys.readouterr().out
        assert main(["inspect", name, "--seq-len", seq_len, "--json"]) == 0
        reports[seq_len] = json.loads(capsys.readouterr().out)
    out = text["1024"]
    assert kv_line in out and state_line in out and f"({n_linear} linear-attention layers" in out
    # Neither figure depends on the context: the state is per sequence, the KV figure per token of it.
    figures = {n: [line for line in text[n].splitlines() if "recurrent state" in line or "KV cache" in line]
               for n in text}
    assert len(figures["1024"]) == 2 and figures["1024"] == figures["65536"]
    for report in reports.values():
        assert report["n_linear_layers"] == n_linear
        assert report["kv_cache_bytes_per_token"]["bf16"] == kv_per_token
        assert report["recurrent_state_bytes"]["bf16"] == state
    assert [r["seq_len"] for r in reports.values()] == [1024, 65536]  # the flag did reach the accounting


def test_presets_lists_every_preset(capsys):
    from smoe import presets

    assert main(["presets"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]  # below the header, one row per preset, its name first
    assert sorted(row.split()[0] for row in rows) == sorted(presets.names())


def test_unknown_preset_is_one_line_exit_2_with_close_names(capsys):
    assert main(["inspect", "mixtral-8x7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "mixtral-8x7b" in err


def test_inspect_needs_exactly_one_source(capsys):
    assert main(["inspect"]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_malformed_hf_config_names_the_file(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["inspect", "--hf-config", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_inspect_reads_an_hf_config_file(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    cfg.save_pretrained(tmp_path)
    assert main(["inspect", "--hf-config", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] > 0


def test_smoke_runs_a_tiny_preset(capsys):
    assert main(["smoke", "--presets", "mixtral-tiny", "--seq-len", "16"]) == 0
    assert "mixtral-tiny" in capsys.readouterr().out


def test_module_entry_point_exit_code():
    result = subprocess.run([sys.executable, "-m", "smoe", "inspect", "no-such-model"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_train_set_without_value_is_one_line_exit_2(capsys):
    assert main(["train", "--preset", "mixtral-tiny", "--set", "moe.top_k"]) == 2
    assert "--set 'moe.top_k': expected FIELD=VALUE" in capsys.readouterr().err


def test_train_set_parses_json_values():
    from smoe.cli import parse_assignments

    assert parse_assignments(["moe.top_k=4", "moe.capacity_factor=null", "moe.score_func=sigmoid"]) == {
        "moe.top_k": 4, "moe.capacity_factor": None, "moe.score_func": "sigmoid"}


def test_compare_needs_a_suite_or_presets(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path)]) == 2
    assert "--suite NAME or --presets" in capsys.readouterr().err


def test_eval_of_a_missing_checkpoint_is_named(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing"), "--data", "stdlib"]) == 2
    assert "nothing: no such checkpoint" in capsys.readouterr().err


def test_bench_moe_layer_refuses_an_unknown_shape(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "moe-layer", "--shapes", "gpt5"])
    assert exit_.value.code == 2  # argparse's usage error, not a crash
    assert "--shapes: unknown gpt5; known: mixtral, qwen3, deepseek-v3" in capsys.readouterr().err


def test_bench_runs_from_the_package_outside_a_source_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "moe-layer", "--help"])
    assert exit_.value.code == 0 and "smoe bench moe-layer" in capsys.readouterr().out


def test_bench_without_its_optional_peer_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    assert main(["bench", "moe-layer", "--shapes", "mixtral", "--tokens", "1", "--dtypes", "fp32", "--modes", "fwd",
                 "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "moe-layer: needs transformers, which is not installed" in err


@pytest.mark.parametrize("library, shown", [
    ("seq_len 128: exceeds the model's max_seq_len (64)", "--seq-len 128: exceeds the model's max_seq_len (64)"),
    ("ep 2 x `dp` 1: needs 2 processes", "--ep 2 x --dp 1: needs 2 processes"),
    ("val_data b.txt: also training data", "--val-data b.txt: also training data"),
    ("data/x.txt: no such file", "data/x.txt: no such file"),  # a path that starts like a field is left alone
    ("moe.top_kk: unknown field", "moe.top_kk: unknown field"),
])
def test_library_errors_name_fields_and_the_cli_shows_flags(library, shown):
    from smoe.cli import user_message

    assert user_message(ValueError(library)) == shown


def test_a_train_error_through_the_cli_names_the_flag(tmp_path, capsys):
    assert main(["train", "--preset", "mixtral-tiny", "--seq-len", "100000", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoe train: error: --seq-len 100000: exceeds the model's max_seq_len") and "\n" not in err
    assert not (tmp_path / "r").exists()


# Every flag each command had before the parser was generated from the config dataclasses: users' scripts use them.
_FLAGS_BEFORE = {
    "train": "--preset --set --data --val-data --out --resume --tokenizer --text-field --quiet --steps --batch-size "
             "--seq-len --grad-accum --lr --min-lr-ratio --warmup-steps --weight-decay --grad-clip --seed --precision "
             "--eval-every --eval-batches --save-every --keep-last --max-bad-steps --device --expert-backend "
             "--peak-tflops --compile --ep --dp --dist-timeout",
    "compare": "--suite --presets --data --val-data --steps --batch-size --seq-len --lr --seeds --eval-every "
               "--eval-batches --precision --device --jobs --out",
    "eval": "--data --seq-len --batch-size --max-batches --text-field --json",
    "analyze": "--data --seq-len --sequences --text-field --out",
    "generate": "--prompt --prompt-ids --max-new-tokens --temperature --top-k --top-p --seed --device --dtype",
    "convert": "--to --out --model-type --dtype",
    "inspect": "--hf-config --seq-len --json",
    "smoke": "--presets --batch-size --seq-len",
}


@pytest.mark.parametrize("command", sorted(_FLAGS_BEFORE))
def test_every_flag_of_before_is_kept(command):
    from smoe.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    have = {s for action in sub._actions for s in action.option_strings}
    assert set(_FLAGS_BEFORE[command].split()) <= have


def test_every_command_is_its_own_module():
    from smoe.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    modules = {name: sub.get_default("func").__module__ for name, sub in commands.items()}
    assert all(m.startswith("smoe.cli.") for m in modules.values()), modules
    assert len(set(modules.values())) == len(modules), modules  # no module holds two commands


def test_compare_keeps_its_own_defaults(tmp_path):
    from smoe.cli import build_parser
    from smoe.eval.settings import CompareSettings

    args = build_parser().parse_args(["compare", "--suite", "shared", "--out", str(tmp_path)])
    assert args.steps is None and CompareSettings().train.steps == 400 and CompareSettings().train.eval_every == 50


def test_compare_flags_fill_the_settings_it_runs(tmp_path, monkeypatch, capsys):
    from smoe.eval import compare

    seen = {}
    monkeypatch.setattr(compare, "run_suite", lambda suite, presets, settings, out, **kw: seen.update(
        settings=settings, **kw) or tmp_path / "report.html")
    (tmp_path / "summary.json").write_text(json.dumps({
        "verdict": {"contrasts": [{"a": "shared-2", "b": "shared-0", "mean": -0.01, "ci": [-0.02, -0.001],
                                   "resolved": True}]},
        "sample": {"architecture": "shared-2", "text": "def f(): ⟶ return 1"}}))
    assert main(["compare", "--suite", "shared", "--data", "stdlib", "--seeds", "2", "--steps", "7",
                 "--tune-lr", "1e-3,2e-3", "--checkpoints", "3", "--val-tokens", "4096", "--target-gap", "0.1",
                 "--jobs", "2", "--reuse", "a,b", "--out", str(tmp_path)]) == 0
    s = seen["settings"]
    assert (s.data.data, s.seeds, s.train.steps, s.train.eval_every, s.tune_lr, s.checkpoints, s.val_tokens,
            s.target_gap) == ("stdlib", 2, 7, 50, (1e-3, 2e-3), 3, 4096, 0.1)
    assert seen["reuse"] == ("a", "b") and seen["jobs"] == 2
    out = capsys.readouterr().out
    assert "shared-2 − shared-0: -0.0100 nats, [-0.020, -0.001], resolved" in out
    assert "sample from shared-2: def f(): ⟶ return 1" in out
