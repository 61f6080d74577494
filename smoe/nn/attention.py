"""Grouped-query attention via scaled_dot_product_attention (causal, optional sliding window), and its decode cache.

Legend: B batch, T new tokens (queries), S keys (cached slots + new), D model dim, H query heads, G key/value heads,
K head dim, Q = H x K (the heads' outputs side by side).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import AttentionConfig
from smoe.nn.mixer import CacheMode, MixerStep
from smoe.nn.norm import RMSNorm
from smoe.nn.rope import apply_rope


def causal_mask(T: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """None when plain causal attention suffices (SDPA's is_causal), else a boolean (T, T) mask."""
    if window is None or window >= T:
        return None
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j < window)


def attend(q_BHTK, k_BGSK, v_BGSV, window: int | None, scale: float | None = None, mask_B1TS=None) -> torch.Tensor:
    """Causal attention over S == T keys with an optional sliding window; or, given ``mask_B1TS`` (True: may
    attend), exactly that mask, which the caller built for cached keys and padding (window included)."""
    if mask_B1TS is None:
        mask_B1TS = causal_mask(q_BHTK.shape[2], window, q_BHTK.device)
        causal = mask_B1TS is None
    else:
        causal = False
    gqa = k_BGSK.shape[1] != q_BHTK.shape[1]
    return F.scaled_dot_product_attention(
        q_BHTK, k_BGSK, v_BGSV, attn_mask=mask_B1TS, is_causal=causal, scale=scale, enable_gqa=gqa
    )


def chunk_mask(cached: int, n: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Which of ``cached + n`` keys each of ``n`` new queries (at key slots cached .. cached + n - 1) may attend:
    a (1, 1, n, cached + n) boolean mask (causal, within the window)."""
    q_T1 = torch.arange(cached, cached + n, device=device)[:, None]
    k_S = torch.arange(cached + n, device=device)
    allowed_TS = k_S <= q_T1
    if window is not None:
        allowed_TS &= q_T1 - k_S < window
    return allowed_TS[None, None]


class KVCache:
    """Keys and values of one GQA layer for decoding: static (B, G, S_max, K) buffers written in place, so a decode
    step allocates nothing. Row b holds its tokens' keys in slots 0 .. length - 1 (slot = position, no padding), so
    rows of different lengths share the buffers and each attends over exactly its own keys.

    ``batched`` (set by ``Transformer.new_cache(independent_rows=False)``): a step of one new token per row attends
    for every row in one call over the longest row's slots, each row masked to its own keys. Faster than a call per
    row at large batches, but a row's arithmetic then depends on how long the longest row is."""

    batched = False

    def __init__(self, k_BGSK: torch.Tensor, v_BGSK: torch.Tensor):
        self.k_BGSK, self.v_BGSK = k_BGSK, v_BGSK

    @classmethod
    def empty(cls, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device) -> KVCache:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop): views, written through."""
        return KVCache(self.k_BGSK[start:stop], self.v_BGSK[start:stop])

    def slots(self, n: int) -> KVCache:
        """The first ``n`` slots of every row: views, written through (a compiled step attends over fewer)."""
        return KVCache(self.k_BGSK[:, :, :n], self.v_BGSK[:, :, :n])

    @property
    def nbytes(self) -> int:
        return self.k_BGSK.nbytes + self.v_BGSK.nbytes

    @property
    def slot_axes(self) -> list[tuple[torch.Tensor, int]]:
        """Each buffer with its slot axis (what a compiled step marks dynamic)."""
        return [(self.k_BGSK, 2), (self.v_BGSK, 2)]

    def clear(self, row: int) -> None:
        """Nothing to clear: a row's slots past its length are overwritten as it grows again."""

    def attend(self, q_BHTK, k_BGTK, v_BGTK, spans: list[tuple[int, int]], window: int | None) -> torch.Tensor:
        """Row b's last n new tokens (``spans[b] == (cached, n)``; the columns before them are padding) are written
        at slots [cached, cached + n) and attend over that row's keys alone, so its arithmetic has the same shapes
        whatever the other rows hold. Padding queries get zeros."""
        T = q_BHTK.shape[2]
        gqa = k_BGTK.shape[1] != q_BHTK.shape[1]
        if self.batched and T == 1:
            return self._attend_at_once(q_BHTK, k_BGTK, v_BGTK, spans, window, gqa)
        out_BHTK = q_BHTK.new_zeros(q_BHTK.shape)
        for b, (cached, n) in enumerate(spans):
            if not n:
                continue
            end = cached + n
            self.k_BGSK[b, :, cached:end] = k_BGTK[b, :, T - n :]
            self.v_BGSK[b, :, cached:end] = v_BGTK[b, :, T - n :]
            # Keys older than the window are invisible to every new query: leave them out of the call. A single
            # query then sees every key it is given and needs no mask.
            first = 0 if window is None else max(0, cached + 1 - window)
            mask = None if n == 1 else chunk_mask(cached - first, n, window, q_BHTK.device)
            out_BHTK[b : b + 1, :, T - n :] = F.scaled_dot_product_attention(
                q_BHTK[b : b + 1, :, T - n :], self.k_BGSK[b : b + 1, :, first:end],
                self.v_BGSK[b : b + 1, :, first:end], attn_mask=mask, enable_gqa=gqa)
        return out_BHTK

    def step(self, q_BH1K, k_BG1K, v_BG1K, slots_B: torch.Tensor, window: int | None) -> torch.Tensor:
        """One token per row with static shapes and no host sync (the compiled decode step, smoe.generation): row
        b's token is written at slot ``slots_B[b]`` and attends over the slots up to it (within the window) among
        the buffers' S, every row in one call. A padding row writes too, at its row's next free slot, which that
        row's next real token overwrites; its output is the caller's to ignore."""
        gqa = k_BG1K.shape[1] != q_BH1K.shape[1]
        rows_B = torch.arange(q_BH1K.shape[0], device=q_BH1K.device)
        self.k_BGSK[rows_B, :, slots_B] = k_BG1K[:, :, 0]
        self.v_BGSK[rows_B, :, slots_B] = v_BG1K[:, :, 0]
        mask_B11S = visible_slots(slots_B, self.k_BGSK.shape[2], window)
        return F.scaled_dot_product_attention(q_BH1K, self.k_BGSK, self.v_BGSK, attn_mask=mask_B11S, enable_gqa=gqa)

    def _attend_at_once(self, q_BH1K, k_BG1K, v_BG1K, spans: list[tuple[int, int]], window: int | None,
                        gqa: bool) -> torch.Tensor:
        """``attend`` for one new token per row (or none: padding, zeros) in a single call (``batched``)."""
        written = [b for b, (_, n) in enumerate(spans) if n]
        cached_B = torch.tensor([cached for cached, _ in spans], device=q_BH1K.device)
        self.k_BGSK[written, :, cached_B[written]] = k_BG1K[written, :, 0]
        self.v_BGSK[written, :, cached_B[written]] = v_BG1K[written, :, 0]
        mask_B11S = visible_slots(cached_B, max(cached + n for cached, n in spans), window)
        out_BH1K = F.scaled_dot_product_attention(q_BH1K, self.k_BGSK[:, :, : mask_B11S.shape[-1]],
                                                  self.v_BGSK[:, :, : mask_B11S.shape[-1]], attn_mask=mask_B11S,
                                                  enable_gqa=gqa)
        return out_BH1K * rows_with_a_token(spans, out_BH1K)


