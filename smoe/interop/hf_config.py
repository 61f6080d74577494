"""Hugging Face ``config.json`` <-> ModelConfig (no torch import): ``config_from_hf`` checks the integers against
bounds, then reads with the family's ``read`` (smoe.interop.families, where the reading conventions are described);
``config_to_hf`` writes a family's config.json with its ``write``, refusing what the family cannot express.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smoe.config import ModelConfig
from smoe.interop.families import FAMILIES, TRANSFORMERS_FAMILIES
from smoe.interop.families.base import Reader
from smoe.io.files import read_json

# Upper bounds on the integers of a config.json, checked before anything is built from them: some work (the layer
# lists of a layout, the pieces of a checkpoint, a model on the meta device) grows with them, so a tiny file claiming
# 10^9 layers must be refused, not obeyed. Each bound is many times the largest published model's (about 128 layers,
# Kimi K2's 384 routed experts, 16384-wide models and 53248-wide FFNs, vocabularies of 256k, contexts of 10M tokens),
# so no plausible model hits one. DBRX nests some of its keys in attn_config / ffn_config, Kimi Linear in
# linear_attn_config; rope_scaling holds one.
_LAYERS, _EXPERTS, _WIDTH, _VOCAB, _POSITIONS = 1024, 2**16, 2**20, 2**24, 2**24
_BOUNDS = {
    **dict.fromkeys(("num_hidden_layers", "n_layers", "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step",
                     "num_nextn_predict_layers", "num_mtp_layers"), _LAYERS),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
                     "moe_top_k", "n_shared_experts", "n_group", "topk_group", "num_attention_heads", "n_heads",
                     "num_key_value_heads", "kv_n_heads", "num_experts_per_token", "num_shared_experts",
                     "num_expert_group", "linear_num_key_heads", "linear_num_value_heads", "linear_num_heads",
                     "num_heads"), _EXPERTS),
    **dict.fromkeys(("hidden_size", "d_model", "intermediate_size", "moe_intermediate_size", "ffn_hidden_size",
                     "shared_expert_intermediate_size", "head_dim", "rotary_dim", "q_lora_rank", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_head_dim", "linear_conv_kernel_dim", "short_conv_kernel_size"),
                    _WIDTH),
    "vocab_size": _VOCAB,
    **dict.fromkeys(("max_position_embeddings", "max_seq_len", "sliding_window", "original_max_position_embeddings",
                     "model_max_length"), _POSITIONS),
}


def _check_bounds(hf: dict[str, Any], source: str) -> None:
    """Every bounded key present (at the top level or one object down) is an integer in [0, bound]."""
    nested = [(f"{key}.", value) for key, value in hf.items() if isinstance(value, dict)]
    for prefix, data in [("", hf), *nested]:
        for key, bound in _BOUNDS.items():
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{source}: {prefix}{key} must be an integer, got {value!r}")
            if not 0 <= value <= bound:
                raise ValueError(f"{source}: {prefix}{key} = {value} is outside [0, {bound}], the bound smoe "
                                 "checks before building anything from it")


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map a Hugging Face config dict onto a validated ModelConfig; errors name ``source`` and the key. At top_k 1,
    each family's own renormalisation is kept exactly, constant gate included (smoe.interop.families)."""
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    _check_bounds(hf, source)
    try:
        return FAMILIES[model_type].read(Reader(hf, source)).validate()
    except ValueError as err:
        if str(err).startswith(source):
            raise
        raise ValueError(f"{source}: {err}") from None
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"{source}: malformed {model_type} config ({type(err).__name__}: {err})") from None


def load_hf_config(path: str | Path) -> ModelConfig:
    """Read a config.json file, or the config.json inside a model directory."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file}: no such file" + (" (a directory without config.json)" if path.is_dir() else ""))
    return config_from_hf(read_json(file), str(file))


# --- ModelConfig -> config.json ----------------------------------------------------------------------------------


def check_exportable(config: ModelConfig) -> None:
    """What no family can express: smoe's int8/int4 weights."""
    if config.quantization is not None:
        raise ValueError(f"quantization: a {config.quantization.scheme} model is stored in smoe's own format, which "
                         "transformers does not read; export the full-precision checkpoint")


def config_to_hf(config: ModelConfig, model_type: str) -> dict[str, Any]:
    """The Hugging Face config.json of ``model_type`` describing ``config``; raises naming the field that the
    family cannot express. ``config_from_hf(config_to_hf(c, t))`` gives ``c`` back (up to name and defaults, and a
    routed_scaling_factor the family lacks, which the exported weights carry instead: smoe.interop.hf folds it into
    the experts' down projections, so it is not refused here)."""
    if model_type not in TRANSFORMERS_FAMILIES:
        raise ValueError(f"model_type: unsupported {model_type!r}; supported: {', '.join(TRANSFORMERS_FAMILIES)}")
    check_exportable(config)
    return FAMILIES[model_type].write(config)
