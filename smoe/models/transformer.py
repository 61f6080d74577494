"""The MoE transformer: embedding, blocks chosen per layer from the config (smoe.models.block: the token mixer and
the FFN of each), final norm, head, optional MTP. Model code is single-device math: parallelism and compilation are
applied from outside.

Decoding (smoe.generation) passes a ``DecodeCache``: per-layer key/value (GQA), latent (MLA) or recurrent (linear
attention) caches plus the tokens each row holds. Each row keeps its own length (slot s is its position s), so rows
at different points of their sequences decode together and each attends over its own keys only; left padding in
the input is never cached, attended, written into a recurrent state or routed to an expert.

Legend: B batch, T sequence (new tokens), S slots (cached + new), D model dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import DEFAULT_INT4_GROUP, MLAConfig, ModelConfig, QuantConfig
from smoe.models.block import Block, MTPModule
from smoe.moe import MoELayer, RouterStats, RouterStatsMode, update_expert_bias
from smoe.nn import (
    CacheMode,
    LayerCache,
    LightningAttention,
    MixerStep,
    RotaryEmbedding,
    fp32_parameters,
    init_weights,
    make_norm,
)
from smoe.quant.modules import quantize_modules

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # lm_loss + aux_loss + mtp_loss_coef * mtp_loss, when labels are given
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # mean cross-entropy over the MTP depths
    aux_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # sum over MoE layers, weighted
    router_stats: dict[int, RouterStats] = field(default_factory=dict)  # by layer index (MTP: n_layers + depth)


@dataclass
class DecodeCache:
    """The state a decode step carries besides the weights; ``Transformer.new_cache`` builds it. Row b holds its
    tokens in slots 0 .. lengths_B[b] - 1 of every attention layer's buffers, and the state after them in every
    linear-attention layer's; a forward's real tokens are appended to their row. ``rows(start, stop)`` is a cache of
    some rows that writes through (a request's prefill in its own row)."""

    layers: list[LayerCache]  # one per block: KVCache (GQA), MLACache (MLA) or RecurrentState (linear attention)
    lengths_B: torch.Tensor  # int64 on the CPU: the tokens each row holds (``clear`` a row to reuse it)
    max_len: int  # the tokens a row can hold

    def rows(self, start: int, stop: int) -> DecodeCache:
        return DecodeCache([layer.rows(start, stop) for layer in self.layers], self.lengths_B[start:stop], self.max_len)

    def clear(self, row: int) -> None:
        """Row ``row`` starts a new sequence (attention layers' slots are overwritten as it grows again)."""
        self.lengths_B[row] = 0
        for layer in self.layers:
            layer.clear(row)

    @property
    def nbytes(self) -> int:
        """The cache's memory: key/value or latent buffers at max_len, plus the recurrent states."""
        return sum(layer.nbytes for layer in self.layers)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, config.layout.is_moe(i) and config.moe is not None, i)
                                    for i in range(config.n_layers))
        self.norm = make_norm(config.norm, config.dim, config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config) for _ in range(config.layout.n_mtp_modules))
        attn = config.attention
        if isinstance(attn, MLAConfig):
            rot_dim = attn.qk_rope_head_dim
        else:
            rot_dim = attn.rotary_dim or attn.resolved_head_dim(config.dim)
        self.rope = RotaryEmbedding(rot_dim, attn.rope_theta, attn.rope_scaling)
        init_weights(self, config.init_std)
        if config.quantization is not None:  # the structure a quantised checkpoint loads into
            quantize_modules(self, config.quantization)

    @property
    def moe_layers(self) -> list[MoELayer]:
        blocks = [*self.layers, *(m.block for m in self.mtp)]
        return [b.ffn for b in blocks if b.is_moe]

    def set_expert_backend(self, name: str) -> None:
        """Select the expert kernel (smoe.kernels) for every MoE layer; weights are unaffected."""
        for layer in self.moe_layers:
            layer.backend = name

    @torch.no_grad()
    def update_expert_biases(self, loads: dict[int, torch.Tensor]) -> None:
        """Aux-free balancing step, called after the optimizer step with each MoE layer's load summed over
        the step (``RouterStats.load`` by layer index, as in ``ModelOutput.router_stats``)."""
        for idx, layer in self.moe_layers_by_index().items():
            if layer.router.expert_bias is not None and idx in loads:
                bias = layer.router.expert_bias
                bias.copy_(update_expert_bias(bias, loads[idx], layer.config.bias_update_rate))

    def moe_layers_by_index(self) -> dict[int, MoELayer]:
        """MoE layers keyed as ModelOutput.router_stats is (MTP depth d: n_layers + d - 1)."""
        blocks = {i: b for i, b in enumerate(self.layers)}
        blocks.update({self.config.n_layers + d: m.block for d, m in enumerate(self.mtp)})
        return {i: b.ffn for i, b in blocks.items() if b.is_moe}

    def _logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return F.linear(h_BTD, self.embed.weight) if self.head is None else self.head(h_BTD)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | None = None, independent_rows: bool = True) -> DecodeCache:
        """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens (prompt + generated), in the
        weights' dtype and device unless given. ``independent_rows=False`` lets a decode step attend for every row
        in one call (KVCache.batched): faster at large batches, but a row's last bits then depend on the others."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len: {max_len} tokens exceed the model's max_seq_len ({self.config.max_seq_len})")
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        # One row gains nothing from the batched call: the per-row path is the same call without its index tensors
        # and mask.
        batched = not independent_rows and batch_size > 1
        layers = [block.attn.new_cache(batch_size, max_len, dtype, device, batched=batched) for block in self.layers]
        return DecodeCache(layers, torch.zeros(batch_size, dtype=torch.long), max_len)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, cache: DecodeCache | None = None,
                logits_to_keep: int = 0, router_stats: RouterStatsMode | bool | str = True,
                expert_backend: str | None = None, document_starts: torch.Tensor | None = None,
                document_mask: bool = True) -> ModelOutput:
        """``labels[b, t]`` is the target of position t (already shifted: usually ``input_ids[b, t + 1]``);
        IGNORE_INDEX (-100) positions do not count.

        ``attention_mask`` (B, T), 1 for real tokens and 0 for (left) padding: positions count real tokens only;
        padding is never attended, cached or routed to an expert. ``cache``: each row's real tokens continue the
        tokens the cache holds for that row, which it records (a row of padding only is left as it was).

        Packed documents: ``document_starts`` (B, T, bool; ``document_starts(input_ids, eos_id)`` makes it) marks
        the first token of each document a row packs. Linear-attention layers reset their state and convolution
        history there; with ``document_mask`` (default) softmax attention is also masked to each token's own
        document and positions count from its start, so a document computes what it computes alone (False: the
        softmax layers see across documents, as plain packing does). Not with ``attention_mask`` or ``cache``.

        Inference: ``logits_to_keep`` n > 0 computes the logits of the last n positions only (a prefill needs one; the
        head is the largest matmul of a short model); ``router_stats=False`` skips the router statistics
        (``router_stats`` stays empty, ``aux_loss`` zero), ``"load"`` keeps only each layer's ``load`` (a bincount the
        dispatch makes anyway): a ``RouterStatsMode``, or True (ALL), False (NONE) or its value. ``expert_backend``
        overrides the MoE layers' backend for this call: a name or a ``kernels.BackendRequest`` (the decode engine asks
        for ``kernels.ROW_INDEPENDENT``: per-row results that do not depend on the other rows)."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"input_ids: sequence length {T} exceeds max_seq_len ({self.config.max_seq_len})")
        if labels is not None and (attention_mask is not None or cache is not None):
            raise ValueError("labels: not supported together with attention_mask or cache (training takes "
                             "unpadded batches)")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids "
                             f"{tuple(input_ids.shape)}")
        if document_starts is not None:
            if document_starts.shape != input_ids.shape:
                raise ValueError(f"document_starts: shape {tuple(document_starts.shape)} differs from input_ids "
                                 f"{tuple(input_ids.shape)}")
            if attention_mask is not None or cache is not None:
                raise ValueError("document_starts: packed documents are for unpadded rows without a cache (training "
                                 "and evaluation); not with attention_mask or cache")
        stats_mode = RouterStatsMode.of(router_stats)
        real_BT = attention_mask.bool() if attention_mask is not None else None
        starts_BT = document_starts.bool() if document_starts is not None else None
        mask_B1TS = spans = None
        if cache is not None:
            spans, positions_BT = self._spans(real_BT, cache, B, T, input_ids.device)
            cos, sin = self.rope(positions_BT)
        elif real_BT is not None:
            # As transformers computes position ids from the mask: real tokens count 0, 1, 2, ... per row.
            cos, sin = self.rope((real_BT.long().cumsum(1) - 1).clamp_min(0))
            # A pad query attends to itself: no row is fully masked (its softmax would be NaN, and NaN pad values
            # would leak into real rows as 0 * NaN).
            mask_B1TS = (real_BT[:, None, None, :] & self._causal(T, input_ids.device)) | torch.eye(
                T, dtype=torch.bool, device=input_ids.device)
        elif starts_BT is not None and document_mask:
            t_T = torch.arange(T, device=input_ids.device)
            cos, sin = self.rope(t_T - torch.where(starts_BT, t_T, 0).cummax(1).values)  # from each document's start
            doc_BT = starts_BT.long().cumsum(1)
            mask_B1TS = ((doc_BT[:, :, None] == doc_BT[:, None, :]) & self._causal(T, input_ids.device))[:, None]
        else:
            cos, sin = self.rope(torch.arange(T, device=input_ids.device))
        if cache is not None:
            step = MixerStep(CacheMode.CHUNKS, cos, sin, spans=spans, real_BT=real_BT)
        else:
            step = MixerStep(CacheMode.NONE, cos, sin, mask_B1TS=mask_B1TS, real_BT=real_BT, starts_BT=starts_BT)
        h = self.embed(input_ids)
        stats: dict[int, RouterStats] = {}
        for i, block in enumerate(self.layers):
            h, s = block(h, step, cache=cache.layers[i] if cache is not None else None, token_ids_BT=input_ids,
                         router_stats=stats_mode, expert_backend=expert_backend)
            if s is not None:
                stats[i] = s
        if cache is not None:
            cache.lengths_B += torch.tensor([n for _, n in spans])
        if logits_to_keep < 0 or (logits_to_keep and labels is not None):
            raise ValueError(f"logits_to_keep: must be 0 (every position) or a positive count without labels, got "
                             f"{logits_to_keep}{' with labels' if labels is not None else ''}")
        logits = self._logits(self.norm(h[:, -logits_to_keep:] if logits_to_keep else h))
        out = ModelOutput(logits=logits, router_stats=stats)
        if labels is not None:
            out.lm_loss = _cross_entropy(logits, labels)
            if len(self.mtp):
                out.mtp_loss = self._mtp_loss(h, input_ids, labels, step, stats)
        if stats and stats_mode is RouterStatsMode.ALL:
            out.aux_loss = torch.stack([s.aux_loss for s in stats.values()]).sum()
        if out.lm_loss is not None:
            out.loss = out.lm_loss + out.aux_loss
            if out.mtp_loss is not None:
                out.loss = out.loss + self.config.layout.mtp_loss_coef * out.mtp_loss
        return out

    def decode_step(self, ids_B1: torch.Tensor, slots_B: torch.Tensor, layers: list, real_B1: torch.Tensor,
                    count_experts: bool = False) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The next-token logits (B, V) of one new token per row, with static shapes and no host sync: what
        torch.compile captures as one graph (smoe.generation's compiled decode). Row b's token ``ids_B1[b]`` sits
        at position and slot ``slots_B[b]`` of its row in ``layers`` (a DecodeCache's) and attends over the slots
        up to it (``KVCache.step``). Rows that ``real_B1`` marks False are padding: they reach no expert, and their
        key lands in their row's next free slot, which the row's next real token overwrites. The lengths are the
        caller's to advance. With ``count_experts``, the second value holds each MoE layer's tokens per expert
        (padding excluded), else it is empty."""
        cos, sin = self.rope(slots_B[:, None])
        step = MixerStep(CacheMode.STEP, cos, sin, slots_B=slots_B, real_BT=real_B1)
        stats_mode = RouterStatsMode.LOAD if count_experts else RouterStatsMode.NONE
        h = self.embed(ids_B1)
        loads = {}
        for i, (block, layer) in enumerate(zip(self.layers, layers, strict=True)):
            h, stats = block(h, step, cache=layer, token_ids_BT=ids_B1, router_stats=stats_mode)
            if stats is not None:
                loads[i] = stats.load
        return self._logits(self.norm(h[:, -1])), loads

    @staticmethod
    def _spans(real_BT, cache: DecodeCache, B: int, T: int, device) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """Per row (tokens cached, new real tokens), and the new tokens' positions (B, T): each row continues
        from its own length, and its real tokens are the last ones of the row (left padding)."""
        if cache.lengths_B.shape[0] != B:
            raise ValueError(f"cache: holds {cache.lengths_B.shape[0]} rows, input_ids has {B}")
        cached_B = cache.lengths_B.tolist()
        new_B = real_BT.sum(1).tolist() if real_BT is not None else [T] * B
        for b, (cached, new) in enumerate(zip(cached_B, new_B, strict=True)):
            if cached + new > cache.max_len:
                raise ValueError(f"input_ids: row {b}'s {cached} cached + {new} new tokens exceed the cache's "
                                 f"max_len ({cache.max_len})")
        counts_BT = real_BT.long().cumsum(1) if real_BT is not None else torch.arange(1, T + 1, device=device)
        positions_BT = (cache.lengths_B.to(device)[:, None] + counts_BT - 1).clamp_min(0)
        return list(zip(cached_B, new_B, strict=True)), positions_BT

    def _causal(self, T: int, device) -> torch.Tensor:
        """(T, T) bool: which keys each query may attend without a cache (causal, within a sliding window)."""
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        window = getattr(self.config.attention, "sliding_window", None)
        return causal_TT if window is None else causal_TT.triu(1 - window)

    def _mtp_loss(self, h_BTD, input_ids_BT, labels_BT, step: MixerStep, stats) -> torch.Tensor:
        # Depth d sees positions t < T - d, the ones whose token t+d is in the batch: its input is input_ids[t+d]
        # and its target labels[t+d]. The input comes from input_ids, not from the labels, so that a position
        # whose label is ignored (-100) still feeds its real token.
        losses = []
        T = labels_BT.shape[1]
        for d, module in enumerate(self.mtp, start=1):
            if T - d <= 0:
                break
            mask_B1TS = step.mask_B1TS
            shorter = MixerStep(cos=step.cos[..., : T - d, :], sin=step.sin[..., : T - d, :],
                                mask_B1TS=None if mask_B1TS is None else mask_B1TS[..., : T - d, : T - d])
            h_BTD, s = module(h_BTD[:, : T - d], self.embed(input_ids_BT[:, d:]), shorter, input_ids_BT[:, d:])
            if s is not None:
                stats[self.config.n_layers + d - 1] = s
            losses.append(_cross_entropy(self._logits(module.norm(h_BTD)), labels_BT[:, d:]))
        return torch.stack(losses).mean() if losses else h_BTD.new_zeros(())


def document_starts(input_ids_BT: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) bool, True at the first token of each document after the first in a row, for rows that pack
    documents each ended by ``eos_id`` (as smoe's training data is: ``Transformer.forward``'s ``document_starts``).
    A row's first token needs no mark: nothing comes before it."""
    return F.pad(input_ids_BT[:, :-1] == eos_id, (1, 0))


def _cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX)


def build_model(config: ModelConfig) -> Transformer:
    """Validate ``config`` and build the model on the current default device and dtype."""
    return Transformer(config)


def empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                on_meta: Callable[[Transformer], object] | None = None) -> Transformer:
    """The model with uninitialised weights of ``dtype`` (buffers such as the expert bias keep theirs, and so do the
    parameters ``smoe.nn.fp32_parameters`` names), allocated once on ``device``: the destination a loader fills
    tensor by tensor. ``on_meta`` is called with the model before anything is allocated: what it swaps in for
    modules (smoe.offload.experts.offload_experts: the routed experts, left on disk) is allocated in their place."""
    with torch.device("meta"):
        model = build_model(config)
    fp32 = fp32_parameters(model)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if name in fp32 else dtype)
    if on_meta is not None:
        on_meta(model)
    model.to_empty(device=device)
    for m in model.modules():  # the buffers computed from the config, not stored
        if isinstance(m, (RotaryEmbedding, LightningAttention)):
            m.reset_buffers()
    return model


def quantize(model: Transformer, scheme: str, group_size: int | None = None) -> Transformer:
    """Quantise ``model``'s weights in place for inference and return it: ``"int8"`` (per output channel) or
    ``"int4"`` (per group of ``group_size`` inputs: one of smoe.config.INT4_GROUP_SIZES, by default
    DEFAULT_INT4_GROUP). Every linear layer and the routed experts are quantised; embeddings, norms, routers, MLA's
    ``wkv_b`` and a tied head stay as they are (docs/quantization.md). A model already quantised the same way is
    returned unchanged."""
    if scheme == "int4" and group_size is None:
        group_size = DEFAULT_INT4_GROUP
    config = QuantConfig(scheme, group_size)
    config.validate()
    if model.config.quantization is not None:
        if model.config.quantization == config:
            return model
        raise ValueError(f"quantization: the model is already quantised ({model.config.quantization.scheme}); "
                         f"quantise its full-precision checkpoint to {scheme} instead")
    quantize_modules(model, config)
    model.config = replace(model.config, quantization=config)
    return model
