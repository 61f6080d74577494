"""One declarative key map per Hugging Face family, and the pieces both directions of a conversion are made of.

Every tensor of our model is assembled from *pieces*: a piece copies one Hugging Face tensor (or a view of it: a
row block of a fused QKV, an expert of a fused expert tensor, a transposed expert) into a region of one of our
tensors. Importing runs the pieces forwards, exporting backwards (smoe.interop.hf), so the two directions cannot
disagree. The pieces come from a family's ``KeyMap``: renames of modules or tensors inside a block, the block
prefix, and the per-expert names that are stacked into our ``w_gate_up (E, 2F, D)`` (gate rows first) and
``w_down (E, D, F)``.

Legend: E routed experts, F expert hidden dim, D model dim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from smoe.config import ModelConfig
from smoe.interop.families import FAMILIES


@dataclass(frozen=True)
class KeyMap:
    """How one family names its tensors. ``block`` maps our module (or tensor) names inside a transformer block to
    theirs, the longest matching prefix wins; ``experts`` are the per-expert tensor names (gate, up, down) with
    ``{e}``; ``fused`` builds pieces for tensors that are not plain renames (DBRX)."""

    top: dict[str, str]
    layer: str  # the block prefix, with {i}
    block: dict[str, str]
    experts: tuple[str, str, str] | None = None
    mtp: dict[str, str] = field(default_factory=dict)  # DeepSeek-V3 multi-token-prediction extras, per MTP layer
    fused: Callable[[ModelConfig, int, str], list["Piece"]] | None = None


_LLAMA_TOP = {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GQA = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
        "attn.wo": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
_MLA = {"attn.wq": "self_attn.q_proj", "attn.wq_a": "self_attn.q_a_proj", "attn.q_norm": "self_attn.q_a_layernorm",
        "attn.wq_b": "self_attn.q_b_proj", "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
        "attn.kv_norm": "self_attn.kv_a_layernorm", "attn.wkv_b": "self_attn.kv_b_proj", "attn.wo": "self_attn.o_proj"}
_DENSE_MLP = {"ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj", "ffn.down": "mlp.down_proj"}
_MLP_EXPERTS = tuple(f"mlp.experts.{{e}}.{w}_proj.weight" for w in ("gate", "up", "down"))
_W_EXPERTS = tuple(f"block_sparse_moe.experts.{{e}}.{w}.weight" for w in ("w1", "w3", "w2"))
_DEEPSEEK_MOE = {**_DENSE_MLP, "ffn.router": "mlp.gate", "ffn.router.expert_bias": "mlp.gate.e_score_correction_bias",
                 "ffn.shared.gate": "mlp.shared_experts.gate_proj", "ffn.shared.up": "mlp.shared_experts.up_proj",
                 "ffn.shared.down": "mlp.shared_experts.down_proj"}
# DeepSeek-V3's MTP layer L = n_layers + d holds a whole block plus these; its embed_tokens and shared_head.head
# repeat the model's embedding and head.
_DEEPSEEK_MTP = {"hidden_norm": "hnorm", "embed_norm": "enorm", "norm": "shared_head.norm", "proj": "eh_proj"}

_MIXTRAL = KeyMap(_LLAMA_TOP, "model.layers.{i}.", {**_NORMS, **_GQA, "ffn.router": "block_sparse_moe.gate"},
                  _W_EXPERTS)
_QWEN3_MOE = KeyMap(_LLAMA_TOP, "model.layers.{i}.", {**_NORMS, **_GQA, **_DENSE_MLP, "ffn.router": "mlp.gate"},
                    _MLP_EXPERTS)
_QWEN2_MOE = replace(_QWEN3_MOE, block={
    **_QWEN3_MOE.block, "ffn.shared.gate": "mlp.shared_expert.gate_proj", "ffn.shared.up": "mlp.shared_expert.up_proj",
    "ffn.shared.down": "mlp.shared_expert.down_proj", "ffn.shared_gate": "mlp.shared_expert_gate"})
_DEEPSEEK_V1 = KeyMap(_LLAMA_TOP, "model.layers.{i}.", {**_NORMS, **_GQA, **_DEEPSEEK_MOE}, _MLP_EXPERTS)
_DEEPSEEK_V3 = KeyMap(_LLAMA_TOP, "model.layers.{i}.", {**_NORMS, **_MLA, **_DEEPSEEK_MOE}, _MLP_EXPERTS,
                      mtp=_DEEPSEEK_MTP)
_LLAMA = KeyMap(_LLAMA_TOP, "model.layers.{i}.", {**_NORMS, **_GQA, **_DENSE_MLP})  # dense: Llama, Mistral, Qwen2
_MINIMAX_M2 = replace(_MIXTRAL, block={**_MIXTRAL.block,
                                       "ffn.router.expert_bias": "block_sparse_moe.e_score_correction_bias"})


def _dbrx_fused(config: ModelConfig, i: int, prefix: str) -> list["Piece"]:
    """DBRX fuses q, k, v into one ``Wqkv`` and stores each expert projection as one (E*F, D) matrix, the down
    projection transposed."""
    attn, moe, D = config.attention, config.moe, config.dim
    q, kv = attn.n_heads * attn.resolved_head_dim(D), attn.n_kv_heads * attn.resolved_head_dim(D)
    E, F = moe.n_routed_experts, moe.expert_dim
    wqkv, mlp, ours = f"{prefix}norm_attn_norm.attn.Wqkv.weight", f"{prefix}ffn.experts.mlp.", f"layers.{i}."
    qkv_shape, expert_shape = (q + 2 * kv, D), (E * F, D)
    return [
        Piece(wqkv, ours + "attn.wq.weight", view=lambda t: t[:q], shape=qkv_shape),
        Piece(wqkv, ours + "attn.wk.weight", view=lambda t: t[q:q + kv], shape=qkv_shape),
        Piece(wqkv, ours + "attn.wv.weight", view=lambda t: t[q + kv:], shape=qkv_shape),
        Piece(mlp + "w1", ours + "ffn.experts.w_gate_up", (slice(None), slice(0, F)), lambda t: t.view(E, F, D),
              shape=expert_shape),
        Piece(mlp + "v1", ours + "ffn.experts.w_gate_up", (slice(None), slice(F, None)), lambda t: t.view(E, F, D),
              shape=expert_shape),
        Piece(mlp + "w2", ours + "ffn.experts.w_down", view=lambda t: t.view(E, F, D).transpose(1, 2),
              shape=expert_shape),
    ]


_DBRX = KeyMap({"embed": "transformer.wte", "norm": "transformer.norm_f", "head": "lm_head"},
               "transformer.blocks.{i}.",
               {"attn_norm": "norm_attn_norm.norm_1", "ffn_norm": "norm_attn_norm.norm_2",
                "attn.wo": "norm_attn_norm.attn.out_proj", "ffn.router": "ffn.router.layer"},
               fused=_dbrx_fused)

KEY_MAPS: dict[str, KeyMap] = {
    "mixtral": _MIXTRAL,
    "qwen2_moe": _QWEN2_MOE,
    "qwen3_moe": _QWEN3_MOE,
    "olmoe": _QWEN3_MOE,
    "deepseek": _DEEPSEEK_V1,
    "deepseek_v2": _DEEPSEEK_V3,
    "deepseek_v3": _DEEPSEEK_V3,
    "kimi_k2": _DEEPSEEK_V3,
    "dbrx": _DBRX,
    "minimax_m2": _MINIMAX_M2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}
assert KEY_MAPS.keys() == FAMILIES.keys()
# Tensors some checkpoints carry that hold no weights (old transformers saved RoPE's cache).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Piece:
    """``ours[index]`` <-> ``view(theirs)``: the unit both directions of a conversion are made of."""

    hf: str
    ours: str
    index: tuple = ()
    view: Callable[[torch.Tensor], torch.Tensor] | None = None
    load: bool = True  # False: a duplicate the checkpoint repeats (DeepSeek-V3's MTP embedding and head)
    shape: tuple[int, ...] | None = None  # theirs, when it is not ours[index]'s (a view's source, for export)

    def source(self, t: torch.Tensor) -> torch.Tensor:
        return self.view(t) if self.view is not None else t


def pieces_for(config: ModelConfig, model_type: str, state: dict[str, torch.Tensor]) -> list[Piece]:
    """The pieces that build every tensor in ``state`` (our names) for ``model_type``."""
    km = KEY_MAPS[model_type]
    pieces: list[Piece] = []
    n = config.n_layers
    for i in range(n):
        if km.fused is not None:
            pieces += km.fused(config, i, km.layer.format(i=i))
    claimed = {p.ours for p in pieces}
    for name, tensor in state.items():
        if name in claimed:
            continue
        top, _, rest = name.partition(".")
        if top == "layers":
            i, _, inner = rest.partition(".")
            pieces += _block_pieces(km, int(i), f"layers.{i}.", inner, tensor)
        elif top == "mtp":
            d, _, inner = rest.partition(".")
            prefix = km.layer.format(i=n + int(d))
            if inner.startswith("block."):
                pieces += _block_pieces(km, n + int(d), f"mtp.{d}.block.", inner[len("block."):], tensor)
            elif inner == "proj.weight":  # ours concatenates [hidden, embedding], DeepSeek [embedding, hidden]
                D, shape = config.dim, tuple(tensor.shape)
                pieces += [Piece(prefix + "eh_proj.weight", name, (slice(None), slice(0, D)), lambda t: t[:, D:],
                                 shape=shape),
                           Piece(prefix + "eh_proj.weight", name, (slice(None), slice(D, None)), lambda t: t[:, :D],
                                 shape=shape)]
            else:
                pieces.append(Piece(prefix + _rename(km.mtp, inner, name), name))
        else:
            pieces.append(Piece(_rename(km.top, name, name), name))
    for d in range(config.layout.n_mtp_modules):
        prefix = km.layer.format(i=n + d)
        pieces.append(Piece(prefix + "embed_tokens.weight", "embed.weight", load=False))
        head = "embed.weight" if config.tie_embeddings else "head.weight"
        pieces.append(Piece(prefix + "shared_head.head.weight", head, load=False))
    return pieces


def _block_pieces(km: KeyMap, hf_index: int, ours_prefix: str, inner: str, tensor: torch.Tensor) -> list[Piece]:
    prefix, name = km.layer.format(i=hf_index), ours_prefix + inner
    if inner in ("ffn.experts.w_gate_up", "ffn.experts.w_down"):
        if km.experts is None:
            raise AssertionError(f"{name}: the key map has no per-expert names")
        gate, up, down = (prefix + t for t in km.experts)
        E = tensor.shape[0]
        if inner.endswith("w_down"):
            return [Piece(down.format(e=e), name, (e,)) for e in range(E)]
        F = tensor.shape[1] // 2
        return [p for e in range(E) for p in (Piece(gate.format(e=e), name, (e, slice(0, F))),
                                              Piece(up.format(e=e), name, (e, slice(F, None))))]
    return [Piece(prefix + _rename(km.block, inner, name), name)]


def _rename(table: dict[str, str], inner: str, full: str) -> str:
    """``inner`` renamed by its longest module (or whole-tensor) prefix in ``table``."""
    if inner in table:
        return table[inner]
    parts = inner.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in table:
            return ".".join([table[module], *parts[cut:]])
    raise AssertionError(f"{full}: no Hugging Face name in the key map")  # a key-map bug, not a user error
