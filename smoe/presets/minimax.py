"""MiniMax-M2: 256 experts top-8 with sigmoid scores and a selection bias, partial rotary embeddings and qk-norm
over all heads (https://huggingface.co/MiniMaxAI/MiniMax-M2/blob/main/config.json).

Not expressed: the multi-token-prediction modules of config.json (use_mtp, num_mtp_modules), whose structure
transformers does not implement; n_mtp_modules stays 0, and the total leaves them out as the published 230B
appears to."""

from smoe.config import AttentionConfig, ModelConfig, MoEConfig


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


PRESETS = {"minimax-m2": minimax_m2, "minimax-tiny": minimax_tiny}
