"""OLMoE (Muennighoff et al. 2024, arXiv 2409.02060): 64 experts top-8, no shared expert, dropless, qk-norm over
all heads, load-balancing loss 0.01 and z-loss 0.001 (§2).

The load-balancing weight is config.json's router_aux_loss_coef (0.01) converted from transformers' pooled loss to
our per-layer one (x top_k / n_layers, see smoe.interop.families.base); the z-loss weight is the paper's, per layer.
"""

from smoe.config import AttentionConfig, ModelConfig, MoEConfig


def olmoe_1b_7b() -> ModelConfig:
    """https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json"""
    return ModelConfig(
        name="olmoe-1b-7b", vocab_size=50304, dim=2048, n_layers=16, ffn_dim=1024, norm_eps=1e-5, max_seq_len=4096,
        attention=AttentionConfig(n_heads=16, n_kv_heads=16, qk_norm="full"),
        moe=MoEConfig(n_routed_experts=64, top_k=8, expert_dim=1024, norm_topk_prob=False,
                      aux_loss_coef=0.01 * 8 / 16, z_loss_coef=0.001),
    )


def olmoe_tiny() -> ModelConfig:
    return ModelConfig(
        name="olmoe-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=128, norm_eps=1e-5, max_seq_len=1024,
        attention=AttentionConfig(n_heads=8, n_kv_heads=8, qk_norm="full"),
        moe=MoEConfig(n_routed_experts=32, top_k=4, expert_dim=128, norm_topk_prob=False, z_loss_coef=0.001),
    )


PRESETS = {"olmoe-1b-7b": olmoe_1b_7b, "olmoe-tiny": olmoe_tiny}
