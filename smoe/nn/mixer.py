"""The token mixers' one contract: softmax attention (``Attention``), multi-head latent attention (``MLA``) and the
three linear-attention layers (smoe.nn.linear_layers) are each called ``mixer(x_BTD, step, cache)`` and make their
cache with ``mixer.new_cache(batch_size, max_len, dtype, device, batched=...)``, so a block runs whichever it holds
without asking which.

``MixerStep`` is what one forward gives every mixer of the model besides its input and its own layer's cache: the
rotary tables, which keys each query may see, how the new tokens meet the cache (``CacheMode``), which tokens are
real and where packed documents start. Each mixer reads the fields it needs (the linear layers have no rotary
tables and no slots: their state is constant in the context length).

Legend: B batch, T new tokens, S keys (cached slots + new), D model dim.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch


class CacheMode(enum.Enum):
    """How a call's new tokens meet the cache."""

    NONE = "none"  # no cache: the tokens attend among themselves (training, evaluation, scoring)
    CHUNKS = "chunks"  # row b's new real tokens continue the ``spans[b][0]`` its cache row holds (prefill, decode)
    STEP = "step"  # one token per row at slot ``slots_B[b]``, static shapes, no host sync (the compiled decode step)


@dataclass(frozen=True)
class MixerStep:
    """What every token mixer of one forward needs besides its input and its own cache (module docstring)."""

    mode: CacheMode = CacheMode.NONE
    cos: torch.Tensor | None = None  # rotary tables at the new tokens' positions (softmax attention and MLA)
    sin: torch.Tensor | None = None
    mask_B1TS: torch.Tensor | None = None  # NONE: the keys each query may attend where not plain causal (True: may)
    spans: list[tuple[int, int]] | None = None  # CHUNKS: per row (tokens cached, new real tokens)
    slots_B: torch.Tensor | None = None  # STEP: the slot, which is the position, of each row's token
    real_BT: torch.Tensor | None = None  # bool, False at (left) padding; None: every token is real
    starts_BT: torch.Tensor | None = None  # bool, True at the first token of each packed document (mode NONE)

    def __post_init__(self) -> None:
        if self.mode is CacheMode.CHUNKS and self.spans is None:
            raise ValueError("spans: a CHUNKS step needs each row's (cached, new) token counts")
        if self.mode is CacheMode.STEP and self.slots_B is None:
            raise ValueError("slots_B: a STEP needs each row's slot")


class LayerCache(Protocol):
    """One layer's decode state (``KVCache``, ``MLACache``, ``RecurrentState``): what a ``DecodeCache`` and the
    engine do with it whatever the layer."""

    batched: bool  # a one-token step attends for every row in one call (rows then depend on each other)

    def rows(self, start: int, stop: int) -> LayerCache: ...  # views of rows [start, stop), written through

    def clear(self, row: int) -> None: ...  # row ``row`` starts a new sequence

    @property
    def nbytes(self) -> int: ...

    @property
    def slot_axes(self) -> list[tuple[torch.Tensor, int]]: ...  # buffers growing with the context, and their axis


class TokenMixer(Protocol):
    def __call__(self, x_BTD: torch.Tensor, step: MixerStep, cache: LayerCache | None = None) -> torch.Tensor: ...

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device, *,
                  batched: bool = False) -> LayerCache: ...
