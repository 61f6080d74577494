"""Multi-head latent attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

Keys and values are reconstructed from a compressed latent c_kv (kv_lora_rank) plus one rotary key shared by all
heads; queries optionally go through their own low-rank latent (q_lora_rank). Decoding caches only the normalised
c_kv and the rotated rotary key, and attends in the latent space (DeepSeek-V2 §2.1.3: the key up-projection W_UK is
absorbed into the query, the value up-projection W_UV into the output):

    score(t, s) = (q_nope_t · W_UK c_s + q_rope_t · k_rope_s) * scale = ((W_UK^T q_nope_t) · c_s + ...) * scale
    out_t = W_UV (sum_s p(t, s) c_s)

so a decode step never expands the cached latents into per-head keys and values.

Legend: B batch, T new tokens, S keys (cached slots + new), D model dim, H heads, N no-rope head dim, R rope head
dim, V value head dim, C kv_lora_rank, X = C + R (a cached latent row: c_kv then the rope key).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import MLAConfig
from smoe.nn.attention import attend, chunk_mask, rows_with_a_token, visible_slots
from smoe.nn.mixer import CacheMode, MixerStep
from smoe.nn.norm import RMSNorm
from smoe.nn.rope import apply_rope, yarn_mscale


class MLACache:
    """One MLA layer's cache: a static (B, S_max, C + R) buffer whose rows are [normalised c_kv | rotated k_rope].
    Keeping both in one row makes the latent itself the (shared) key of the absorbed attention, with no copy. Row b
    holds its tokens in slots 0 .. length - 1 (slot = position), as ``KVCache`` does, and ``batched`` means what it
    means there."""

    batched = False

    def __init__(self, latent_BSX: torch.Tensor, kv_lora_rank: int):
        self.latent_BSX, self.kv_lora_rank = latent_BSX, kv_lora_rank

    @classmethod
    def empty(cls, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device) -> MLACache:
        return cls(torch.zeros(batch_size, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device), kv_lora_rank)

    def rows(self, start: int, stop: int) -> MLACache:
        """Rows [start, stop): views, written through."""
        return MLACache(self.latent_BSX[start:stop], self.kv_lora_rank)

    def slots(self, n: int) -> MLACache:
        """The first ``n`` slots of every row, as ``KVCache.slots``."""
        return MLACache(self.latent_BSX[:, :n], self.kv_lora_rank)

    @property
    def nbytes(self) -> int:
        return self.latent_BSX.nbytes

    @property
    def slot_axes(self) -> list[tuple[torch.Tensor, int]]:
        """The buffer with its slot axis, as ``KVCache.slot_axes``."""
        return [(self.latent_BSX, 1)]

    def clear(self, row: int) -> None:
        """Nothing to clear, as ``KVCache.clear``."""

    def append(self, b: int, ckv_TC: torch.Tensor, k_rope_TR: torch.Tensor, cached: int) -> torch.Tensor:
        """Write row b's new tokens at slots [cached, cached + T); return its latent rows up to there, (1, S, X)."""
        end = cached + ckv_TC.shape[0]
        self.latent_BSX[b, cached:end, : self.kv_lora_rank] = ckv_TC
        self.latent_BSX[b, cached:end, self.kv_lora_rank :] = k_rope_TR
        return self.latent_BSX[b : b + 1, :end]


