"""The hybrid suite (issue 15): full attention against 3:1 and 7:1 Gated DeltaNet hybrids at matched compute, and
the report's measurement of decoding at long context (smoe.eval.long_context)."""

import json
import math

import pytest
import torch

from smoe.accounting import account, attention_params, linear_attention_params
from smoe.eval import long_context, report
from smoe.eval.settings import CompareSettings
from smoe.eval.suite import MATCH_TOLERANCE, Arch, Contrast, Suite, check_design
from smoe.eval.suites import SUITES
from smoe.eval.verdict import judge
from smoe.models import build_model
from smoe.train.config import TrainConfig

# The suite's models at a tiny width (8 layers kept: the presets' layer_types name 8)
TINY = {"dim": 32, "vocab_size": 300, "attention.n_heads": 2, "attention.n_kv_heads": 2, "moe.expert_dim": 16,
        "max_seq_len": 64}
TINY_LINEAR = {**TINY, "linear_attention.n_heads": 2, "linear_attention.n_k_heads": 1,
               "linear_attention.head_dim": 16}
TINY_ARCHS = [Arch("full", "mixtral-style", {**TINY, "n_layers": 8}), Arch("3to1", "hybrid-3to1", TINY_LINEAR)]


def _suite(archs):
    return Suite(archs, contrasts=(Contrast(archs[1].label, archs[0].label, "active", "t"),))


def test_the_hybrid_suite_holds_full_attention_3to1_and_7to1_of_gated_deltanet():
    suite = SUITES["hybrid"]
    configs = {a.label: a.config() for a in suite.archs}
    assert list(configs) == ["full-attention", "hybrid-3to1", "hybrid-7to1"]
    full = {label: (c.layout.layer_types or ("full_attention",) * 8).count("full_attention")
            for label, c in configs.items()}
    assert full == {"full-attention": 8, "hybrid-3to1": 2, "hybrid-7to1": 1}
    assert all(c.n_layers == 8 and c.moe == configs["full-attention"].moe for c in configs.values())
    assert all(c.attention == configs["full-attention"].attention for c in configs.values())
    assert {c.linear_attention.kind for c in configs.values() if c.linear_attention} == {"gated_delta"}
    assert long_context.differs_in_layer_types(suite.archs)
    assert not long_context.differs_in_layer_types(SUITES["seeds-debate"].archs)


def test_the_hybrid_suite_is_matched_on_parameters_and_training_flops():
    suite = SUITES["hybrid"]
    table = check_design(suite, seq_len=128)
    assert suite.matching == "active" and all(r["matched"] for r in table.values())
    assert all(abs(r["matched_vs_reference"]) <= MATCH_TOLERANCE for r in table.values())
    flops = {label: r["flops_per_token"] for label, r in table.items()}
    # the chunked recurrence (chunk 64) costs more than the attention scores it replaces at 128 tokens
    extra = {label: f / flops["full-attention"] - 1 for label, f in flops.items()}
    assert extra == pytest.approx({"full-attention": 0, "hybrid-3to1": 0.048, "hybrid-7to1": 0.056}, abs=0.001)
    hybrid = suite.archs[1].config()  # one Gated DeltaNet layer against the attention layer it replaces
    assert linear_attention_params(hybrid) / attention_params(hybrid) - 1 == pytest.approx(0.016, abs=0.001)


def test_long_context_is_a_positive_number_of_tokens():
    with pytest.raises(ValueError, match="long_context: must be a positive"):
        CompareSettings(long_context=0).validate()
    # no run depends on it: changing it keeps the suite's definition
    assert CompareSettings(long_context=256).definition() == CompareSettings().definition()


def test_decoding_at_long_context_measures_speed_and_the_cache_accounting_predicts(tmp_path, monkeypatch):
    for name, value in (("BATCH_SIZES", (1, 3)), ("STEPS", 3), ("REPEATS", 2), ("PREFILL_CHUNK", 40)):
        monkeypatch.setattr(long_context, name, value)
    measured = long_context.measure_suite(tmp_path, TINY_ARCHS, CompareSettings(long_context=96), "cpu")["archs"]
    for r in measured.values():
        assert set(r["decode_tok_s"]) == {"1", "3"}
        assert all(len(v) == 2 and all(math.isfinite(x) and x > 0 for x in v) for v in r["decode_tok_s"].values())
        assert r["cache_bytes"] == r["predicted_cache_bytes"] == r["kv_bytes"] + r["state_bytes"]
        assert r["decode_flops"] > r["attention_flops"] > 0 and r["prefill_s"] > 0
    full, hybrid = measured["full"], measured["3to1"]
    assert (full["full_layers"], full["linear_layers"], hybrid["full_layers"], hybrid["linear_layers"]) == (8, 0, 2, 6)
    assert full["state_bytes"] == 0 < hybrid["state_bytes"]
    assert hybrid["kv_bytes"] * 4 == full["kv_bytes"]  # 2 of 8 layers keep keys and values
    config = TINY_ARCHS[0].config()  # at 96 tokens: 8 layers x (k + v) x 32 channels x fp32
    assert full["kv_bytes"] == 8 * 2 * 32 * 96 * 4 and account(config).n_linear_layers == 0


def test_a_batch_decodes_from_copies_of_the_prefilled_row():
    model = build_model(TINY_ARCHS[1].config()).eval()
    with torch.inference_mode():
        one = model.new_cache(1, 32)
        model(torch.randint(0, 300, (1, 20)), cache=one)
        batch = model.new_cache(3, 32)
        long_context._copy_row(one, batch)
    assert batch.lengths_B.tolist() == [20, 20, 20]
    for src, dst in zip(one.layers, batch.layers, strict=True):
        tensors = [name for name, t in vars(src).items() if isinstance(t, torch.Tensor)]
        assert tensors and all(torch.equal(getattr(dst, n)[b], getattr(src, n)[0]) for n in tensors for b in range(3))


