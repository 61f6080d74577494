"""Accounting reproduces the published counts of shared/REFERENCES.md within 0.5%, and is exact on models that
transformers itself builds (tests/test_hf_config.py)."""

import pytest

from smoe import presets
from smoe.accounting import account, format_accounting
from smoe.config import LayoutConfig, ModelConfig


def _close(got: float, published: float, tol: float = 0.005) -> bool:
    return abs(got / published - 1) <= tol


@pytest.mark.parametrize("name, total, active", [
    ("mixtral-8x7b", 46_702_792_704, 12_879_925_248),
    ("deepseek-v3", 671_026_419_200, 37.55e9),
    ("deepseek-v2", 235_741_434_880, 21.38e9),
    ("qwen1.5-moe-a2.7b", 14_315_784_192, 2_689_173_504),
    ("deepseek-moe-16b", 16.376e9, 2.829e9),
])
def test_published_total_and_active(name, total, active):
    acc = account(presets.get(name))
    assert _close(acc.total_params, total), acc.total_params
    assert _close(acc.active_params, active), acc.active_params


def test_deepseek_v3_exact_and_without_input_embedding():
    acc = account(presets.get("deepseek-v3"))
    assert acc.total_params == 671_026_419_200
    assert _close(acc.active_params_excl_embedding, 36.63e9)
    assert _close(acc.mtp_params, 11.6e9, tol=0.01)  # the MTP module, reported beside the total


def test_qwen_non_embedding_active_excludes_embedding_and_head():
    acc = account(presets.get("qwen1.5-moe-a2.7b"))
    non_embedding = acc.active_params - acc.params_by_component["embedding"] - acc.params_by_component["head"]
    assert _close(non_embedding, 2.07e9)


def test_active_equals_total_for_dense_model():
    acc = account(presets.get("dense"))
    assert acc.active_params == acc.total_params


def test_flops_count_attention_context_and_training_is_three_times_forward():
    config = presets.get("mixtral-tiny")
    short, long = account(config, seq_len=128), account(config, seq_len=1024)
    assert long.forward_flops_per_token > short.forward_flops_per_token
    assert short.train_flops_per_token == 3 * short.forward_flops_per_token
    matmul = 2 * (short.active_params - short.params_by_component["embedding"])
    assert short.forward_flops_per_token > matmul * 0.99  # matmuls dominate at this length


def test_kv_cache_mla_latent_is_much_smaller_than_gqa():
    v3, mixtral = account(presets.get("deepseek-v3")), account(presets.get("mixtral-8x7b"))
    assert v3.kv_cache_bytes_per_token["bf16"] == 61 * (512 + 64) * 2
    assert mixtral.kv_cache_bytes_per_token["bf16"] == 32 * 2 * 8 * 128 * 2


def test_moe_layer_frequency_counts_only_moe_layers():
    base = presets.get("mixtral-tiny")
    every_other = ModelConfig(**{**base.__dict__, "layout": LayoutConfig(moe_layer_freq=2)})
    assert account(every_other).n_moe_layers == 2
    assert account(every_other).total_params < account(base).total_params


def test_format_shows_total_in_billions():
    assert "671.0B" in format_accounting(account(presets.get("deepseek-v3")))
