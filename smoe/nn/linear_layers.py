"""The linear-attention layers of the hybrid MoE models (issue 15), around the recurrences of
smoe/nn/linear_attention.py: MiniMax-01's lightning attention, Qwen3-Next's Gated DeltaNet and Kimi Linear's Kimi
Delta Attention, each with a ``RecurrentState`` that decoding continues (docs/linear_attention.md).

Legend: B batch, T time, D model dim, C channels of the short convolution, W its history (kernel - 1 inputs),
H heads, K key dim, V value dim.

``chunk`` is the chunked recurrence's chunk length; ``chunk=None`` runs the token-by-token spec instead, which is what
the layers' parity tests hold the chunked form to. A single token never runs the chunked form: continuing a state
without autograd (a decode step) it runs ``gated_delta_step_``, which updates the cached state in place, else the spec.
``real_BT`` (bool; ``MixerStep.real_BT``) marks the real tokens of a left-padded batch. Padding neither decays nor
writes the recurrent state and never enters the convolution's history, so every row computes what it computes alone,
also when it continues a state (a decode step's idle rows, the shorter rows of a chunked prefill). Outputs at padding
positions are meaningless (finite: padding is zeroed before the projections, as transformers does).

``starts_BT`` (bool, B x T; ``MixerStep.starts_BT``) marks the first token of each document in rows that pack several
(flash-linear-attention's ``cu_seqlens`` idea, kept as rows of a batch rather than one flattened sequence): there the
recurrent state is reset (log decay -inf) and the short convolution reads no input of an earlier document, so every
document computes what it computes alone, and a cache is left as the last document alone leaves it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smoe.config import LinearAttentionConfig
from smoe.nn.linear_attention import chunked_gated_delta_rule, gated_delta_rule, gated_delta_step_
from smoe.nn.mixer import MixerStep


class RecurrentState:
    """What a linear-attention layer carries between calls: the last W inputs of its short convolution (None for a
    layer without one) and the recurrent state, fp32. Both are constant in the context length. A call writes them
    in place, so ``rows`` views write through (a request's prefill in its own row of a batch's state)."""

    batched = False  # every call runs all rows at once, each alone, whatever this says (smoe.nn.mixer.LayerCache)

    def __init__(self, conv_BCW: torch.Tensor | None, state_BHKV: torch.Tensor):
        self.conv_BCW, self.state_BHKV = conv_BCW, state_BHKV

    def rows(self, start: int, stop: int) -> RecurrentState:
        """Rows [start, stop): views, written through."""
        conv = None if self.conv_BCW is None else self.conv_BCW[start:stop]
        return RecurrentState(conv, self.state_BHKV[start:stop])

    def clear(self, row: int) -> None:
        """Row ``row`` starts a new sequence."""
        self.state_BHKV[row] = 0
        if self.conv_BCW is not None:
            self.conv_BCW[row] = 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.conv_BCW, self.state_BHKV) if t is not None)

    @property
    def slot_axes(self) -> list[tuple[torch.Tensor, int]]:
        """None: the state is constant in the context length (``KVCache.slot_axes``)."""
        return []


def causal_conv(x_BTC: torch.Tensor, weight: torch.Tensor, history_BCW: torch.Tensor | None,
                real_BT: torch.Tensor | None = None, starts_BT: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal depthwise convolution of ``weight`` (C, W + 1 taps) over x following ``history_BCW`` (the last W
    inputs before x; None: zeros, a new sequence), without activation, and the new history. With ``real_BT`` each
    row's left padding is moved before its history, so the real tokens follow the history directly and the new
    history skips the padding (an all-padding row keeps its history). With ``starts_BT`` (True at a document's
    first token) a tap reads only inputs of its own token's document (the history belongs to a document begun
    before x), and the new history holds the last document's inputs only."""
    B, T, C = x_BTC.shape
    W = weight.shape[1] - 1
    if history_BCW is None:
        history_BCW = x_BTC.new_zeros(B, C, W)
    seq_BCS = torch.cat([history_BCW.to(x_BTC.dtype), x_BTC.transpose(1, 2)], dim=-1)  # S = W + T
    if real_BT is not None:
        seq_BCS = _padding_first(seq_BCS, (~real_BT).sum(1), W)
    if starts_BT is None:
        return F.conv1d(seq_BCS, weight[:, None, :], groups=C).transpose(1, 2), seq_BCS[:, :, T:]
    if real_BT is not None:
        raise ValueError("starts_BT: document starts are for unpadded rows; not with real_BT (left padding)")
    doc_BS = F.pad(starts_BT.long().cumsum(1), (W, 0))  # document index; the history's is 0
    y_BCT = 0
    for j in range(W + 1):  # tap j reads position t + j of seq, for output t (at position t + W)
        same_B1T = (doc_BS[:, j : j + T] == doc_BS[:, W:])[:, None, :]
        y_BCT = y_BCT + seq_BCS[:, :, j : j + T] * weight[:, j, None] * same_B1T
    history_BCW = seq_BCS[:, :, T:] * (doc_BS[:, T:] == doc_BS[:, -1:])[:, None, :]
    return y_BCT.transpose(1, 2), history_BCW


