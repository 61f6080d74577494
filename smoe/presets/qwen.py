"""Qwen-MoE: Qwen1.5-MoE (a sigmoid-gated shared expert beside 60 routed ones), Qwen3-MoE (128 experts top-8,
per-head qk-norm, no shared expert) and Qwen3-Next (Gated DeltaNet in three layers of four, output-gated attention
with RoPE on a quarter of each head in the fourth, 512 experts top-10 plus a gated shared expert).

aux_loss_coef is config.json's router_aux_loss_coef converted from transformers' pooled loss to our per-layer one
(x top_k / n_layers, see smoe.interop.families.base).
"""

from smoe.config import AttentionConfig, LayoutConfig, LinearAttentionConfig, ModelConfig, MoEConfig, hybrid_layer_types


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


def qwen3_next_80b_a3b() -> ModelConfig:
    """https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct/blob/main/config.json, whose shape transformers'
    Qwen3NextConfig defaults mirror (48 layers, d 2048, full_attention_interval 4, attention 16 heads / 2 KV heads of
    256 with partial_rotary_factor 0.25, Gated DeltaNet 32 value heads / 16 key heads of 128 with a 4-tap
    convolution, 512 experts of 512 top-10 and a gated shared one of 512, vocabulary 151,936, untied). From
    config.json, not the defaults: rope_theta 1e7 (default 1e4), 262,144 positions, rms_norm_eps 1e-6;
    intermediate_size 5120 builds nothing (every layer is MoE).

    Counts: the total is what transformers' Qwen3NextForCausalLM builds from that config, exactly, 0.4% below the
    name's 80B. The checkpoint also ships one multi-token-prediction layer (mtp.*: fc 2d -> d, a gated-attention
    block with the MoE, norms), expressed as n_mtp_modules=1 and reported beside the total as DeepSeek-V3's is; with
    it the weights total 81.3B. "A3B": 3.25B activated without the embedding and the head; Qwen's convention for
    Qwen1.5-MoE's 2.7B and Qwen3-30B-A3B's 3.3B counts both, which here gives 3.87B, not 3B. The RMSNorms scale by
    (1 + w) (zero-centred): the importer (smoe/interop/families/qwen3_next.py) stores 1 + w, and leaves the mtp.*
    weights out as transformers does. The MTP loss weight is not published: mtp_loss_coef keeps DeepSeek-V3's
    default."""
    n_layers = 48
    return ModelConfig(
        name="qwen3-next-80b-a3b", vocab_size=151936, dim=2048, n_layers=n_layers, ffn_dim=5120, max_seq_len=262144,
        attention=AttentionConfig(n_heads=16, n_kv_heads=2, head_dim=256, rotary_dim=64, rope_theta=1e7,
                                  qk_norm="head", output_gate=True),
        linear_attention=LinearAttentionConfig(kind="gated_delta", n_heads=32, n_k_heads=16, head_dim=128, chunk=64),
        moe=MoEConfig(n_routed_experts=512, top_k=10, expert_dim=512, n_shared_experts=1, shared_expert_gate=True,
                      norm_topk_prob=True, aux_loss_coef=0.001 * 10 / n_layers),
        layout=LayoutConfig(layer_types=hybrid_layer_types(n_layers, 4), n_mtp_modules=1),
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


def qwen3_next_tiny() -> ModelConfig:
    """Qwen3-Next's structure at CPU size: 8 layers (every 4th output-gated attention), Gated DeltaNet with half as
    many key heads as value heads, 32 experts top-4 and a gated shared expert, one MTP module."""
    return ModelConfig(
        name="qwen3-next-tiny", vocab_size=8192, dim=256, n_layers=8, ffn_dim=512, max_seq_len=4096,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=64, rotary_dim=16, rope_theta=1e7,
                                  qk_norm="head", output_gate=True),
        linear_attention=LinearAttentionConfig(kind="gated_delta", n_heads=4, n_k_heads=2, head_dim=64, chunk=64),
        moe=MoEConfig(n_routed_experts=32, top_k=4, expert_dim=64, n_shared_experts=1, shared_expert_gate=True,
                      norm_topk_prob=True),
        layout=LayoutConfig(layer_types=hybrid_layer_types(8, 4), n_mtp_modules=1),
    )


PRESETS = {
    "qwen1.5-moe-a2.7b": qwen15_moe_a27b,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "qwen3-next-80b-a3b": qwen3_next_80b_a3b,
    "qwen2-moe-tiny": qwen2_moe_tiny,
    "qwen3-moe-tiny": qwen3_moe_tiny,
    "qwen3-next-tiny": qwen3_next_tiny,
}