def _fake(archs):
    rates = {"1": [10.0, 12.0, 11.0], "8": [40.0, 44.0, 38.0]}
    result = {"decode_tok_s": rates, "prefill_s": 3.5, "cache_bytes": 2**21, "predicted_cache_bytes": 2**21,
              "kv_bytes": 2**21 - 2**10, "state_bytes": 2**10, "decode_flops": 2e7, "attention_flops": 1e6,
              "full_layers": 2, "linear_layers": 6}
    settings = {"context": 8192, "batch_sizes": [1, 8], "steps": 32, "repeats": 3, "device": "cpu", "threads": 1}
    return {"settings": settings, "archs": {a: {**result, "decode_tok_s": {k: [x * (i + 1) for x in v]
                                                                           for k, v in rates.items()}}
                                            for i, a in enumerate(archs)}}


def _fake_runs(labels):
    """collect()'s data and the matched table for two seeds of each architecture (no training)."""
    data, matched = {}, {}
    for i, label in enumerate(labels):
        per_seed = [2.0 + 0.05 * i, 2.1 + 0.02 * i]
        data[label] = {"curves": [([1, 2], [x + 1.0, x]) for x in per_seed],
                       "final": [{"val_loss": x, "val_bpb": x / 3} for x in per_seed],
                       "summaries": [{"peak_device_bytes": 2**20, "peak_rss_bytes": 0, "tokens_per_s": 10.0}] * 2,
                       "precision": ["fp32"] * 2, "balance": [([1, 2], [0.0, 0.0])] * 2, "loads": {},
                       "hashes": [{"tokenizer_sha256": "a" * 64, "validation_sha256": "b" * 64}] * 2}
        matched[label] = {"total_params": 1e6, "active_params": 1e6, "active_vs_first": 0.0, "flops_per_token": 1e9,
                          "moe": True}
    return data, matched


def _document(data, matched, decoding=None):
    spec = _suite([Arch(label, "mixtral-style") for label in data])
    losses = {label: [f["val_loss"] for f in e["final"]] for label, e in data.items()}
    return report.build_document("hybrid", spec, CompareSettings(seeds=2), matched, data, {},
                                 judge(spec.contrasts, losses, 0.03), None, decoding=decoding)


def test_the_report_shows_decode_speed_with_its_spread_and_the_cache_beside_accounting():
    data, matched = _fake_runs(["full-attention", "hybrid-3to1"])
    md = report.to_markdown(_document(data, matched, decoding=_fake(list(data))))
    assert "### Decoding at 8,192 tokens of context" in md
    assert ("| full-attention | 2 / 6 | 12.0 (11.0, 10.0-12.0) | 44.0 (40.0, 38.0-44.0) | 1.00x | 1.00x | "
            "2.00 (2.00) |") in md
    assert "| hybrid-3to1 | 2 / 6 | 24.0 (22.0, 20.0-24.0) | 88.0 (80.0, 76.0-88.0) | 2.00x | 2.00x |" in md
    without = _document(data, matched)
    assert "Decoding at" not in report.to_markdown(without)


def test_a_suite_of_different_layer_types_reports_decoding_and_reuses_the_measurement(tmp_path, monkeypatch):
    data, matched = _fake_runs([a.label for a in TINY_ARCHS])
    monkeypatch.setattr(report, "collect", lambda out, archs, seeds: _fake_runs([a.label for a in archs])[0])
    monkeypatch.setattr(report, "run_analyses", lambda *args, **kwargs: {})
    monkeypatch.setattr(report, "sample_text", lambda *args, **kwargs: "a sample")
    monkeypatch.setattr(long_context, "BATCH_SIZES", (1, 2))
    monkeypatch.setattr(long_context, "STEPS", 2)
    monkeypatch.setattr(long_context, "REPEATS", 2)
    settings = CompareSettings(train=TrainConfig(device="cpu"), seeds=2, long_context=80)
    report.write_report(tmp_path, "tiny-hybrid", _suite(TINY_ARCHS), settings, matched, log=lambda m: None)
    md = (tmp_path / "report.md").read_text()
    assert "### Decoding at 80 tokens of context" in md and "| 3to1 | 2 / 6 |" in md
    saved = json.loads((tmp_path / long_context.FILE).read_text())
    assert saved["settings"]["context"] == 80 and saved["settings"]["threads"] == 1
    assert set(saved["archs"]) == {"full", "3to1"}

    def remeasured(*args, **kwargs):
        raise AssertionError("measured again with unchanged settings")

    monkeypatch.setattr(long_context, "measure", remeasured)
    report.write_report(tmp_path, "tiny-hybrid", _suite(TINY_ARCHS), settings, matched, log=lambda m: None)
    with pytest.raises(AssertionError, match="measured again"):  # a changed setting measures again
        report.write_report(tmp_path, "tiny-hybrid", _suite(TINY_ARCHS), CompareSettings(long_context=96), matched)
    same_layers = _suite([TINY_ARCHS[0], Arch("full-2", "mixtral-style", {**TINY, "n_layers": 8})])
    report.write_report(tmp_path / "plain", "plain", same_layers, settings, matched | {"full-2": matched["full"]},
                        log=lambda m: None)  # no linear layers anywhere: no section, nothing measured
    assert "Decoding at" not in (tmp_path / "plain" / "report.md").read_text()
