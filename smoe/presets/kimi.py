"""Kimi Linear (Moonshot AI, "Kimi Linear: An Expressive, Efficient Attention Architecture", Oct 2025): Kimi Delta
Attention in three layers of four, MLA without any position embedding in the others, and DeepSeek-V3's MoE
(sigmoid scores with the aux-loss-free bias, a shared expert, a dense first layer)."""

from smoe.config import LayoutConfig, LinearAttentionConfig, MLAConfig, ModelConfig, MoEConfig


def _kimi_layer_types(n_layers: int, full: tuple[int, ...]) -> tuple[str, ...]:
    return tuple("full_attention" if i in full else "linear_attention" for i in range(n_layers))


def kimi_linear_48b_a3b() -> ModelConfig:
    """https://huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct/blob/main/config.json: 27 layers, d 2304;
    MLA 32 heads, kv_lora_rank 512, qk 128 + 64, v 128, no q_lora, mla_use_nope; linear_attn_config 32 heads of 128,
    short_conv_kernel_size 4, full_attn_layers 4, 8, 12, 16, 20, 24, 27 counted from 1 (transformers'
    KimiLinearConfig default layer_types put 6 MLA layers at 5, 9, ..., 25 instead: not the release); 256 experts of
    1024 top-8 with sigmoid scores renormalised, one shared, routed_scaling_factor 2.446, one expert group;
    first_k_dense_replace 1 with intermediate_size 9216; vocabulary 163,840, untied; num_nextn_predict_layers 0.

    Counts: 49.12B total, what transformers' KimiLinearForCausalLM builds from this config (its parameters plus the
    256 selection biases per MoE layer, exactly): 2.3% above the report's and the name's 48B. Nothing the release
    holds explains the gap (no MTP module, an untied head, a vocabulary the tokenizer fills: pad_token_id is
    163,839); without the embedding and the head the count is 48.37B, which is 48B at the two digits published
    (+0.8%, inside the rounding), so the 48B appears to be a non-embedding count. "A3B": 2.73B activated without the
    embedding and the head, 3.11B without the input embedding only (the convention closest to Kimi K2's published
    32B), 3.48B with both; all three round to 3B, so the figure does not pin a convention."""
    return ModelConfig(
        name="kimi-linear-48b-a3b", vocab_size=163840, dim=2304, n_layers=27, ffn_dim=9216, norm_eps=1e-5,
        max_seq_len=1048576,
        attention=MLAConfig(n_heads=32, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                            qk_rope_head_dim=64, v_head_dim=128, rotary=False),
        linear_attention=LinearAttentionConfig(kind="kda", n_heads=32, head_dim=128, chunk=64),
        moe=MoEConfig(n_routed_experts=256, top_k=8, expert_dim=1024, n_shared_experts=1, score_func="sigmoid",
                      routed_scaling_factor=2.446, balance="aux_free", seq_aux_loss_coef=0.0),
        layout=LayoutConfig(first_k_dense=1, layer_types=_kimi_layer_types(27, (3, 7, 11, 15, 19, 23, 26))),
    )


def kimi_linear_tiny() -> ModelConfig:
    """Kimi Linear's structure at CPU size: 8 layers (the 4th and 8th NoPE MLA, the others Kimi Delta Attention),
    a dense first layer, 32 experts top-4 with sigmoid scores, the bias and a shared expert."""
    return ModelConfig(
        name="kimi-linear-tiny", vocab_size=8192, dim=256, n_layers=8, ffn_dim=768, norm_eps=1e-5, max_seq_len=4096,
        attention=MLAConfig(n_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                            rotary=False),
        linear_attention=LinearAttentionConfig(kind="kda", n_heads=4, head_dim=64, chunk=64),
        moe=MoEConfig(n_routed_experts=32, top_k=4, expert_dim=64, n_shared_experts=1, score_func="sigmoid",
                      routed_scaling_factor=2.446, balance="aux_free", seq_aux_loss_coef=0.0),
        layout=LayoutConfig(first_k_dense=1, layer_types=_kimi_layer_types(8, (3, 7))),
    )


PRESETS = {"kimi-linear-48b-a3b": kimi_linear_48b_a3b, "kimi-linear-tiny": kimi_linear_tiny}
