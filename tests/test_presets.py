from dataclasses import asdict

import pytest
import torch

from smoe import presets
from smoe.accounting import account
from smoe.models import build_model

TINY = [n for n in presets.names() if n.endswith("-tiny")]
ABLATION = ["dense", "switch", "gshard", "mixtral-style", "deepseekmoe", "deepseek-v3-style"]
REAL = ["mixtral-8x7b", "mixtral-8x22b", "deepseek-moe-16b", "deepseek-v2", "deepseek-v2-lite", "deepseek-v3",
        "kimi-k2", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "grok-1", "dbrx", "arctic", "minimax-m2", "olmoe-1b-7b",
        "llama-moe-3.5b", "minimax-text-01", "qwen3-next-80b-a3b", "kimi-linear-48b-a3b"]


def test_every_named_preset_exists():
    assert set(REAL + ABLATION) <= set(presets.names())
    assert {"mixtral", "deepseek-moe", "deepseek-v2", "deepseek-v3", "qwen2-moe", "qwen3-moe", "grok", "dbrx",
            "arctic", "minimax", "olmoe", "llama-moe", "minimax-text-01", "qwen3-next", "kimi-linear"} == {
        n.removesuffix("-tiny") for n in TINY}


@pytest.mark.parametrize("name", presets.names())
def test_preset_validates_and_is_named(name):
    config = presets.get(name)
    assert config.name == name


@pytest.mark.parametrize("name", TINY + ABLATION)
def test_accounting_matches_the_built_model(name):
    config = presets.get(name)
    model = build_model(config)
    n_model = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("expert_bias"))  # the aux-free bias counts
    acc = account(config)
    assert n_model == acc.total_params + acc.mtp_params


@pytest.mark.parametrize("name", TINY + ABLATION)
def test_small_preset_is_cpu_sized_and_trains(name):
    torch.manual_seed(0)
    config = presets.get(name)
    assert config.vocab_size in (2048, 8192) and 1e6 < account(config).total_params < 60e6
    model = build_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 17))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_ablation_family_is_matched_within_five_percent():
    active = {n: account(presets.get(n)).active_params for n in ABLATION}
    reference = active["dense"]
    assert all(abs(a / reference - 1) < 0.05 for a in active.values()), active


def test_ablation_family_differs_only_in_the_ffn():
    configs = [presets.get(n) for n in ABLATION]
    assert len({(c.attention, c.dim, c.n_layers, c.vocab_size) for c in configs}) == 1


def test_overrides_apply_dotted_paths():
    config = presets.get("mixtral-tiny", **{"moe.top_k": 1, "n_layers": 2})
    assert (config.moe.top_k, config.n_layers) == (1, 2)


def test_unknown_preset_lists_close_names():
    with pytest.raises(ValueError, match=r"unknown preset 'deepseek-v4'; did you mean .*deepseek-v"):
        presets.get("deepseek-v4")


def test_bad_override_names_the_field():
    with pytest.raises(ValueError, match=r"moe\.top_k: must not exceed n_routed_experts"):
        presets.get("mixtral-tiny", **{"moe.top_k": 99})


def _hybrid_structure(config) -> dict:
    """What a tiny twin keeps of its flagship: the mixers and their pattern, the gates, the residual, the MoE style."""
    types, attn, moe = config.layout.layer_types, config.attention, config.moe
    n_full = types.count("full_attention")
    residual = config.residual
    return {
        "mixers": (attn.kind, config.linear_attention.kind, config.linear_attention.chunk),
        "linear per full layer": round((len(types) - n_full) / n_full), "last layer": types[-1],
        "fewer key heads": config.linear_attention.resolved_n_k_heads < config.linear_attention.n_heads,
        "attention": (getattr(attn, "output_gate", False), getattr(attn, "qk_norm", None),
                      getattr(attn, "rotary", True), getattr(attn, "rotary_dim", None) is not None),
        "residual": None if residual is None else {  # each alpha (2 n_layers)^(1/4), each beta as it is
            k: round(v ** 4 / (2 * config.n_layers), 12) if k.endswith("alpha") else v
            for k, v in asdict(residual).items()},
        "moe": (moe.score_func, moe.balance, moe.norm_topk_prob, moe.n_shared_experts, moe.shared_expert_gate,
                moe.routed_scaling_factor, config.layout.first_k_dense, config.layout.n_mtp_modules),
    }


@pytest.mark.parametrize("flagship, twin", [("minimax-text-01", "minimax-text-01-tiny"),
                                            ("qwen3-next-80b-a3b", "qwen3-next-tiny"),
                                            ("kimi-linear-48b-a3b", "kimi-linear-tiny")])
def test_hybrid_tiny_twin_keeps_its_flagships_structure(flagship, twin):
    big, small = presets.get(flagship), presets.get(twin)
    assert _hybrid_structure(small) == _hybrid_structure(big)
    assert 4 <= small.n_layers <= 8
