"""The dense Llama family, what dense-to-MoE upcycling starts from (smoe.upcycling): Llama (``llama``), Mistral
(``mistral``) and Qwen2 (``qwen2``), GQA with RoPE and a SwiGLU FFN in every layer, no MoE. Defaults: transformers'
LlamaConfig, MistralConfig and Qwen2Config."""

from __future__ import annotations

from typing import Any

from smoe.config import AttentionConfig, ModelConfig
from smoe.interop.families.base import (
    DENSE_MLP,
    GQA,
    Family,
    Reader,
    base_out,
    gqa_out,
    llama_key_map,
    read_common,
    read_head_dim,
    read_rope,
    read_sliding,
    require,
)


def _read(r: Reader, *, ffn_dim: int, kv_heads: int | None, max_pos: int, qkv_bias: bool = False,
          sliding: int | None = None) -> ModelConfig:
    """``kv_heads`` None: as many as the query heads (Llama's default)."""
    theta, scaling = read_rope(r)
    heads = int(r.req("num_attention_heads"))
    return ModelConfig(
        **read_common(r, eps=1e-6, max_pos=max_pos),
        ffn_dim=int(r.opt("intermediate_size", ffn_dim)),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(r.opt("num_key_value_heads", kv_heads or heads)),
                                  head_dim=read_head_dim(r, heads), rope_theta=theta, rope_scaling=scaling,
                                  qkv_bias=qkv_bias, sliding_window=sliding),
        moe=None,
    )


def read_llama(r: Reader) -> ModelConfig:
    r.reject("attention_bias", "mlp_bias", why="Llama's optional biases (ours: on q, k, v only, none on the MLP)")
    return _read(r, ffn_dim=11008, kv_heads=None, max_pos=2048)


def read_mistral(r: Reader) -> ModelConfig:
    # MistralConfig's sliding_window defaults to 4096 when the key is absent; null (v0.2 on) turns it off.
    window = r.data["sliding_window"] if "sliding_window" in r.data else 4096
    return _read(r, ffn_dim=14336, kv_heads=8, max_pos=4096 * 32, sliding=None if window is None else int(window))


def read_qwen2(r: Reader) -> ModelConfig:
    # Qwen2 always biases q, k and v (not o); its sliding layers are those from max_window_layers on.
    window = read_sliding(r, lambda i: i >= int(r.opt("max_window_layers", 28)))
    return _read(r, ffn_dim=22016, kv_heads=32, max_pos=32768, qkv_bias=True, sliding=window)


def write(c: ModelConfig, model_type: str) -> dict[str, Any]:
    """Qwen2 biases q, k and v, Llama and Mistral nothing; only Mistral and Qwen2 slide, every layer or none."""
    out = base_out(c, model_type, dense=True)
    window = c.attention.sliding_window if isinstance(c.attention, AttentionConfig) else None
    require(model_type, window is None or model_type != "llama", "attention.sliding_window",
            "Llama has no sliding window")
    out.update(gqa_out(c, model_type, "none", model_type == "qwen2"), intermediate_size=c.ffn_dim)
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        out["sliding_window"] = window
    else:  # Qwen2 slides on the layers from max_window_layers on: all of them, or none
        out.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)
    return out


KEY_MAP = llama_key_map(GQA, DENSE_MLP)
FAMILIES = (Family("llama", read_llama, KEY_MAP, lambda c: write(c, "llama"), "LlamaForCausalLM"),
            Family("mistral", read_mistral, KEY_MAP, lambda c: write(c, "mistral"), "MistralForCausalLM"),
            Family("qwen2", read_qwen2, KEY_MAP, lambda c: write(c, "qwen2"), "Qwen2ForCausalLM"))
