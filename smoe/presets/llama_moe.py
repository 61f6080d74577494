"""LLaMA-MoE (Zhu et al. 2024, arXiv 2406.16554, "LLaMA-MoE: Building Mixture-of-Experts from LLaMA with Continual
Pre-training"): LLaMA-2-7B with each FFN's 11008 hidden units split into 16 experts of 688, 4 active, then trained
further (200B tokens). 6.7B total, 3.5B activated (the paper's and model card's figures, rounded to 2 digits).

The experts and everything outside them are LLaMA-2-7B's (meta-llama/Llama-2-7b-hf config.json: MHA 32 x 128,
RMSNorm eps 1e-5, vocabulary 32000, untied head). Its gate takes the softmax of the top-4 logits and multiplies the
expert outputs by score_scale_factor = E/K (the paper's rescaling; llama-moe/LLaMA-MoE-v1-3_5B-2_8's config.json
holds 4.0 = 8/2): routed_scaling_factor 4.0 here. What smoe leaves out: its gate is a two-layer network (d -> E,
tanh, E -> E; ours is one linear map, so the router count differs by E^2 = 256 per layer) with learned noise in
training, and its balance loss is the squared coefficient of variation of importance and load (weight 0.01;
ours: the Switch loss at 0.01). smoe.upcycling builds this architecture from LLaMA-2-7B (`smoe upcycle --method
split --experts 16 --top-k 4`), with its own scale (spec.py).
"""

from smoe.config import AttentionConfig, ModelConfig, MoEConfig


def llama_moe_35b() -> ModelConfig:
    """https://huggingface.co/llama-moe/LLaMA-MoE-v1-3_5B-4_16 (LLaMA-MoE-3.5B (4/16))"""
    return ModelConfig(
        name="llama-moe-3.5b", vocab_size=32000, dim=4096, n_layers=32, ffn_dim=11008, norm_eps=1e-5,
        max_seq_len=4096, attention=AttentionConfig(n_heads=32, n_kv_heads=32),
        moe=MoEConfig(n_routed_experts=16, top_k=4, expert_dim=688, routed_scaling_factor=4.0),
    )


def llama_moe_tiny() -> ModelConfig:
    """LLaMA-MoE's architecture at CPU size: a 1024-wide FFN split into 16 experts of 64, top-4."""
    return ModelConfig(
        name="llama-moe-tiny", vocab_size=8192, dim=256, n_layers=4, ffn_dim=1024, norm_eps=1e-5, max_seq_len=1024,
        attention=AttentionConfig(n_heads=4, n_kv_heads=4),
        moe=MoEConfig(n_routed_experts=16, top_k=4, expert_dim=64, routed_scaling_factor=4.0),
    )


PRESETS = {"llama-moe-3.5b": llama_moe_35b, "llama-moe-tiny": llama_moe_tiny}
