"""smoe cost: the roofline on known models, with every number computed by hand from the published configs
(tests/test_accounting.py holds the parameter counts these build on)."""

import json
from pathlib import Path

import pytest

from smoe import presets
from smoe.accounting import account
from smoe.cli import main
from smoe.cost import WEIGHT_BYTES, CostSettings, Precision, estimate, experts_hit
from smoe.hardware import HARDWARE, MEASURED_CPU, Hardware

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cost"
H100, H200, A100 = HARDWARE["h100-sxm"], HARDWARE["h200"], HARDWARE["a100-80gb"]


def _decode(name, hw=H100, **settings):
    return estimate(presets.get(name), hw, CostSettings(**settings))


def test_expected_experts_hit_under_uniform_routing():
    assert experts_hit(256, 8, 1) == pytest.approx(8)
    assert experts_hit(8, 2, 8) == pytest.approx(8 * (1 - 0.75**8))  # 7.20 of Mixtral's 8
    assert experts_hit(8, 2, 10**6) == pytest.approx(8)


def test_mixtral_decode_at_batch_1_reads_the_active_weights_and_the_cache():
    report = _decode("mixtral-8x7b", batch=(1,), context=4096)
    step = report.decode[0]
    weights = 12_879_925_248 - 32000 * 4096 + 4096  # active (embedding + head counted), one embedding row read
    cache = 32 * 2 * 8 * 128 * 4096 * 2
    assert step.experts_hit == pytest.approx(2)
    assert step.bytes == pytest.approx(2 * weights + cache)
    assert (step.bound, step.seconds) == ("memory", pytest.approx(step.bytes / 3.35e12))
    assert step.tokens_per_s == pytest.approx(1 / step.seconds)
    assert report.cache_bytes_per_sequence == cache


def test_deepseek_v3_decode_flops_and_cache_bytes():
    acc = account(presets.get("deepseek-v3"))
    step = _decode("deepseek-v3", batch=(4,), context=2048, weights="fp8").decode[0]
    assert acc.matmul_flops_per_token == pytest.approx(2 * acc.active_params_excl_embedding, rel=1e-4)  # norms
    assert step.flops == 4 * (acc.matmul_flops_per_token + 2 * 61 * 128 * (2 * 512 + 64) * 2048)
    cache = 4 * 61 * 576 * 2048 * 2  # bf16 latent: fp8 weights leave activations at the base dtype
    routed = acc.params_by_component["routed_experts"] * experts_hit(256, 8, 4) / 256
    non_routed = acc.total_params - acc.params_by_component["routed_experts"] - 129280 * 7168 + 4 * 7168
    assert step.bytes == pytest.approx(routed + non_routed + cache)  # fp8: one byte a weight


def test_a_hybrid_reads_its_recurrent_state_beside_a_kv_cache_of_its_full_layers_only():
    # Qwen3-Next-80B-A3B: 12 gated-attention layers x 2 KV heads x 256 x (k, v) per token, and 36 Gated DeltaNet
    # states of 32 x 128 x 128 fp32 plus a 3-input convolution history of 8,192 channels in bf16, at any context.
    state = 36 * (32 * 128 * 128 * 4 + 8192 * 3 * 2)
    for context in (1024, 8192):
        report = _decode("qwen3-next-80b-a3b", batch=(2,), context=context)
        assert report.state_bytes_per_sequence == state
        assert report.cache_bytes_per_sequence == 12 * 2 * 2 * 256 * context * 2 + state
        assert report.cache_elements_per_token_layer == 1024
        acc = account(presets.get("qwen3-next-80b-a3b"))
        recurrence = 36 * 2 * 32 * 128 * 128 * 3  # read S^T k, write, read q S: the same at any context
        attention = 12 * 2 * 16 * 2 * 256 * context
        assert report.decode[0].flops == 2 * (acc.matmul_flops_per_token + attention + recurrence)


