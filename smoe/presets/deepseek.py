"""DeepSeek: DeepSeekMoE (arXiv 2401.06066), DeepSeek-V2 (2405.04434), DeepSeek-V3 (2412.19437), and Kimi K2, which
reuses the V3 architecture. Fine-grained routed experts plus always-on shared experts; V2/V3 use MLA.

DeepSeekMoE 16B and V2 balance as their config.json says (seq_aux: true, aux_loss_alpha): the expert-level loss per
sequence. V2's device-limited routing (§2.2.2) is the group-limited routing here, a group standing for a device.
Not expressed: V2's device-level and communication balance losses and its token dropping at a per-device capacity
(§2.2.3-2.2.4); these presets are dropless.
"""

from smoe.config import AttentionConfig, LayoutConfig, MLAConfig, ModelConfig, MoEConfig, RopeScaling


def deepseek_moe_16b() -> ModelConfig:
    """https://huggingface.co/deepseek-ai/deepseek-moe-16b-base/blob/main/config.json"""
    return ModelConfig(
        name="deepseek-moe-16b", vocab_size=102400, dim=2048, n_layers=28, ffn_dim=10944, max_seq_len=4096,
        attention=AttentionConfig(n_heads=16, n_kv_heads=16),
        moe=MoEConfig(n_routed_experts=64, top_k=6, expert_dim=1408, n_shared_experts=2, norm_topk_prob=False,
                      balance="seq_aux", seq_aux_loss_coef=0.001),
        layout=LayoutConfig(first_k_dense=1),
    )


def _v2_yarn() -> RopeScaling:
    return RopeScaling(type="yarn", factor=40.0, original_max_seq_len=4096, beta_fast=32.0, beta_slow=1.0,
                       mscale=0.707, mscale_all_dim=0.707)


def deepseek_v2() -> ModelConfig:
    """https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/config.json"""
    return ModelConfig(
        name="deepseek-v2", vocab_size=102400, dim=5120, n_layers=60, ffn_dim=12288, max_seq_len=163840,
        attention=MLAConfig(n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                            qk_rope_head_dim=64, v_head_dim=128, rope_scaling=_v2_yarn()),
        moe=MoEConfig(n_routed_experts=160, top_k=6, expert_dim=1536, n_shared_experts=2, norm_topk_prob=False,
                      routed_scaling_factor=16.0, n_group=8, topk_group=3, group_score="max", balance="seq_aux",
                      seq_aux_loss_coef=0.003),
        layout=LayoutConfig(first_k_dense=1),
    )


def deepseek_v2_lite() -> ModelConfig:
    """https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json (no query compression)"""
    return ModelConfig(
        name="deepseek-v2-lite", vocab_size=102400, dim=2048, n_layers=27, ffn_dim=10944, max_seq_len=163840,
        attention=MLAConfig(n_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                            qk_rope_head_dim=64, v_head_dim=128, rope_scaling=_v2_yarn()),
        moe=MoEConfig(n_routed_experts=64, top_k=6, expert_dim=1408, n_shared_experts=2, norm_topk_prob=False,
                      balance="seq_aux", seq_aux_loss_coef=0.001),
        layout=LayoutConfig(first_k_dense=1),
    )


def deepseek_v3() -> ModelConfig:
    """https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json; the balance coefficients are the paper's
    (§2.1.2, §4.2: sequence-wise alpha 1e-4, bias step gamma 1e-3), not config.json's inference-time aux_loss_alpha.
    The MTP module is counted apart from the 671B (smoe.accounting)."""
    return ModelConfig(
        name="deepseek-v3", vocab_size=129280, dim=7168, n_layers=61, ffn_dim=18432, max_seq_len=163840,
        attention=MLAConfig(n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                            qk_rope_head_dim=64, v_head_dim=128,
                            rope_scaling=RopeScaling(type="yarn", factor=40.0, original_max_seq_len=4096,
                                                     mscale=1.0, mscale_all_dim=1.0)),
        moe=MoEConfig(n_routed_experts=256, top_k=8, expert_dim=2048, n_shared_experts=1, score_func="sigmoid",
                      routed_scaling_factor=2.5, n_group=8, topk_group=4, balance="aux_free",
                      seq_aux_loss_coef=1e-4, bias_update_rate=1e-3),
        layout=LayoutConfig(first_k_dense=3, n_mtp_modules=1),
    )


def kimi_k2() -> ModelConfig:
    """https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json: V3's architecture with 384 experts,
    64 heads, one dense layer and no expert groups (balance coefficients as V3's paper; K2 trains with MuonClip)."""
    return ModelConfig(
        name="kimi-k2", vocab_size=163840, dim=7168, n_layers=61, ffn_dim=18432, max_seq_len=131072,
        attention=MLAConfig(n_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                            qk_rope_head_dim=64, v_head_dim=128, rope_theta=50000.0,
                            rope_scaling=RopeScaling(type="yarn", factor=32.0, original_max_seq_len=4096,
                                                     beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)),
        moe=MoEConfig(n_routed_experts=384, top_k=8, expert_dim=2048, n_shared_experts=1, score_func="sigmoid",
                      routed_scaling_factor=2.827, balance="aux_free", seq_aux_loss_coef=1e-4),
        layout=LayoutConfig(first_k_dense=1),
    )


def deepseek_moe_tiny() -> ModelConfig:
    """DeepSeekMoE's architecture at CPU size: dense first layer, 32 fine-grained experts top-4 + 2 shared."""
    return ModelConfig(
        name="deepseek-moe-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=1024, max_seq_len=1024,
        attention=AttentionConfig(n_heads=8, n_kv_heads=8),
        moe=MoEConfig(n_routed_experts=32, top_k=4, expert_dim=128, n_shared_experts=2, norm_topk_prob=False,
                      aux_loss_coef=0.001),
        layout=LayoutConfig(first_k_dense=1),
    )


def deepseek_v2_tiny() -> ModelConfig:
    """DeepSeek-V2's architecture at CPU size: MLA with query compression, group-limited softmax routing."""
    return ModelConfig(
        name="deepseek-v2-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=1024, max_seq_len=1024,
        attention=MLAConfig(n_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                            v_head_dim=32),
        moe=MoEConfig(n_routed_experts=32, top_k=4, expert_dim=128, n_shared_experts=2, norm_topk_prob=False,
                      n_group=4, topk_group=2, group_score="max", aux_loss_coef=0.003),
        layout=LayoutConfig(first_k_dense=1),
    )


def deepseek_v3_tiny() -> ModelConfig:
    """DeepSeek-V3's architecture at CPU size: MLA, sigmoid group-limited routing, aux-free balance, one MTP module."""
    return ModelConfig(
        name="deepseek-v3-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=1024, max_seq_len=1024,
        attention=MLAConfig(n_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                            v_head_dim=32),
        moe=MoEConfig(n_routed_experts=32, top_k=4, expert_dim=128, n_shared_experts=1, score_func="sigmoid",
                      routed_scaling_factor=2.5, n_group=4, topk_group=2, balance="aux_free", seq_aux_loss_coef=1e-4),
        layout=LayoutConfig(first_k_dense=1, n_mtp_modules=1),
    )


PRESETS = {
    "deepseek-moe-16b": deepseek_moe_16b,
    "deepseek-v2": deepseek_v2,
    "deepseek-v2-lite": deepseek_v2_lite,
    "deepseek-v3": deepseek_v3,
    "kimi-k2": kimi_k2,
    "deepseek-moe-tiny": deepseek_moe_tiny,
    "deepseek-v2-tiny": deepseek_v2_tiny,
    "deepseek-v3-tiny": deepseek_v3_tiny,
}
