"""Grok-1 (xAI, https://github.com/xai-org/grok-1/blob/main/run.py): 8 GeGLU experts top-2, tied embeddings.

Not expressed by our config and left out: the attention-logit soft cap (30 tanh), the extra post-attention and
post-FFN norms (2 x 6144 weights per layer, 0.0003% of the parameters) and the embedding/output multipliers.
"""

from smoe.config import AttentionConfig, ModelConfig, MoEConfig


def grok_1() -> ModelConfig:
    # ffn_size(6144, widening_factor=8) = int(8 * 6144) * 2 // 3 = 32768
    return ModelConfig(
        name="grok-1", vocab_size=131072, dim=6144, n_layers=64, ffn_dim=32768, activation="gelu", norm_eps=1e-5,
        tie_embeddings=True, max_seq_len=8192,
        attention=AttentionConfig(n_heads=48, n_kv_heads=8, head_dim=128),
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_dim=32768),
    )


def grok_tiny() -> ModelConfig:
    return ModelConfig(
        name="grok-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=512, activation="gelu", norm_eps=1e-5,
        tie_embeddings=True, max_seq_len=1024,
        attention=AttentionConfig(n_heads=8, n_kv_heads=2),
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_dim=512),
    )


PRESETS = {"grok-1": grok_1, "grok-tiny": grok_tiny}