def test_a_large_batch_becomes_compute_bound_and_prefill_is_compute_bound():
    report = _decode("mixtral-8x7b", batch=(1, 4096), context=16, prompt_len=2048)
    assert [s.bound for s in report.decode] == ["memory", "compute"]  # at long contexts the caches keep it memory
    prefill = report.prefill[0]
    flops = 2048 * account(presets.get("mixtral-8x7b"), seq_len=2048).forward_flops_per_token
    assert prefill.flops == pytest.approx(flops)
    assert (prefill.bound, prefill.seconds) == ("compute", pytest.approx(flops / 989.5e12))


def test_devices_split_the_step_and_price_it():
    one = _decode("mixtral-8x7b", batch=(64,), price_per_hour=2.0).decode[0]
    eight = _decode("mixtral-8x7b", batch=(64,), price_per_hour=2.0, devices=8).decode[0]
    assert eight.seconds == pytest.approx(one.seconds / 8)
    assert eight.tokens_per_s_per_device == pytest.approx(one.tokens_per_s)
    assert one.usd_per_million_tokens == pytest.approx(2.0 / 3600 / one.tokens_per_s * 1e6)


def test_all_to_all_bytes_of_deepseek_v3_at_ep_64():
    report = _decode("deepseek-v3", batch=(64,), devices=64, weights="fp8")
    # docs/benchmarks.md: 8 rows x 63/64 x 7168 x 2 bytes = 112,896 B per token per MoE layer each way
    assert report.all_to_all_bytes_per_token == pytest.approx(58 * 2 * 112_896)
    step = report.decode[0]
    assert step.all_to_all_bytes_per_device == pytest.approx(report.all_to_all_bytes_per_token)  # 64 tokens / 64
    assert step.all_to_all_seconds == pytest.approx(step.all_to_all_bytes_per_device / 450e9)
    assert _decode("deepseek-v3", batch=(64,)).all_to_all_bytes_per_token == 0


def test_memory_per_device_decides_what_fits():
    on = {hw.name: estimate(presets.get("deepseek-v3"), hw, CostSettings(batch=(1,), devices=8, weights="fp8"))
          for hw in (H100, H200)}
    assert not on["h100-sxm"].decode[0].fits and on["h200"].decode[0].fits  # 671 GB over 8: 84 GB per device


def test_precision_follows_what_the_hardware_multiplies():
    assert Precision.of(H100, "fp8") == Precision("fp8", "fp8", "bf16", "bf16")
    assert Precision.of(A100, "fp8") == Precision("fp8", "bf16", "bf16", "bf16")  # no fp8 on Ampere
    assert Precision.of(H100, "int4", "fp8") == Precision("int4", "bf16", "bf16", "fp8")
    assert Precision.of(HARDWARE["desktop-ddr5"], "bf16").matmul == "fp32"
    assert WEIGHT_BYTES["int4"] == 4.25 / 8


def test_every_profile_cites_its_source_and_prices_its_base_dtype():
    for hw in HARDWARE.values():
        assert hw.source and hw.base_dtype in hw.peak_flops and hw.memory_bandwidth > 0


def test_the_docs_configs_are_the_published_sizes():
    from smoe.interop.hf_config import load_hf_config
    from smoe.train.rundir import read_run_config

    qwen = account(load_hf_config(DOCS / "qwen3-235b-a22b.json"))
    assert (round(qwen.total_params / 1e9), round(qwen.active_params / 1e9)) == (235, 22)  # "235B-A22B"
    sizes = {f: account(read_run_config(DOCS / f)[0]).total_params for f in ("llama-3-70b.json", "llama-3.1-405b.json")}
    assert sizes == {"llama-3-70b.json": 70_553_706_496, "llama-3.1-405b.json": 405_853_388_800}