# The latent norms keep RMSNorm's default eps whatever the model's norm_eps, as DeepSeek's and Kimi Linear's code (and
# transformers') builds them; Kimi Linear's norm_eps of 1e-5 there would move its logits by about 1e-4.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    # Linears smoe.quant leaves in full precision: the absorbed decode attention reads wkv_b's weight as a matrix.
    keep_full_precision = ("wkv_b",)

    def __init__(self, dim: int, config: MLAConfig, norm_eps: float):
        super().__init__()
        self.config = config
        H, qk = config.n_heads, config.qk_head_dim
        if config.q_lora_rank is None:
            self.wq = nn.Linear(dim, H * qk, bias=False)
        else:
            self.wq_a = nn.Linear(dim, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(config.q_lora_rank, H * qk, bias=False)
        self.wkv_a = nn.Linear(dim, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(config.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(config.kv_lora_rank, H * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.wo = nn.Linear(H * config.v_head_dim, dim, bias=False)
        self.scale = qk**-0.5
        scaling = config.rope_scaling
        if scaling is not None and scaling.type == "yarn" and scaling.mscale_all_dim:
            # DeepSeek folds YaRN's temperature into the softmax scale as well as into cos/sin.
            self.scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2

    def new_cache(self, batch_size: int, max_len: int, dtype, device, *, batched: bool = False) -> MLACache:
        cfg = self.config
        cache = MLACache.empty(batch_size, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)
        cache.batched = batched
        return cache

    def forward(self, x_BTD: torch.Tensor, step: MixerStep, cache: MLACache | None = None) -> torch.Tensor:
        """As ``Attention.forward``. With a cache (CHUNKS), each row attends over its own latents: a row's first
        chunk (nothing cached, its own keys only) takes the expanded path, cheaper for many queries; later chunks
        attend in the latent space. STEP: a static-shape step, as ``KVCache.step``."""
        B, T, _ = x_BTD.shape
        cfg = self.config
        H, N, R, V = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = self.wq(x_BTD) if cfg.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x_BTD)))
        q_nope_BTHN, q_rope_BTHR = q.view(B, T, H, N + R).split([N, R], dim=-1)
        ckv_BTC, k_rope_BTR = self.wkv_a(x_BTD).split([cfg.kv_lora_rank, R], dim=-1)
        ckv_BTC = self.kv_norm(ckv_BTC)
        if cfg.rotary:
            cos, sin = step.cos, step.sin
            q_rope_BTHR = apply_rope(q_rope_BTHR, cos, sin, interleaved=cfg.rope_interleave)
            k_rope_BTR = apply_rope(k_rope_BTR.view(B, T, 1, R), cos, sin, interleaved=cfg.rope_interleave)
            k_rope_BTR = k_rope_BTR.view(B, T, R)
        spans = step.spans
        if step.mode is CacheMode.NONE:
            out_BTHV = self._expanded(q_nope_BTHN, q_rope_BTHR, ckv_BTC, k_rope_BTR, step.mask_B1TS)
        elif step.mode is CacheMode.STEP:  # row b's token at slot slots_B[b] (KVCache.step)
            rows_B = torch.arange(B, device=x_BTD.device)
            cache.latent_BSX[rows_B, step.slots_B] = torch.cat([ckv_BTC, k_rope_BTR], dim=-1)[:, 0]
            mask_B11S = visible_slots(step.slots_B, cache.latent_BSX.shape[1], None)
            out_BTHV = self._absorbed(q_nope_BTHN, q_rope_BTHR, cache.latent_BSX, mask_B11S, whole_rows=True)
        elif cache.batched and T == 1:  # one call for every row's new token, each masked to its own latents
            written = [b for b, (_, n) in enumerate(spans) if n]
            cached_B = torch.tensor([cached for cached, _ in spans], device=x_BTD.device)
            cache.latent_BSX[written, cached_B[written]] = torch.cat([ckv_BTC, k_rope_BTR], dim=-1)[written, 0]
            mask_B11S = visible_slots(cached_B, max(cached + n for cached, n in spans), None)
            out_BTHV = self._absorbed(q_nope_BTHN, q_rope_BTHR, cache.latent_BSX[:, : mask_B11S.shape[-1]],
                                      mask_B11S)
            out_BTHV = out_BTHV * rows_with_a_token(spans, out_BTHV)
        else:
            out_BTHV = q_nope_BTHN.new_zeros(B, T, H, V)  # padding queries get zeros
            for b, (cached, n) in enumerate(spans):
                if not n:
                    continue
                new = slice(T - n, T)
                latent_1SX = cache.append(b, ckv_BTC[b, new], k_rope_BTR[b, new], cached)
                if cached == 0:
                    out_BTHV[b, new] = self._expanded(q_nope_BTHN[b : b + 1, new], q_rope_BTHR[b : b + 1, new],
                                                      ckv_BTC[b : b + 1, new], k_rope_BTR[b : b + 1, new], None)[0]
                else:
                    mask = None if n == 1 else chunk_mask(cached, n, None, x_BTD.device)
                    out_BTHV[b, new] = self._absorbed(q_nope_BTHN[b : b + 1, new], q_rope_BTHR[b : b + 1, new],
                                                      latent_1SX, mask)[0]
        return self.wo(out_BTHV.reshape(B, T, H * V))

    def _expanded(self, q_nope_BTHN, q_rope_BTHR, ckv_BTC, k_rope_BTR, mask_B1TS) -> torch.Tensor:
        """Attention over the chunk's own keys and values, expanded from its latents: (B, T, H, V)."""
        cfg = self.config
        B, T, H, N = q_nope_BTHN.shape
        R, V = cfg.qk_rope_head_dim, cfg.v_head_dim
        k_nope_BTHN, v_BTHV = self.wkv_b(ckv_BTC).view(B, T, H, N + V).split([N, V], dim=-1)
        q = torch.cat([q_nope_BTHN, q_rope_BTHR], dim=-1)
        k = torch.cat([k_nope_BTHN, k_rope_BTR[:, :, None].expand(B, T, H, R)], dim=-1)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v_BTHV.transpose(1, 2), None, scale=self.scale,
                     mask_B1TS=mask_B1TS)
        return out.transpose(1, 2)

    def _absorbed(self, q_nope_BTHN, q_rope_BTHR, latent_BSX, mask_B1TS, whole_rows: bool = False) -> torch.Tensor:
        """Attention in the latent space over the cached latent rows (``mask_B1TS`` None: every slot): (B, T, H, V).
        ``whole_rows``: the value is the whole latent row, of which the first C outputs are kept. The same sums,
        for a (C + R) / C wider product: compiled, attention takes a value slice as a contiguous copy, of the whole
        cache every step (the compiled decode step uses it)."""
        cfg = self.config
        B, T, H, N = q_nope_BTHN.shape
        C, V, S = cfg.kv_lora_rank, cfg.v_head_dim, latent_BSX.shape[1]
        w_uk_HNC, w_uv_HVC = self.wkv_b.weight.view(H, N + V, C).split([N, V], dim=1)
        q_latent_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHN, w_uk_HNC)
        q_BTHX = torch.cat([q_latent_BTHC, q_rope_BTHR], dim=-1)
        # Every head shares the one latent key/value row per slot: multi-query attention, so the heads fold into
        # the query axis and each row is one (T*H, X) x (X, S) product.
        q_B1QX = q_BTHX.reshape(B, 1, T * H, C + q_rope_BTHR.shape[-1])
        mask_B1QS = None
        if mask_B1TS is not None:
            mask_B1QS = mask_B1TS[:, :, :, None, :].expand(-1, 1, T, H, S).reshape(-1, 1, T * H, S)
        latent_B1SX = latent_BSX[:, None]
        value_B1SX = latent_B1SX if whole_rows else latent_B1SX[..., :C]
        out_B1QC = F.scaled_dot_product_attention(q_B1QX, latent_B1SX, value_B1SX, attn_mask=mask_B1QS,
                                                  scale=self.scale)[..., :C]
        return torch.einsum("bthc,hvc->bthv", out_B1QC.reshape(B, T, H, C), w_uv_HVC)