def _padding_first(seq_BCS: torch.Tensor, pad_B: torch.Tensor, W: int) -> torch.Tensor:
    """Each row's [history (W), padding (p), real tokens] as [zeros (p), history, real tokens], p = pad_B[b]."""
    B, C, S = seq_BCS.shape
    j_BS = torch.arange(S, device=seq_BCS.device).expand(B, S)
    p_B1 = pad_B[:, None]
    source_BS = torch.where(j_BS >= p_B1 + W, j_BS, j_BS - p_B1).clamp(min=0)
    moved_BCS = seq_BCS.gather(2, source_BS[:, None, :].expand(B, C, S))
    return moved_BCS.masked_fill((j_BS < p_B1)[:, None, :], 0)


def _check_left_padding(real_BT: torch.Tensor) -> None:
    # a real token after padding would read a convolution window and a state the padding skipped
    if real_BT.shape[1] > 1 and bool((real_BT[:, 1:] < real_BT[:, :-1]).any()):
        raise ValueError("real_BT: padding must come before a row's tokens (left padding); a row has a real token "
                         "followed by padding")


def _recur(q_BTHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor, g_BTH: torch.Tensor,
           beta_BTH: torch.Tensor | None, state: RecurrentState | None, chunk: int | None,
           real_BT: torch.Tensor | None, starts_BT: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """The recurrence of every layer here (``g_BTH`` may be (B, T, H, K)): padding made a no-op, each document
    started from a zero state, then the in-place decode step (one token, no autograd), the spec or the chunked form,
    and the state, if any, continued and updated in place."""
    shape = (*g_BTH.shape[:2], *[1] * (g_BTH.dim() - 2))
    if real_BT is not None:  # padding: no decay (g = 0), no write (beta = 0; without beta the layer zeroes k and v)
        g_BTH = torch.where(real_BT.view(shape), g_BTH, 0)
        beta_BTH = None if beta_BTH is None else torch.where(real_BT[..., None], beta_BTH, 0)
    if starts_BT is not None:  # a hard reset: the state before a document's first token is forgotten
        g_BTH = g_BTH.masked_fill(starts_BT.view(shape), float("-inf"))
    if state is not None and q_BTHK.shape[1] == 1 and not torch.is_grad_enabled():
        return gated_delta_step_(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state.state_BHKV, scale)
    initial_BHKV = None if state is None else state.state_BHKV
    if initial_BHKV is not None and torch.is_grad_enabled():  # autograd keeps it, and the state is written in place
        initial_BHKV = initial_BHKV.clone()
    if chunk is None or q_BTHK.shape[1] == 1:
        o_BTHV, final_BHKV = gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_BHKV, scale)
    else:
        o_BTHV, final_BHKV = chunked_gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_BHKV, scale,
                                                      chunk=chunk)
    if state is not None:  # detached: a decoding loop must not grow one autograd graph across its steps
        state.state_BHKV.copy_(final_BHKV.detach())
    return o_BTHV