def visible_slots(cached_B: torch.Tensor, end: int, window: int | None) -> torch.Tensor:
    """A (B, 1, 1, end) mask of the slots each row's new token, at slot ``cached_B[b]``, may attend (causal, within
    the window). Slot 0 is always visible, so no row's softmax is empty."""
    slots_S = torch.arange(max(end, 1), device=cached_B.device)
    visible_BS = slots_S <= cached_B[:, None]
    if window is not None:
        visible_BS &= cached_B[:, None] - slots_S < window
    return visible_BS[:, None, None, :]


def rows_with_a_token(spans: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """1 for the rows with a new token, 0 for padding rows, shaped to scale a (B, ...) output."""
    keep_B = torch.tensor([float(n > 0) for _, n in spans], dtype=like.dtype, device=like.device)
    return keep_B.view(-1, *[1] * (like.dim() - 1))


class Attention(nn.Module):
    def __init__(self, dim: int, config: AttentionConfig, norm_eps: float):
        super().__init__()
        self.config = config
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.resolved_head_dim(dim)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(dim, q_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(dim, kv_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(dim, kv_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(q_dim, dim, bias=False)
        if config.output_gate:
            self.wg = nn.Linear(dim, q_dim, bias=config.qkv_bias)
        if config.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, norm_eps), RMSNorm(self.head_dim, norm_eps)
        elif config.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(q_dim, norm_eps), RMSNorm(kv_dim, norm_eps)

    def new_cache(self, batch_size: int, max_len: int, dtype, device, *, batched: bool = False) -> KVCache:
        cache = KVCache.empty(batch_size, self.n_kv_heads, max_len, self.head_dim, dtype, device)
        cache.batched = batched
        return cache

    def forward(self, x_BTD: torch.Tensor, step: MixerStep, cache: KVCache | None = None) -> torch.Tensor:
        """By ``step.mode`` (smoe.nn.mixer): NONE, causal attention within x (``step.mask_B1TS`` replaces it when
        given, e.g. for padding); CHUNKS, row b's last ``n`` tokens continue its ``cached`` ones in ``cache``,
        ``step.spans[b] == (cached, n)``; STEP, one token per row at slot ``step.slots_B[b]`` (``KVCache.step``)."""
        B, T, _ = x_BTD.shape
        cfg = self.config
        q, k, v = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:  # after the full qk-norm, as OLMoE applies them
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if step.mode is CacheMode.NONE:
            out = attend(q, k, v, cfg.sliding_window, mask_B1TS=step.mask_B1TS)
        elif step.mode is CacheMode.STEP:
            out = cache.step(q, k, v, step.slots_B, cfg.sliding_window)
        else:
            out = cache.attend(q, k, v, step.spans, cfg.sliding_window)
        out_BTQ = out.transpose(1, 2).reshape(B, T, -1)
        if cfg.output_gate:
            out_BTQ = out_BTQ * torch.sigmoid(self.wg(x_BTD))
        return self.wo(out_BTQ)
