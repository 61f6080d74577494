"""The linear-attention layers of the hybrid MoE models (issue 15), around the recurrences of
smoe/nn/linear_attention.py: MiniMax-01's lightning attention, Qwen3-Next's Gated DeltaNet and Kimi Linear's Kimi
Delta Attention, each with a ``RecurrentState`` that decoding continues.

``chunk`` is the chunked recurrence's chunk length; ``chunk=None`` runs the token-by-token spec instead, which is what
the layers' parity tests hold the chunked form to.

Legend: B batch, T time, D model dim, C channels of the short convolution, W its history (kernel - 1 inputs),
H heads, K key dim, V value dim.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from smoe.nn.linear_attention import chunked_gated_delta_rule, gated_delta_rule


class RecurrentState:
    """What a linear-attention layer carries between calls: the last ``kernel - 1`` inputs of its short convolution
    (B, channels, kernel - 1; None for a layer without one) and the recurrent state (B, H, K, V). Both are constant
    in the context length."""

    def __init__(self, conv_BCW: torch.Tensor | None, state_BHKV: torch.Tensor):
        self.conv_BCW, self.state_BHKV = conv_BCW, state_BHKV


class LightningAttention(nn.Module):
    """MiniMax-01's linear-attention layer ("lightning attention", MiniMax-01 report §2.2): q, k, v projected and
    passed through SiLU, decayed linear attention with a fixed per-head decay exp(-slope_h) and no query scaling,
    RMS-normalised over all heads, gated by sigmoid(W_g x), projected back. The slopes are MiniMax's: the ALiBi-style
    2^(-8 (h + 1) / H) for head h, scaled by 1 - layer / (n_layers - 1) (+1e-5 both), so later layers forget slower.
    transformers' checkpoints fuse q, k, v into one projection, interleaved per head; here they are separate.
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, layer: int, n_layers: int, norm_eps: float = 1e-6,
                 chunk: int | None = 64):
        super().__init__()
        self.n_heads, self.head_dim, self.norm_eps, self.chunk = n_heads, head_dim, norm_eps, chunk
        self.wq, self.wk, self.wv = (nn.Linear(dim, n_heads * head_dim, bias=False) for _ in range(3))
        self.w_gate = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(n_heads * head_dim))
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        base = 2 ** (-8 / n_heads)
        depth = 1 - layer / (n_layers - 1 + 1e-5) + 1e-5
        self.register_buffer("slope", base ** torch.arange(1, n_heads + 1, dtype=torch.float64) * depth,
                             persistent=False)

    def new_cache(self, batch_size: int, dtype=None, device=None) -> RecurrentState:
        device = device or self.wq.weight.device
        D = self.head_dim
        return RecurrentState(None, torch.zeros(batch_size, self.n_heads, D, D, dtype=torch.float32, device=device))

    def forward(self, x_BTD: torch.Tensor, state: RecurrentState | None = None) -> torch.Tensor:
        """The layer over ``x_BTD``; with ``state``, continuing it (and updating it in place)."""
        B, T, _ = x_BTD.shape
        H, D = self.n_heads, self.head_dim
        q, k, v = (F.silu(w(x_BTD)).view(B, T, H, D) for w in (self.wq, self.wk, self.wv))
        g_BTH = (-self.slope.float()).expand(B, T, H)
        # the spec for a decode step (nothing to chunk) or where asked for (chunk None: the parity tests' reference)
        run = gated_delta_rule if T == 1 or self.chunk is None else partial(chunked_gated_delta_rule, chunk=self.chunk)
        o_BTHD, final = run(q, k, v, g_BTH, None, None if state is None else state.state_BHKV, scale=1.0)
        if state is not None:
            state.state_BHKV = final.detach()
        o = o_BTHD.reshape(B, T, H * D)
        o = (o * torch.rsqrt(o.square().mean(-1, keepdim=True) + self.norm_eps)).to(x_BTD.dtype) * self.norm_weight
        return self.wo(torch.sigmoid(self.w_gate(x_BTD)) * o)


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's linear-attention layer: Gated DeltaNet (Yang et al. 2024, "Gated Delta Networks").

    q, k, v are projected, pass a causal depthwise convolution of ``conv_kernel`` taps with SiLU, and q and k are
    L2-normalised per head; each value head has a decay a_t = exp(-exp(A_log) softplus(a_t + dt_bias)) and a write
    strength beta_t = sigmoid(b_t); the gated delta rule runs with ``n_v_heads`` heads (each key head serves
    n_v_heads / n_k_heads of them); each head's output is RMS-normalised, scaled by ``norm_weight`` and gated by
    SiLU(z_t), then projected back. Transformers' checkpoints fuse q, k, v, z (and b, a) into one projection
    interleaved per key head; here they are separate (the importer will split them).
    """

    def __init__(self, dim: int, n_k_heads: int, n_v_heads: int, k_dim: int, v_dim: int, conv_kernel: int = 4,
                 norm_eps: float = 1e-6, chunk: int | None = 64):
        super().__init__()
        if n_v_heads % n_k_heads:
            raise ValueError(f"n_v_heads: must be a multiple of n_k_heads ({n_k_heads}), got {n_v_heads}")
        self.n_k_heads, self.n_v_heads, self.k_dim, self.v_dim = n_k_heads, n_v_heads, k_dim, v_dim
        self.norm_eps, self.chunk = norm_eps, chunk
        self.wq = nn.Linear(dim, n_k_heads * k_dim, bias=False)
        self.wk = nn.Linear(dim, n_k_heads * k_dim, bias=False)
        self.wv = nn.Linear(dim, n_v_heads * v_dim, bias=False)
        self.wz = nn.Linear(dim, n_v_heads * v_dim, bias=False)  # the output gate
        self.wb = nn.Linear(dim, n_v_heads, bias=False)  # write strength
        self.wa = nn.Linear(dim, n_v_heads, bias=False)  # decay
        self.conv_weight = nn.Parameter(torch.randn(self.conv_channels, conv_kernel) / conv_kernel)
        self.dt_bias = nn.Parameter(torch.ones(n_v_heads))
        self.A_log = nn.Parameter(torch.empty(n_v_heads).uniform_(1, 16).log())
        self.norm_weight = nn.Parameter(torch.ones(v_dim))
        self.wo = nn.Linear(n_v_heads * v_dim, dim, bias=False)

    @property
    def conv_channels(self) -> int:
        return 2 * self.n_k_heads * self.k_dim + self.n_v_heads * self.v_dim

    def new_cache(self, batch_size: int, dtype=None, device=None) -> RecurrentState:
        dtype = dtype or self.wq.weight.dtype
        device = device or self.wq.weight.device
        conv = torch.zeros(batch_size, self.conv_channels, self.conv_weight.shape[1] - 1, dtype=dtype, device=device)
        state = torch.zeros(batch_size, self.n_v_heads, self.k_dim, self.v_dim, dtype=torch.float32, device=device)
        return RecurrentState(conv, state)

    def forward(self, x_BTD: torch.Tensor, state: RecurrentState | None = None,
                real_BT: torch.Tensor | None = None) -> torch.Tensor:
        """The layer over ``x_BTD``; with ``state``, continuing it (and updating it in place). ``real_BT`` (bool)
        marks real tokens in a left-padded batch: padding is zeroed before the projections (as transformers does)
        and neither decays nor writes the state, so a padded row computes what it computes alone."""
        B, T, _ = x_BTD.shape
        if real_BT is not None:
            x_BTD = x_BTD * real_BT[..., None].to(x_BTD.dtype)
        qkv_BCT = torch.cat([self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)], dim=-1).transpose(1, 2)
        W = self.conv_weight.shape[1]
        history_BCW = qkv_BCT.new_zeros(B, qkv_BCT.shape[1], W - 1) if state is None else state.conv_BCW
        padded_BCT = torch.cat([history_BCW.to(qkv_BCT.dtype), qkv_BCT], dim=-1)
        if state is not None:
            state.conv_BCW = padded_BCT[:, :, padded_BCT.shape[-1] - (W - 1) :].detach()
        conv_BCT = F.silu(F.conv1d(padded_BCT, self.conv_weight[:, None, :], groups=qkv_BCT.shape[1]))
        Hk, Hv, K, V = self.n_k_heads, self.n_v_heads, self.k_dim, self.v_dim
        q, k, v = conv_BCT.transpose(1, 2).split([Hk * K, Hk * K, Hv * V], dim=-1)
        q, k = (_l2norm(x.view(B, T, Hk, K)).repeat_interleave(Hv // Hk, dim=2) for x in (q, k))
        g, beta_BTH = self.log_decay(x_BTD), torch.sigmoid(self.wb(x_BTD))
        if real_BT is not None:  # padding: no decay, no write
            g, beta_BTH = g * real_BT.view(B, T, *[1] * (g.dim() - 2)), beta_BTH * real_BT[..., None]
        # the spec for a decode step (nothing to chunk) or where asked for (chunk None: the parity tests' reference)
        run = gated_delta_rule if T == 1 or self.chunk is None else partial(chunked_gated_delta_rule, chunk=self.chunk)
        o_BTHV, final = run(q, k, v.view(B, T, Hv, V), g, beta_BTH, None if state is None else state.state_BHKV)
        if state is not None:
            state.state_BHKV = final.detach()
        o = o_BTHV * torch.rsqrt(o_BTHV.square().mean(-1, keepdim=True) + self.norm_eps)
        o = o.to(x_BTD.dtype) * self.norm_weight * self.output_gate(x_BTD).view(B, T, Hv, V).to(x_BTD.dtype)
        return self.wo(o.reshape(B, T, Hv * V))

    def log_decay(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The log decay per value head, (B, T, H): -exp(A_log) softplus(W_a x + dt_bias)."""
        return -self.A_log.float().exp() * F.softplus(self.wa(x_BTD).float() + self.dt_bias)

    def output_gate(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """What the normalised output is multiplied by: SiLU(W_z x)."""
        return F.silu(self.wz(x_BTD).float())


class KimiDeltaAttention(GatedDeltaNet):
    """Kimi Linear's linear-attention layer (Kimi Delta Attention): Gated DeltaNet with as many key as value heads,
    a decay per key channel, -exp(A_log_h) softplus(W_fb W_fa x + dt_bias) of shape (B, T, H, K) through a low-rank
    (rank K) projection, and a low-rank output gate sigmoid(W_gb W_ga x) in place of SiLU(W_z x)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, conv_kernel: int = 4, norm_eps: float = 1e-6,
                 chunk: int | None = 64):
        super().__init__(dim, n_heads, n_heads, head_dim, head_dim, conv_kernel, norm_eps, chunk)
        del self.wa, self.wz
        self.wf_a = nn.Linear(dim, head_dim, bias=False)
        self.wf_b = nn.Linear(head_dim, n_heads * head_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(n_heads * head_dim))
        self.wg_a = nn.Linear(dim, head_dim, bias=False)
        self.wg_b = nn.Linear(head_dim, n_heads * head_dim, bias=False)

    def log_decay(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        g = (self.wf_b(self.wf_a(x_BTD)).float() + self.dt_bias.float()).view(B, T, self.n_v_heads, self.k_dim)
        return -self.A_log.float().exp()[:, None] * F.softplus(g)

    def output_gate(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.wg_b(self.wg_a(x_BTD)).float())


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps), in fp32 (as Gated DeltaNet's kernels normalise q and k)."""
    x = x.float()
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)
