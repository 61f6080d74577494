"""DBRX (Databricks): 16 experts top-4, bias-free LayerNorm, q/k/v clipped to [-8, 8].

aux_loss_coef is config.json's moe_loss_weight converted from transformers' pooled loss to our per-layer one
(x top_k / n_layers, see smoe.interop.families.base).
"""

from smoe.config import AttentionConfig, ModelConfig, MoEConfig


def dbrx() -> ModelConfig:
    """https://huggingface.co/databricks/dbrx-base/blob/main/config.json"""
    return ModelConfig(
        name="dbrx", vocab_size=100352, dim=6144, n_layers=40, ffn_dim=10752, norm="layernorm", norm_eps=1e-5,
        max_seq_len=32768,
        attention=AttentionConfig(n_heads=48, n_kv_heads=8, rope_theta=500000.0, clip_qkv=8.0),
        moe=MoEConfig(n_routed_experts=16, top_k=4, expert_dim=10752, norm_topk_prob=True, aux_loss_coef=0.05 * 4 / 40),
    )


def dbrx_tiny() -> ModelConfig:
    return ModelConfig(
        name="dbrx-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=256, norm="layernorm", norm_eps=1e-5,
        max_seq_len=1024,
        attention=AttentionConfig(n_heads=8, n_kv_heads=2, rope_theta=500000.0, clip_qkv=8.0),
        moe=MoEConfig(n_routed_experts=16, top_k=4, expert_dim=256, norm_topk_prob=True),
    )


PRESETS = {"dbrx": dbrx, "dbrx-tiny": dbrx_tiny}
