"""The Hugging Face families smoe reads and writes, one module each: a module defines its ``Family`` objects (one
per ``model_type``) and imports only smoe.interop.families.base, where what several families share lives. Adding a
family is a new module here and its name in the list below.

Reading: the keys that fix a model's size (``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``; DBRX's ``d_model``, ``n_layers``, ``n_heads``) are required; any other absent key takes the
default of that family's transformers config class, as transformers itself would. What our config cannot express
(a bias on the attention output, sliding windows on some layers only) raises naming the key instead of being dropped.

Top-1 renormalisation: Mixtral, MiniMax-M2 and DBRX (``moe_normalize_expert_weights``) always renormalise the
top-k weights, Qwen, OLMoE and transformers' DeepseekV3 when ``norm_topk_prob``, at k = 1 too, where every weight is
then a constant. We keep that exactly, for logit parity, though the LM loss cannot train such a router
(``MoEConfig.gate_is_constant``). DeepSeek's own code and transformers' DeepseekV2 differ (families.deepseek).
"""

from __future__ import annotations

from smoe.interop.families import (
    dbrx,
    deepseek,
    kimi_linear,
    llama,
    minimax,
    minimax_m2,
    mixtral,
    olmoe,
    qwen3_next,
    qwen_moe,
)
from smoe.interop.families.base import Family

# In this order an unsupported model_type's error lists them, and export tries them for a config of no family.
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for module in (mixtral, qwen_moe, deepseek, olmoe, dbrx, minimax_m2, llama, qwen3_next, minimax, kimi_linear)
    for f in module.FAMILIES
}
TRANSFORMERS_FAMILIES = tuple(t for t, f in FAMILIES.items() if f.write is not None)  # built into transformers
