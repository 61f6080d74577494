"""Mixtral (Jiang et al. 2024, arXiv 2401.04088): 8 large SwiGLU experts, softmax top-2 renormalised, GQA.

The paper gives no balance coefficient; aux_loss_coef is config.json's router_aux_loss_coef converted from
transformers' pooled loss to our per-layer one (x top_k / n_layers, see smoe.interop.families.base).
"""

from smoe.config import AttentionConfig, ModelConfig, MoEConfig


def mixtral_8x7b() -> ModelConfig:
    """https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json"""
    return ModelConfig(
        name="mixtral-8x7b", vocab_size=32000, dim=4096, n_layers=32, ffn_dim=14336, norm_eps=1e-5,
        max_seq_len=32768,
        attention=AttentionConfig(n_heads=32, n_kv_heads=8, rope_theta=1e6),
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_dim=14336, aux_loss_coef=0.02 * 2 / 32),
    )


def mixtral_8x22b() -> ModelConfig:
    """https://huggingface.co/mistralai/Mixtral-8x22B-v0.1/blob/main/config.json"""
    return ModelConfig(
        name="mixtral-8x22b", vocab_size=32768, dim=6144, n_layers=56, ffn_dim=16384, norm_eps=1e-5,
        max_seq_len=65536,
        attention=AttentionConfig(n_heads=48, n_kv_heads=8, rope_theta=1e6),
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_dim=16384, aux_loss_coef=0.001 * 2 / 56),
    )


def mixtral_tiny() -> ModelConfig:
    """Mixtral's architecture at CPU size."""
    return ModelConfig(
        name="mixtral-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=512, norm_eps=1e-5, max_seq_len=1024,
        attention=AttentionConfig(n_heads=8, n_kv_heads=2, rope_theta=1e6),
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_dim=512),
    )


PRESETS = {"mixtral-8x7b": mixtral_8x7b, "mixtral-8x22b": mixtral_8x22b, "mixtral-tiny": mixtral_tiny}
