"""Snowflake Arctic: a dense transformer with a 128-expert top-2 MoE in parallel with every dense FFN
(https://huggingface.co/Snowflake/snowflake-arctic-base/blob/main/config.json, parallel_attn_mlp_res=true,
moe_layer_frequency=1). The residual MLP is hidden_size wide (modeling_arctic.py: ffn_dim = hidden_size when
is_residual_mlp), hence ffn_dim = dim; the experts are intermediate_size wide.

Approximated: Arctic feeds its MoE the block's input (post_attention_layernorm(residual_input), in parallel with
attention), while our dense_residual block feeds both FFNs the post-attention stream; parameters are identical.
Arctic trains with token dropping at capacity 1.0 (moe_token_dropping); this preset is dropless like the others
(set moe.capacity_factor=1.0 to follow it)."""

from smoe.config import AttentionConfig, LayoutConfig, ModelConfig, MoEConfig


def arctic() -> ModelConfig:
    return ModelConfig(
        name="arctic", vocab_size=32000, dim=7168, n_layers=35, ffn_dim=7168, norm_eps=1e-5, max_seq_len=4096,
        attention=AttentionConfig(n_heads=56, n_kv_heads=8),
        moe=MoEConfig(n_routed_experts=128, top_k=2, expert_dim=4864),
        layout=LayoutConfig(dense_residual=True),
    )


def arctic_tiny() -> ModelConfig:
    return ModelConfig(
        name="arctic-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=256, norm_eps=1e-5, max_seq_len=1024,
        attention=AttentionConfig(n_heads=8, n_kv_heads=2),
        moe=MoEConfig(n_routed_experts=32, top_k=2, expert_dim=256),
        layout=LayoutConfig(dense_residual=True),
    )


PRESETS = {"arctic": arctic, "arctic-tiny": arctic_tiny}