def _zero_padding(x_BTD: torch.Tensor, real_BT: torch.Tensor | None) -> torch.Tensor:
    if real_BT is None:
        return x_BTD
    _check_left_padding(real_BT)
    return x_BTD.masked_fill(~real_BT[..., None], 0)


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
        self.reset_parameters()
        self.layer, self.n_layers = layer, n_layers
        self.register_buffer("slope", torch.empty(n_heads, dtype=torch.float64), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the decay slopes, e.g. after ``to_empty()`` on a model built on the meta device."""
        base = 2 ** (-8 / self.n_heads)
        depth = 1 - self.layer / (self.n_layers - 1 + 1e-5) + 1e-5
        slope = base ** torch.arange(1, self.n_heads + 1, dtype=torch.float64) * depth
        self.slope = slope.to(self.slope.device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The layer's own parameter (its projections are plain linears): a unit output norm."""
        self.norm_weight.fill_(1.0)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None, *,
                  batched: bool = False) -> RecurrentState:
        """An empty state for ``batch_size`` sequences (``max_len``, ``dtype`` and ``batched`` are accepted for the
        mixers' common signature: the state is fp32, constant in the context length, and there is no
        convolution)."""
        device = device or self.wq.weight.device
        D = self.head_dim
        return RecurrentState(None, torch.zeros(batch_size, self.n_heads, D, D, dtype=torch.float32, device=device))

    def forward(self, x_BTD: torch.Tensor, step: MixerStep, state: RecurrentState | None = None) -> torch.Tensor:
        """The layer over ``x_BTD``; with ``state``, continuing it (and updating it in place). Of ``step`` it reads
        ``real_BT`` and ``starts_BT`` (True at each document's first token; module docstring)."""
        real_BT, starts_BT = step.real_BT, step.starts_BT
        B, T, _ = x_BTD.shape
        H, D = self.n_heads, self.head_dim
        x_BTD = _zero_padding(x_BTD, real_BT)  # SiLU(0) = 0: padding's k and v are zero, so it writes nothing
        q, k, v = (F.silu(w(x_BTD)).view(B, T, H, D) for w in (self.wq, self.wk, self.wv))
        g_BTH = (-self.slope.float()).expand(B, T, H)
        o_BTHD = _recur(q, k, v, g_BTH, None, state, self.chunk, real_BT, starts_BT, scale=1.0)
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
    interleaved per key head; here they are separate (smoe.interop.families.qwen3_next splits them).
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
        self.conv_weight = nn.Parameter(torch.empty(self.conv_channels, conv_kernel))
        self.dt_bias = nn.Parameter(torch.empty(n_v_heads))
        self.A_log = nn.Parameter(torch.empty(n_v_heads))
        self.norm_weight = nn.Parameter(torch.empty(v_dim))
        self.wo = nn.Linear(n_v_heads * v_dim, dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The layer's own parameters (its projections are plain linears): the convolution as nn.Conv1d initialises
        a depthwise one, decay rates exp(A_log) uniform in [1, 16], the softplus bias at 1, a unit output norm."""
        bound = self.conv_weight.shape[1] ** -0.5
        self.conv_weight.uniform_(-bound, bound)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        self.dt_bias.fill_(1.0)
        self.norm_weight.fill_(1.0)

    @property
    def conv_channels(self) -> int:
        return 2 * self.n_k_heads * self.k_dim + self.n_v_heads * self.v_dim

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None, *,
                  batched: bool = False) -> RecurrentState:
        """An empty state for ``batch_size`` sequences; ``dtype``: the convolution history's (the state is fp32).
        ``max_len`` and ``batched`` are accepted for the mixers' common signature: the state is constant in the
        context length, and every row is computed alone in one call."""
        dtype = dtype or self.wq.weight.dtype
        device = device or self.wq.weight.device
        conv = torch.zeros(batch_size, self.conv_channels, self.conv_weight.shape[1] - 1, dtype=dtype, device=device)
        state = torch.zeros(batch_size, self.n_v_heads, self.k_dim, self.v_dim, dtype=torch.float32, device=device)
        return RecurrentState(conv, state)

    def forward(self, x_BTD: torch.Tensor, step: MixerStep, state: RecurrentState | None = None) -> torch.Tensor:
        """The layer over ``x_BTD``; with ``state``, continuing it (and updating it in place). Of ``step`` it reads
        ``real_BT`` and ``starts_BT`` (True at each document's first token; module docstring)."""
        real_BT, starts_BT = step.real_BT, step.starts_BT
        B, T, _ = x_BTD.shape
        Hk, Hv, K, V = self.n_k_heads, self.n_v_heads, self.k_dim, self.v_dim
        x_BTD = _zero_padding(x_BTD, real_BT)
        qkv_BTC = torch.cat([self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)], dim=-1)
        qkv_BTC, history_BCW = causal_conv(qkv_BTC, self.conv_weight, None if state is None else state.conv_BCW,
                                           real_BT, starts_BT)
        if state is not None:
            state.conv_BCW.copy_(history_BCW.detach())
        q, k, v = F.silu(qkv_BTC).split([Hk * K, Hk * K, Hv * V], dim=-1)
        q, k = (_l2norm(x.view(B, T, Hk, K)).repeat_interleave(Hv // Hk, dim=2) for x in (q, k))
        beta_BTH = torch.sigmoid(self.wb(x_BTD))
        o_BTHV = _recur(q, k, v.view(B, T, Hv, V), self.log_decay(x_BTD), beta_BTH, state, self.chunk, real_BT,
                        starts_BT)
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
        self.dt_bias = nn.Parameter(torch.empty(n_heads * head_dim))
        self.wg_a = nn.Linear(dim, head_dim, bias=False)
        self.wg_b = nn.Linear(head_dim, n_heads * head_dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As Gated DeltaNet's, but the softplus bias puts each channel's step softplus(dt_bias) log-uniform in
        [1e-3, 1e-1] (Kimi Linear's initialisation, after Mamba's)."""
        super().reset_parameters()
        step = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp_min(1e-4)
        self.dt_bias.copy_(step + torch.log(-torch.expm1(-step)))  # softplus^-1

    def log_decay(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        g = (self.wf_b(self.wf_a(x_BTD)).float() + self.dt_bias.float()).view(B, T, self.n_v_heads, self.k_dim)
        return -self.A_log.float().exp()[:, None] * F.softplus(g)

    def output_gate(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.wg_b(self.wg_a(x_BTD)).float())


def fp32_parameters(model: nn.Module) -> set[str]:
    """The names of ``model``'s parameters that stay fp32 whatever dtype it is loaded in: Kimi Delta Attention's
    ``dt_bias``, which sets each channel's decay through a softplus (bf16 would move the decay by up to 1.6%;
    transformers keeps it fp32 as well)."""
    return {f"{prefix}.dt_bias" if prefix else "dt_bias" for prefix, module in model.named_modules()
            if isinstance(module, KimiDeltaAttention)}


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps), in fp32 (as Gated DeltaNet's kernels normalise q and k)."""
    x = x.float()
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def make_linear_attention(dim: int, config: LinearAttentionConfig, layer: int, n_layers: int,
                          norm_eps: float) -> LightningAttention | GatedDeltaNet | KimiDeltaAttention:
    """The linear-attention layer ``config`` describes, as layer ``layer`` of ``n_layers`` (lightning's decay
    depends on the depth)."""
    if config.kind == "lightning":
        # MiniMax-01's output norm keeps RMSNorm's default eps whatever the model's norm_eps (1e-5 in its config)
        return LightningAttention(dim, config.n_heads, config.head_dim, layer, n_layers, 1e-6, config.chunk)
    if config.kind == "kda":
        return KimiDeltaAttention(dim, config.n_heads, config.head_dim, config.conv_kernel, norm_eps, config.chunk)
    return GatedDeltaNet(dim, config.resolved_n_k_heads, config.n_heads, config.head_dim, config.resolved_v_head_dim,
                         config.conv_kernel, norm_eps, config.chunk)
