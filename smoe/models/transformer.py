"""The MoE transformer: embedding, blocks chosen per layer from the config, final norm, head, optional MTP.

Blocks are pre-norm: x + attn(norm(x)), then x + ffn(norm(x)) where ffn is a dense MLP, an MoE layer, or (Arctic)
an MoE layer plus a dense MLP in parallel. Attention is GQA or MLA per the config. Model code is single-device
math: parallelism and compilation are applied from outside.

Decoding (smoe.generate) passes a ``DecodeCache``: per-layer key/value (GQA) or latent (MLA) caches plus which
slots hold real tokens. Rows of a batch are left-padded so that slot s is step s of every row; each row's positions
count only its real tokens, and pad slots are never attended.

Legend: B batch, T sequence (new tokens), S slots (cached + new), D model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import DEFAULT_INT4_GROUP, MLAConfig, ModelConfig, QuantConfig
from smoe.moe import MoELayer, RouterStats, update_expert_bias
from smoe.nn import MLA, MLP, Attention, KVCache, MLACache, RotaryEmbedding, init_weights, make_norm
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
    """The state a decode step carries besides the weights; ``Transformer.new_cache`` builds it."""

    layers: list[KVCache | MLACache]  # one per block
    valid_BS: torch.Tensor  # bool: slot s of row b holds a real token (False: padding, never attended)
    next_pos_B: torch.Tensor  # int64: the position of each row's next real token
    length: int = 0  # slots written so far, the same for every row

    @property
    def max_len(self) -> int:
        return self.valid_BS.shape[1]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, moe: bool):
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.attn_norm = make_norm(config.norm, dim, eps)
        attn = config.attention
        self.attn = MLA(dim, attn, eps) if isinstance(attn, MLAConfig) else Attention(dim, attn, eps)
        self.ffn_norm = make_norm(config.norm, dim, eps)
        self.is_moe = moe
        if moe:
            self.ffn = MoELayer(dim, config.moe, config.activation, config.init_std)
        else:
            self.ffn = MLP(dim, config.ffn_dim, config.activation)
        self.residual_norm = self.residual_ffn = None
        if moe and config.layout.dense_residual:
            self.residual_norm = make_norm(config.norm, dim, eps)
            self.residual_ffn = MLP(dim, config.ffn_dim, config.activation)

    def forward(self, x_BTD, cos, sin, mask_B1TS=None, cache=None, start: int = 0, token_ids_BT=None,
                router_stats: bool = True) -> tuple[torch.Tensor, RouterStats | None]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, mask_B1TS, cache, start)
        stats = None
        if self.is_moe:
            ffn_BTD, stats = self.ffn(self.ffn_norm(x_BTD), token_ids_BT, router_stats)
        else:
            ffn_BTD = self.ffn(self.ffn_norm(x_BTD))
        if self.residual_ffn is not None:
            ffn_BTD = ffn_BTD + self.residual_ffn(self.residual_norm(x_BTD))
        return x_BTD + ffn_BTD, stats


class MTPModule(nn.Module):
    """DeepSeek-V3 §2.2 multi-token prediction: combine the previous depth's hidden state at position t with the
    embedding of token t+d, run one block, and predict token t+d+1 through the shared head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.hidden_norm = make_norm(config.norm, dim, eps)
        self.embed_norm = make_norm(config.norm, dim, eps)
        self.proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = Block(config, moe=config.moe is not None and config.layout.is_moe(config.n_layers - 1))
        self.norm = make_norm(config.norm, dim, eps)

    def forward(self, h_BTD, emb_BTD, cos, sin, token_ids_BT=None):
        x = self.proj(torch.cat([self.hidden_norm(h_BTD), self.embed_norm(emb_BTD)], dim=-1))
        return self.block(x, cos, sin, token_ids_BT=token_ids_BT)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, config.layout.is_moe(i) and config.moe is not None)
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
                  device: torch.device | None = None) -> DecodeCache:
        """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens (prompt + generated), in the
        weights' dtype and device unless given."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len: {max_len} tokens exceed the model's max_seq_len ({self.config.max_seq_len})")
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        layers = [block.attn.new_cache(batch_size, max_len, dtype, device) for block in self.layers]
        valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        return DecodeCache(layers, valid, torch.zeros(batch_size, dtype=torch.long, device=device))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, cache: DecodeCache | None = None,
                logits_to_keep: int = 0, router_stats: bool = True) -> ModelOutput:
        """``labels[b, t]`` is the target of position t (already shifted: usually ``input_ids[b, t + 1]``);
        IGNORE_INDEX (-100) positions do not count.

        ``attention_mask`` (B, T), 1 for real tokens and 0 for (left) padding: positions count real tokens only and
        padding is never attended. ``cache``: ``input_ids`` continue the cached tokens, which the cache records.

        Inference: ``logits_to_keep`` n > 0 computes the logits of the last n positions only (a prefill needs one;
        the head is the largest matmul of a short model), and ``router_stats=False`` skips the router statistics
        (``router_stats`` stays empty, ``aux_loss`` zero)."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"input_ids: sequence length {T} exceeds max_seq_len ({self.config.max_seq_len})")
        mask_B1TS, start = None, 0
        if attention_mask is None and cache is None:
            cos, sin = self.rope(torch.arange(T, device=input_ids.device))
        else:
            if labels is not None:
                raise ValueError("labels: not supported together with attention_mask or cache (training takes "
                                 "unpadded batches)")
            start = cache.length if cache is not None else 0
            positions_BT, mask_B1TS = self._positions_and_mask(input_ids, attention_mask, cache)
            cos, sin = self.rope(positions_BT)
        h = self.embed(input_ids)
        stats: dict[int, RouterStats] = {}
        for i, block in enumerate(self.layers):
            h, s = block(h, cos, sin, mask_B1TS, cache.layers[i] if cache is not None else None, start, input_ids,
                         router_stats)
            if s is not None:
                stats[i] = s
        if cache is not None:
            cache.length += T
        if logits_to_keep < 0 or (logits_to_keep and labels is not None):
            raise ValueError(f"logits_to_keep: must be 0 (every position) or a positive count without labels, got "
                             f"{logits_to_keep}{' with labels' if labels is not None else ''}")
        logits = self._logits(self.norm(h[:, -logits_to_keep:] if logits_to_keep else h))
        out = ModelOutput(logits=logits, router_stats=stats)
        if labels is not None:
            out.lm_loss = _cross_entropy(logits, labels)
            if len(self.mtp):
                out.mtp_loss = self._mtp_loss(h, input_ids, labels, cos, sin, stats)
        if stats:
            out.aux_loss = torch.stack([s.aux_loss for s in stats.values()]).sum()
        if out.lm_loss is not None:
            out.loss = out.lm_loss + out.aux_loss
            if out.mtp_loss is not None:
                out.loss = out.loss + self.config.layout.mtp_loss_coef * out.mtp_loss
        return out

    def _positions_and_mask(self, input_ids, attention_mask, cache: DecodeCache | None):
        """Per-row positions (B, T) and the boolean attention mask (B, 1, T, S) over every slot so far."""
        B, T = input_ids.shape
        device = input_ids.device
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"input_ids: {start} cached + {T} new tokens exceed the cache's max_len "
                             f"({cache.max_len})")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids "
                             f"{tuple(input_ids.shape)}")
        window = getattr(self.config.attention, "sliding_window", None)
        if cache is not None and attention_mask is None:
            # The decode step: every new token is real, so positions advance by one and, without a window, the
            # mask is a view of the validity buffer: nothing is allocated per step beyond the rope angles.
            cache.valid_BS[:, start : start + T] = True
            positions_BT = cache.next_pos_B[:, None] + torch.arange(T, device=device)
            cache.next_pos_B += T
            if T == 1 and window is None:
                return positions_BT, cache.valid_BS[:, None, None, : start + 1]
            valid_BS = cache.valid_BS[:, : start + T]
        else:
            real_BT = (attention_mask.bool() if attention_mask is not None
                       else torch.ones_like(input_ids, dtype=torch.bool))
            # As transformers computes position ids from the mask: real tokens count 0, 1, 2, ... per row.
            positions_BT = real_BT.long().cumsum(1) - 1
            if cache is not None:
                cache.valid_BS[:, start : start + T] = real_BT
                positions_BT = positions_BT + cache.next_pos_B[:, None]
                cache.next_pos_B += real_BT.sum(1)
                valid_BS = cache.valid_BS[:, : start + T]
            else:
                valid_BS = real_BT
            positions_BT = positions_BT.clamp_min(0)
        q_T1 = torch.arange(start, start + T, device=device)[:, None]
        k_S = torch.arange(start + T, device=device)
        allowed_TS = k_S <= q_T1
        if window is not None:
            allowed_TS &= q_T1 - k_S < window
        # A pad query attends to itself: no row is fully masked (its softmax would be NaN, and NaN pad values
        # would leak into real rows as 0 * NaN).
        mask_B1TS = (valid_BS[:, None, None, :] & allowed_TS) | (k_S == q_T1)
        return positions_BT, mask_B1TS

    def _mtp_loss(self, h_BTD, input_ids_BT, labels_BT, cos, sin, stats) -> torch.Tensor:
        # Depth d sees positions t < T - d, the ones whose token t+d is in the batch: its input is input_ids[t+d]
        # and its target labels[t+d]. The input comes from input_ids, not from the labels, so that a position
        # whose label is ignored (-100) still feeds its real token.
        losses = []
        T = labels_BT.shape[1]
        for d, module in enumerate(self.mtp, start=1):
            if T - d <= 0:
                break
            h_BTD, s = module(h_BTD[:, : T - d], self.embed(input_ids_BT[:, d:]), cos[: T - d], sin[: T - d],
                              input_ids_BT[:, d:])
            if s is not None:
                stats[self.config.n_layers + d - 1] = s
            losses.append(_cross_entropy(self._logits(module.norm(h_BTD)), labels_BT[:, d:]))
        return torch.stack(losses).mean() if losses else h_BTD.new_zeros(())


def _cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX)


def build_model(config: ModelConfig) -> Transformer:
    """Validate ``config`` and build the model on the current default device and dtype."""
    return Transformer(config)


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
