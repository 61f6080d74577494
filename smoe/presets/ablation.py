"""The head-to-head family: one small size, identical attention, embeddings and depth, every FFN activating the
same 512 hidden units per token (the dense FFN's width) so activated parameters match within 1%.

    dense              one 512-wide SwiGLU FFN
    switch             16 x 512 experts, softmax top-1 (Fedus et al. 2021)
    gshard             16 x 256, softmax top-2 renormalised (Lepikhin et al. 2020)
    mixtral-style      8 x 256, softmax top-2 renormalised (Mixtral, at this size)
    deepseekmoe        64 x 62 fine-grained (segmentation m = 4), top-6 + 2 shared (DeepSeekMoE §3)
    deepseek-v3-style  64 x 62, sigmoid top-7 in 4 of 8 groups + 1 shared, aux-loss-free (DeepSeek-V3 §2.1.2)

The fine-grained experts are 62 wide, not 64, because their routers are counted: 64 x 128 router weights per layer
are as many parameters as 21 hidden units, 3% of the FFN at this width, and matching holds within 2%.

The size (d 128, 4 layers of 4 heads of 32, a 2,048-token vocabulary) is what a 2-core CPU trains at about 5,000
tokens/s per core, so a suite's hundreds of runs of 819k tokens each fit a few hours; the small vocabulary keeps the
embedding and head from dominating the compute, so dense FFN widths 128 to 2048 span 4.7 times the training FLOPs
per token (docs/results.md, "The regime").

Balance: aux 0.01 for the softmax routers (DeepSeekMoE §4.1 uses 0.01 at this scale); V3-style uses the bias with
its complementary sequence-wise loss at 1e-4. All dropless, so capacity is not a confound.

The hybrid suite's models are mixtral-style at 8 layers and at the family's earlier size (d 256, 4 heads of 64, a
1024-wide FFN as 8 experts of 512, an 8,192-token vocabulary), some of whose attention layers are Qwen3-Next's Gated
DeltaNet (docs/linear_attention.md), so that 3:1 and 7:1 are exact:

    hybrid-3to1        layers 4 and 8 full attention, the others Gated DeltaNet (Qwen3-Next's 3:1)
    hybrid-7to1        layer 8 full attention, the others Gated DeltaNet (MiniMax-01's 7:1)
    hybrid-full        the same model with full attention in every layer, their reference
"""

from dataclasses import replace

from smoe.config import AttentionConfig, LayoutConfig, LinearAttentionConfig, ModelConfig, MoEConfig, hybrid_layer_types


def _base(name: str, moe: MoEConfig | None) -> ModelConfig:
    return ModelConfig(
        name=name, vocab_size=2048, dim=128, n_layers=4, ffn_dim=512, max_seq_len=1024,
        attention=AttentionConfig(n_heads=4, n_kv_heads=4), moe=moe,
    )


def dense() -> ModelConfig:
    return _base("dense", None)


def switch() -> ModelConfig:
    return _base("switch", MoEConfig(n_routed_experts=16, top_k=1, expert_dim=512, norm_topk_prob=False))


def gshard() -> ModelConfig:
    return _base("gshard", MoEConfig(n_routed_experts=16, top_k=2, expert_dim=256))


def mixtral_style() -> ModelConfig:
    return _base("mixtral-style", MoEConfig(n_routed_experts=8, top_k=2, expert_dim=256))


def deepseekmoe() -> ModelConfig:
    return _base("deepseekmoe", MoEConfig(n_routed_experts=64, top_k=6, expert_dim=62, n_shared_experts=2,
                                          norm_topk_prob=False))


def deepseek_v3_style() -> ModelConfig:
    return _base("deepseek-v3-style", MoEConfig(
        n_routed_experts=64, top_k=7, expert_dim=62, n_shared_experts=1, score_func="sigmoid", n_group=8,
        topk_group=4, balance="aux_free", seq_aux_loss_coef=1e-4))


# Qwen3-Next's Gated DeltaNet shape (config.json of Qwen/Qwen3-Next-80B-A3B-Instruct: 16 key heads, 32 value heads,
# both of head dim 128, a 4-tap convolution) at the hybrid models' width (d 256): half as many key heads as value
# heads, of the attention's head dim 64. Its q, k (2 x 256 x 128), v, output gate and output (3 x 256 x 256),
# decay and write projections and convolution hold 266,312 parameters against the 262,144 of the 4-head attention
# it replaces (+1.6%).
GATED_DELTA = LinearAttentionConfig(kind="gated_delta", n_heads=4, n_k_heads=2, head_dim=64, conv_kernel=4)


def _hybrid(name: str, full_every: int | None) -> ModelConfig:
    """Mixtral-style at 8 layers and d 256; ``full_every``: every how many layers attention is full (None: all)."""
    config = replace(_base(name, MoEConfig(n_routed_experts=8, top_k=2, expert_dim=512)), vocab_size=8192, dim=256,
                     ffn_dim=1024, n_layers=8)
    if full_every is None:
        return config
    return replace(config, linear_attention=GATED_DELTA,
                   layout=LayoutConfig(layer_types=hybrid_layer_types(8, full_every)))


def hybrid_full() -> ModelConfig:
    return _hybrid("hybrid-full", None)


def hybrid_3to1() -> ModelConfig:
    return _hybrid("hybrid-3to1", 4)


def hybrid_7to1() -> ModelConfig:
    return _hybrid("hybrid-7to1", 8)


PRESETS = {
    "dense": dense,
    "switch": switch,
    "gshard": gshard,
    "mixtral-style": mixtral_style,
    "deepseekmoe": deepseekmoe,
    "deepseek-v3-style": deepseek_v3_style,
    "hybrid-full": hybrid_full,
    "hybrid-3to1": hybrid_3to1,
    "hybrid-7to1": hybrid_7to1,
}
