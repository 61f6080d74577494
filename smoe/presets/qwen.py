"""Qwen-MoE: Qwen1.5-MoE (a sigmoid-gated shared expert beside 60 routed ones) and Qwen3-MoE (128 experts top-8,
per-head qk-norm, no shared expert).

aux_loss_coef is config.json's router_aux_loss_coef converted from transformers' pooled loss to our per-layer one
(x top_k / n_layers, see smoe.interop.families.base).
"""

from smoe.config import AttentionConfig, ModelConfig, MoEConfig


def qwen15_moe_a27b() -> ModelConfig:
    """https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/blob/main/config.json"""
    return ModelConfig(
        name="qwen1.5-moe-a2.7b", vocab_size=151936, dim=2048, n_layers=24, ffn_dim=5632, max_seq_len=8192,
        attention=AttentionConfig(n_heads=16, n_kv_heads=16, rope_theta=1e6, qkv_bias=True),
        moe=MoEConfig(n_routed_experts=60, top_k=4, expert_dim=1408, n_shared_experts=1, shared_expert_dim=5632,
                      shared_expert_gate=True, norm_topk_prob=False, aux_loss_coef=0.001 * 4 / 24),
    )


def qwen3_30b_a3b() -> ModelConfig:
    """https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json"""
    return ModelConfig(
        name="qwen3-30b-a3b", vocab_size=151936, dim=2048, n_layers=48, ffn_dim=6144, max_seq_len=40960,
        attention=AttentionConfig(n_heads=32, n_kv_heads=4, head_dim=128, rope_theta=1e6, qk_norm="head"),
        moe=MoEConfig(n_routed_experts=128, top_k=8, expert_dim=768, norm_topk_prob=True, aux_loss_coef=0.001 * 8 / 48),
    )


def qwen2_moe_tiny() -> ModelConfig:
    """Qwen1.5-MoE's architecture at CPU size."""
    return ModelConfig(
        name="qwen2-moe-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=1024, max_seq_len=1024,
        attention=AttentionConfig(n_heads=4, n_kv_heads=4, rope_theta=1e6, qkv_bias=True),
        moe=MoEConfig(n_routed_experts=16, top_k=4, expert_dim=128, n_shared_experts=1, shared_expert_dim=512,
                      shared_expert_gate=True, norm_topk_prob=False),
    )


def qwen3_moe_tiny() -> ModelConfig:
    """Qwen3-MoE's architecture at CPU size (head_dim != dim / heads, as in the real model)."""
    return ModelConfig(
        name="qwen3-moe-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=768, max_seq_len=1024,
        attention=AttentionConfig(n_heads=8, n_kv_heads=2, head_dim=64, rope_theta=1e6, qk_norm="head"),
        moe=MoEConfig(n_routed_experts=32, top_k=4, expert_dim=96, norm_topk_prob=True),
    )


PRESETS = {
    "qwen1.5-moe-a2.7b": qwen15_moe_a27b,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "qwen2-moe-tiny": qwen2_moe_tiny,
    "qwen3-moe-tiny": qwen3_moe_tiny,
}
