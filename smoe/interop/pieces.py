"""The pieces a family's key map makes (smoe.interop.families.base describes both): every tensor of our model from
the Hugging Face tensors it is copied from, for import (forwards) and export (backwards), in smoe.interop.hf.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from smoe.config import ModelConfig
from smoe.interop.families.base import KeyMap, Piece

# Tensors some checkpoints carry that hold no weights (old transformers saved RoPE's cache).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def pieces_for(config: ModelConfig, km: KeyMap, state: dict[str, torch.Tensor]) -> list[Piece]:
    """The pieces that build every tensor in ``state`` (our names) from a family's tensors, named by ``km``."""
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
                pieces += [Piece(prefix + "eh_proj.weight", name, (slice(None), slice(0, D)),
                                 lambda t, D=D: t[:, D:], shape=shape),
                           Piece(prefix + "eh_proj.weight", name, (slice(None), slice(D, None)),
                                 lambda t, D=D: t[:, :D], shape=shape)]
            else:
                pieces.append(Piece(prefix + _rename(km.mtp, inner, name), name))
        else:
            pieces.append(Piece(_rename(km.top, name, name), name))
    for d in range(config.layout.n_mtp_modules):
        prefix = km.layer.format(i=n + d)
        pieces.append(Piece(prefix + "embed_tokens.weight", "embed.weight", load=False))
        head = "embed.weight" if config.tie_embeddings else "head.weight"
        pieces.append(Piece(prefix + "shared_head.head.weight", head, load=False))
    if km.shifted is not None:
        shifted = re.compile(km.shifted)
        pieces = [replace(p, offset=1.0) if shifted.search(p.ours) else p for p in pieces]
    return pieces


def ignored(km: KeyMap, name: str) -> bool:
    """A checkpoint tensor that holds no weights of ours (IGNORED, or the family's ``KeyMap.ignore``)."""
    return bool(IGNORED.match(name) or (km.ignore is not None and re.search(km.ignore, name)))


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
