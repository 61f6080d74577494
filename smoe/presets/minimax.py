"""MiniMax-Text-01 (MiniMax-01 report, arXiv 2501.08313): a hybrid of lightning (linear) attention and one softmax
attention layer in eight, 32 experts top-2, and a residual added to the normalised input, scaled by
alpha = (2 x 80)^(1/4) (DeepNet's scaling).

MiniMax-M2: 256 experts top-8 with sigmoid scores and a selection bias, partial rotary embeddings and qk-norm
over all heads (https://huggingface.co/MiniMaxAI/MiniMax-M2/blob/main/config.json).

Not expressed: the multi-token-prediction modules of config.json (use_mtp, num_mtp_modules), whose structure
transformers does not implement; n_mtp_modules stays 0, and the total leaves them out as the published 230B
appears to."""

from smoe.config import (
    AttentionConfig,
    LayoutConfig,
    LinearAttentionConfig,
    ModelConfig,
    MoEConfig,
    ResidualConfig,
    hybrid_layer_types,
)


def _residual(n_layers: int) -> ResidualConfig:
    alpha = (2 * n_layers) ** 0.25
    return ResidualConfig(alpha, 1.0, alpha, 1.0, alpha, 1.0)


def minimax_text_01() -> ModelConfig:
    """https://huggingface.co/MiniMaxAI/MiniMax-Text-01/blob/main/config.json (80 layers, d 6144; attn_type_list
    a softmax layer at every 8th, 64 heads of 128 with 8 KV heads and rotary_dim 64, rope_theta 1e7; lightning
    attention 64 heads of 128; 32 experts of 9216 top-2, no shared expert; vocabulary 200,064, untied;
    layernorm_*_alpha 3.5566 = (2 x 80)^(1/4), betas 1, postnorm: the residual is the normalised input). The same
    values are in MiniMax-M1's config.json, which keeps Text-01's architecture. transformers' MiniMaxConfig defaults
    are a small model, not this one.

    Counts: 456.09B total, as transformers' MiniMaxForCausalLM builds it from these values, against the report's
    456B; the report's 45.9B activated leaves out the embedding and the head (45.95B here; 48.40B with them).
    max_seq_len is the report's 4M-token inference context. transformers' MiniMax rotates whole heads, so this config
    (and its twin) does not export to that family: the export refuses attention.rotary_dim by name."""
    n_layers = 80
    return ModelConfig(
        name="minimax-text-01", vocab_size=200064, dim=6144, n_layers=n_layers, ffn_dim=9216, norm_eps=1e-5,
        max_seq_len=4 * 1024 * 1024,
        attention=AttentionConfig(n_heads=64, n_kv_heads=8, head_dim=128, rotary_dim=64, rope_theta=1e7),
        linear_attention=LinearAttentionConfig(kind="lightning", n_heads=64, head_dim=128, chunk=64),
        moe=MoEConfig(n_routed_experts=32, top_k=2, expert_dim=9216, aux_loss_coef=0.001 * 2 / n_layers),
        layout=LayoutConfig(layer_types=hybrid_layer_types(n_layers, 8)),
        residual=_residual(n_layers),
    )


def minimax_text_01_tiny() -> ModelConfig:
    """MiniMax-Text-01's structure at CPU size: 8 layers (the last one softmax attention), lightning attention,
    8 experts top-2, the scaled residual."""
    n_layers = 8
    return ModelConfig(
        name="minimax-text-01-tiny", vocab_size=8192, dim=256, n_layers=n_layers, ffn_dim=512, norm_eps=1e-5,
        max_seq_len=4096,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=64, rotary_dim=32, rope_theta=1e7),
        linear_attention=LinearAttentionConfig(kind="lightning", n_heads=4, head_dim=64, chunk=64),
        moe=MoEConfig(n_routed_experts=8, top_k=2, expert_dim=256),
        layout=LayoutConfig(layer_types=hybrid_layer_types(n_layers, 8)),
        residual=_residual(n_layers),
    )


def minimax_m2() -> ModelConfig:
    return ModelConfig(
        name="minimax-m2", vocab_size=200064, dim=3072, n_layers=62, ffn_dim=1536, max_seq_len=196608,
        attention=AttentionConfig(n_heads=48, n_kv_heads=8, head_dim=128, rotary_dim=64, rope_theta=5e6,
                                  qk_norm="full"),
        moe=MoEConfig(n_routed_experts=256, top_k=8, expert_dim=1536, score_func="sigmoid", norm_topk_prob=True,
                      balance="aux_free", seq_aux_loss_coef=0.0),
    )


def minimax_tiny() -> ModelConfig:
    return ModelConfig(
        name="minimax-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=128, max_seq_len=1024,
        attention=AttentionConfig(n_heads=8, n_kv_heads=2, head_dim=64, rotary_dim=32, rope_theta=5e6,
                                  qk_norm="full"),
        moe=MoEConfig(n_routed_experts=32, top_k=4, expert_dim=128, score_func="sigmoid", norm_topk_prob=True,
                      balance="aux_free", seq_aux_loss_coef=0.0),
    )


PRESETS = {"minimax-text-01": minimax_text_01, "minimax-text-01-tiny": minimax_text_01_tiny, "minimax-m2": minimax_m2,
           "minimax-tiny": minimax_tiny}