def test_cli_json_reports_each_profile(capsys):
    assert main(["cost", "mixtral-8x7b", "--hardware", "h100-sxm,h200", "--batch", "1,8", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["hardware"]["name"] for r in reports] == ["h100-sxm", "h200"]
    assert [s["batch"] for s in reports[0]["decode"]] == [1, 8]


def test_cli_text_report(capsys):
    assert main(["cost", "--hf-config", str(DOCS / "qwen3-235b-a22b.json"), "--devices", "8",
                 "--price-per-hour", "2"]) == 0
    out = capsys.readouterr().out
    assert "decode at context 4,096" in out and "prefill of 4,096-token prompts" in out and "all-to-all" in out


def test_cli_measures_the_cpu_only_when_asked(monkeypatch, capsys):
    fake = Hardware(MEASURED_CPU, 10e9, {"fp32": 1e11}, "fp32", 16e9, None, "test")
    monkeypatch.setattr("smoe.hardware.measure_cpu", lambda: fake)
    assert main(["cost", "mixtral-tiny", "--hardware", MEASURED_CPU, "--weights", "fp32", "--context", "64",
                 "--json"]) == 0
    step = json.loads(capsys.readouterr().out)[0]["decode"][0]
    assert step["seconds"] == pytest.approx(step["bytes"] / 10e9)


def test_the_default_context_is_the_models_where_that_is_shorter(capsys):
    # mixtral-tiny holds 1,024 positions: the default context of 4,096 refused it before any report
    assert main(["cost", "mixtral-tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert report["settings"]["context"] == 1024 and report["settings"]["prompt_len"] is None
    assert main(["cost", "mixtral-8x7b", "--json"]) == 0  # 32,768 positions: the default stays 4,096
    assert json.loads(capsys.readouterr().out)[0]["settings"]["context"] == 4096
    assert main(["cost", "mixtral-tiny", "--context", "2048"]) == 2  # one given is checked, not shortened
    assert "--context: 2048 exceeds the model's max_seq_len (1024)" in capsys.readouterr().err


def test_quantised_weights_on_the_measured_cpu_are_priced_at_their_kernels_rate():
    # smoe's int8 kernels widen each weight to fp32 before the multiply-add: slower than fp32 GEMM per FLOP, so a
    # 16-row decode of int8 weights is compute-bound on a CPU where fp32 would be memory-bound.
    from smoe.quant.measure import quantized_matmul_flops

    cpu = Hardware(MEASURED_CPU, 12e9, {"fp32": 1.6e11, "int8": 0.6e11}, "fp32", 16e9, None, "test")
    fp32, int8 = (_decode("mixtral-tiny", cpu, batch=(16,), weights=w, context=64).decode[0] for w in ("fp32", "int8"))
    assert int8.seconds == pytest.approx(max(int8.bytes / 12e9, int8.flops / 0.6e11))
    assert fp32.seconds == pytest.approx(max(fp32.bytes / 12e9, fp32.flops / 1.6e11))
    assert quantized_matmul_flops("int4", size=256, seconds=0.01) > 0


@pytest.mark.parametrize("argv, message", [
    (["--hardware", "h100"], "--hardware: unknown profile 'h100'"),
    (["--batch", "0"], "--batch: must be a positive number"),
    (["--context", "40000"], "--context: 40000 exceeds the model's max_seq_len (32768)"),
    (["--prompt-len", "40000"], "--prompt-len: 40000 exceeds"),
])
def test_bad_settings_are_named_before_any_measurement(argv, message, monkeypatch, capsys):
    monkeypatch.setattr("smoe.hardware.measure_cpu", lambda: pytest.fail("measured before checking"))
    assert main(["cost", "mixtral-8x7b", *argv, *([] if "--hardware" in argv else ["--hardware", MEASURED_CPU])]) == 2
    assert message in capsys.readouterr().err


def test_a_gpu_is_recognised_by_its_device_name_for_the_training_mfu():
    from smoe.hardware import profile_of

    assert profile_of("NVIDIA H100 80GB HBM3").name == "h100-sxm"
    assert profile_of("NVIDIA H200").name == "h200" and profile_of("NVIDIA GeForce RTX 4090").name == "rtx-4090"
    assert profile_of("NVIDIA L4").peak_flops["bf16"] == 121e12
    assert profile_of("Tesla T4") is None
