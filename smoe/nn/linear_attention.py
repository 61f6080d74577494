"""Linear-attention recurrences of the hybrid MoE models (issue 15): a fixed-size state per head instead of a KV
cache, so decoding costs the same at every context length. The layers around them: smoe/nn/linear_layers.py.

Legend: B batch, T time, H heads, K key dim, V value dim, C chunk length, N chunks, c sub-chunk length, n sub-chunks
per chunk, G decays per head (1, or K: one per key channel).

Each recurrence has a plain token-by-token form, the spec, and a chunked form for training (a few matmuls per chunk
and a scan over chunks) tested against it forward and backward (tests/test_linear_attention.py), and a decode step
that updates a cached state in place. All take and return the state S (B, H, K, V), so a prefill's state continues
into decoding. Queries are scaled by ``scale`` (default K^-0.5). Computation is in fp32 whatever the inputs' dtype,
autocast included (it is switched off inside), and in float64 for float64 inputs (the tests' reference).

- **Decayed linear attention** (the recurrence of MiniMax-01's lightning attention, whose per-head decay is a fixed
  slope): S_t = a_t S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, with a_t = exp(g_t), g_t <= 0 per head and token.
- **Gated delta rule** (Gated DeltaNet; Qwen3-Next's linear layers): the state first decays, then moves its
  prediction for k_t towards v_t by the write strength beta_t:
  S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,  o_t = S_t^T q_t.
- **Kimi Delta Attention** (Kimi Linear): the gated delta rule with a decay per key channel, a_t a K-vector
  scaling the rows of S (diag(a_t) S_{t-1} in place of a_t S_{t-1}); pass g as (B, T, H, K).

g = -inf is a hard reset (a_t = 0: the state before t is forgotten); the layers mark document boundaries with it.

Chunked gated delta rule (the WY/UT form of DeltaNet, Yang et al. 2024): with gamma_i the cumulative log decay
inside a chunk and S0 the state at its start, the corrections u_i = beta_i (v_i - k_i^T S_{i-1}) solve the lower
unitriangular system (I + A) u = beta (V - (K * exp gamma) S0), A_ij = beta_i (k_i . k_j) exp(gamma_i - gamma_j)
for j < i. Then o_i = exp(gamma_i) q_i^T S0 + sum_{j<=i} exp(gamma_i - gamma_j) (q_i . k_j) u_j, and the state
leaves the chunk as exp(gamma_C) S0 + sum_j exp(gamma_C - gamma_j) k_j u_j^T. Without the delta (A = 0, beta = 1)
it is the chunked decayed linear attention.

Precision: gamma is a float64 prefix sum and every decay is exp of a difference of two prefix sums taken in float64
before rounding to fp32, so a strong forget (g = -1000 leaves gamma near -1000, where fp32's spacing is 6e-5) costs
no precision in the decays after it; log decays are clamped at -1e4 first (exp of that is 0 in any float), so a hard
reset's -inf never meets another -inf. Every exponent is <= 0: nothing overflows.

With a decay per key channel the pairwise decays exp(gamma_ik - gamma_jk) are three-dimensional. Rather than a
(C, C, K) tensor per chunk, chunks are cut into sub-chunks of c = 16 tokens (flash-linear-attention's KDA kernel
does the same): a query sub-chunk I against the earlier sub-chunks is one matmul of q_i exp(gamma_i - gamma_r) by
k_j exp(gamma_r - gamma_j), r the first token of sub-chunk I (both exponents <= 0), and only the diagonal
sub-blocks take (c, c, K) work: one key column at a time, each exponent a sum of the log decays between the two
tokens, and recomputed in the backward pass rather than kept for it. The scan over chunks keeps the chunk length C.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

# Sub-chunk length of a decay per key channel: only its diagonal sub-blocks take pairwise decays per channel.
SUB_CHUNK = 16

# Log decays are clamped here before their prefix sums: exp(-1e4) is 0 in every float, so nothing changes but that
# -inf (a hard reset) stays finite, and float64 keeps 64 of them in one chunk exact to 1e-10.
_LOG_DECAY_MIN = -1e4

# Below exp(-60) a decay is 0: it is far under fp32's resolution beside any term it is added to, and a strong
# decay's cumulative products would otherwise be denormal numbers, which x86 CPUs process 10-100x slower (a Gated
# DeltaNet layer ran 2x slower at its initialisation's decay rates).
_DECAY_FLOOR = -60.0


def gated_delta_rule(q_BTHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor, g_BTH: torch.Tensor,
                     beta_BTH: torch.Tensor | None, state_BHKV: torch.Tensor | None = None,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrent form (the spec): outputs (B, T, H, V) and the final state (B, H, K, V). ``g_BTH``: log decay
    (<= 0), one per head, or (B, T, H, K) one per key channel (Kimi Delta Attention: row k of S decays by its own
    a); ``beta_BTH``: write strength, or None for decayed linear attention (no delta, every write whole)."""
    with _no_autocast(q_BTHK):
        q, k, v, S = _prepare(q_BTHK, k_BTHK, v_BTHV, scale, state_BHKV)
        a_BHTG = _log_decay(g_BTH, q.dtype).exp()
        out = []
        for t in range(q.shape[2]):
            S = S * a_BHTG[:, :, t, :, None]
            write_BHV = v[:, :, t]
            if beta_BTH is not None:
                predicted_BHV = torch.einsum("bhk,bhkv->bhv", k[:, :, t], S)
                write_BHV = beta_BTH[:, t, :, None].to(q.dtype) * (write_BHV - predicted_BHV)
            S = S + k[:, :, t, :, None] * write_BHV[:, :, None, :]
            out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
        return torch.stack(out, dim=1), S


def gated_delta_step_(q_B1HK: torch.Tensor, k_B1HK: torch.Tensor, v_B1HV: torch.Tensor, g_B1H: torch.Tensor,
                      beta_B1H: torch.Tensor | None, state_BHKV: torch.Tensor, scale: float | None = None
                      ) -> torch.Tensor:
    """One token of ``gated_delta_rule`` (a decode step), updating ``state_BHKV`` (contiguous, fp32) in place and
    returning the outputs (B, 1, H, V). The state is scaled in place and takes the write as a batched rank-1 update
    (``baddbmm_``): no state-sized tensor is made, and a step reads and writes the state about twice, where the
    spec's out-of-place form moves it about eight times. Not for autograd (the state is overwritten)."""
    with _no_autocast(q_B1HK):
        B, _, H, K = q_B1HK.shape
        V, f = v_B1HV.shape[-1], state_BHKV.dtype
        S_JKV = state_BHKV.view(B * H, K, V)  # J = B * H
        q_J1K = q_B1HK.reshape(B * H, 1, K).to(f) * (K**-0.5 if scale is None else scale)
        k_J1K = k_B1HK.reshape(B * H, 1, K).to(f)
        write_J1V = v_B1HV.reshape(B * H, 1, V).to(f)
        S_JKV.mul_(g_B1H.reshape(B * H, -1, 1).to(f).exp())  # (J, 1 or K, 1): per head or per key channel
        if beta_B1H is not None:
            write_J1V = beta_B1H.reshape(B * H, 1, 1).to(f) * (write_J1V - torch.bmm(k_J1K, S_JKV))
        S_JKV.baddbmm_(k_J1K.transpose(1, 2), write_J1V)
        return torch.bmm(q_J1K, S_JKV).view(B, 1, H, V)


def chunked_gated_delta_rule(q_BTHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor,
                             g_BTH: torch.Tensor, beta_BTH: torch.Tensor | None,
                             state_BHKV: torch.Tensor | None = None, scale: float | None = None,
                             chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_delta_rule`` in chunks of ``chunk`` tokens (the module docstring's algorithm); the same results. A
    sequence shorter than a chunk is padded to whole sub-chunks only, so a short prefill costs what its length
    does."""
    if chunk < 1:
        raise ValueError(f"chunk: must be a positive number of tokens, got {chunk}")
    with _no_autocast(q_BTHK):
        T = q_BTHK.shape[1]
        q, k, v, S = _prepare(q_BTHK, k_BTHK, v_BTHV, scale, state_BHKV)
        f = q.dtype
        g = _log_decay(g_BTH, f)  # (B, H, T, G)
        beta = None if beta_BTH is None else beta_BTH.to(f).transpose(1, 2)
        sub = math.gcd(chunk, SUB_CHUNK)
        C = min(chunk, -(-T // sub) * sub)
        pad = -T % C  # padding tokens write nothing (beta 0, or k = v = 0) and do not decay (g 0)
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
        beta = None if beta is None else F.pad(beta, (0, pad))
        B, H, Tp, K = q.shape
        N = Tp // C
        q, k, v, g = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v, g))
        gamma_BHNCG = g.double().clamp(min=_LOG_DECAY_MIN).cumsum(-2)  # float64: see the module docstring
        if beta is None:  # no delta: every token writes its value whole, whatever the state predicts
            (scores_BHNCC,) = _decayed_products([q], k, gamma_BHNCG, sub)
            u_BHNCV, w_BHNCK = v, None
        else:
            scores_BHNCC, keys_BHNCC = _decayed_products([q, k], k, gamma_BHNCG, sub)
            b = beta.reshape(B, H, N, C)[..., None]
            A = b * keys_BHNCC  # its diagonal is ignored: the system is unitriangular
            k_decayed = k * _decay(gamma_BHNCG, f)  # k_j * exp(gamma_j): reads S0 through the chunk's decay so far
            uw = torch.linalg.solve_triangular(A, b * torch.cat([v, k_decayed], -1), upper=False, unitriangular=True)
            u_BHNCV, w_BHNCK = uw.split([v.shape[-1], K], dim=-1)
        q_decayed = q * _decay(gamma_BHNCG, f)
        k_to_end = k * _decay(gamma_BHNCG[..., -1:, :] - gamma_BHNCG, f)
        chunk_decay_BHNG = _decay(gamma_BHNCG[..., -1, :], f)
        # the scan takes chunk n of each as one of a list: indexing the tensors instead would make autograd write
        # every chunk's gradient into a zeroed tensor of the whole sequence (quadratic in the length)
        u, w, q_decayed, scores, k_to_end, chunk_decay = (
            None if x is None else x.unbind(2)
            for x in (u_BHNCV, w_BHNCK, q_decayed, scores_BHNCC, k_to_end, chunk_decay_BHNG))
        out = []
        for n in range(N):
            corrections_BHCV = u[n] if w is None else u[n] - w[n] @ S
            out.append(q_decayed[n] @ S + scores[n] @ corrections_BHCV)
            S = S * chunk_decay[n][..., None] + k_to_end[n].transpose(-1, -2) @ corrections_BHCV
        o_BHTV = torch.cat(out, dim=2)[:, :, :T]
        return o_BHTV.transpose(1, 2), S


def _no_autocast(x: torch.Tensor):
    """Autocast off: it would run the recurrences' matmuls in bf16, overriding their fp32 casts."""
    return torch.autocast(x.device.type, enabled=False)


def _prepare(q_BTHK, k_BTHK, v_BTHV, scale: float | None, state_BHKV):
    B, T, H, K = q_BTHK.shape
    f = torch.float64 if q_BTHK.dtype == torch.float64 else torch.float32
    q, k, v = (x.to(f).transpose(1, 2).contiguous() for x in (q_BTHK, k_BTHK, v_BTHV))  # (B, H, T, .)
    q = q * (K**-0.5 if scale is None else scale)
    S = q.new_zeros(B, H, K, v.shape[-1]) if state_BHKV is None else state_BHKV.to(f)
    return q, k, v, S


def _decay(log_decay: torch.Tensor, dtype: torch.dtype, zero: torch.Tensor | None = None) -> torch.Tensor:
    """exp(log_decay) in ``dtype`` (rounded before the exp), 0 where it is below exp(_DECAY_FLOOR) or where ``zero``
    is True (masked before the exp: a masked exponent may be positive)."""
    log_decay = log_decay.to(dtype)
    drop = log_decay < _DECAY_FLOOR
    return log_decay.masked_fill(drop if zero is None else drop | zero, float("-inf")).exp()


def _log_decay(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, H) or (B, T, H, K) log decays as (B, H, T, G), G 1 or K, in ``dtype``."""
    g = g.to(dtype)
    return (g[..., None] if g.dim() == 3 else g).transpose(1, 2)


def _decayed_products(xs_CK: list[torch.Tensor], y_CK: torch.Tensor, gamma_CG: torch.Tensor, sub: int
                      ) -> list[torch.Tensor]:
    """For each x of ``xs_CK``: sum_k x_ik y_jk exp(gamma_ik - gamma_jk) for j <= i, 0 above (over leading batch
    dims), (..., C, C); the xs share the decays. A decay per head (G = 1) is one matmul; one per key channel goes by
    sub-chunks of ``sub`` tokens (module docstring)."""
    C, f = y_CK.shape[-2], y_CK.dtype
    if gamma_CG.shape[-1] == 1:
        gamma_C = gamma_CG[..., 0]
        causal_CC = torch.ones(C, C, dtype=torch.bool, device=y_CK.device).tril()
        decay_CC = _decay(gamma_C[..., :, None] - gamma_C[..., None, :], f, ~causal_CC)
        return [(x_CK @ y_CK.transpose(-1, -2)) * decay_CC for x_CK in xs_CK]
    n = C // sub
    x_XncK, gamma_ncK = torch.stack(xs_CK).unflatten(-2, (n, sub)), gamma_CG.unflatten(-2, (n, sub))
    # the diagonal sub-blocks, from the per-token log decays (the first differences of gamma, exact in float64)
    g_ncK = torch.diff(gamma_ncK, dim=-2, prepend=gamma_ncK[..., :1, :]).to(f)
    blocks = (x_XncK, y_CK.unflatten(-2, (n, sub)), g_ncK)
    if torch.is_grad_enabled():  # recomputed in the backward pass rather than kept: they are (c, c, K) wide
        diagonal_Xncc = torch.utils.checkpoint.checkpoint(_diagonal_blocks, *blocks, use_reentrant=False)
    else:
        diagonal_Xncc = _diagonal_blocks(*blocks)
    # below them: query sub-chunk I against every earlier key, both scaled to I's first token r
    gamma_r_n1K = gamma_ncK[..., :1, :]
    x_XncK = x_XncK * _decay(gamma_ncK - gamma_r_n1K, f)
    not_earlier_nC1 = (torch.arange(C, device=y_CK.device) >= torch.arange(0, C, sub, device=y_CK.device)[:, None])
    y_nCK = y_CK[..., None, :, :] * _decay(gamma_r_n1K - gamma_CG[..., None, :, :], f, not_earlier_nC1[..., None])
    out = []
    for x_ncK, diagonal_ncc in zip(x_XncK, diagonal_Xncc, strict=True):
        below_ncC = x_ncK @ y_nCK.transpose(-1, -2)  # 0 from each query sub-chunk's first token on
        blocks_ncnc = below_ncC.unflatten(-1, (n, sub)) + torch.diag_embed(diagonal_ncc.movedim(-3, -1), dim1=-4,
                                                                           dim2=-2)
        out.append(blocks_ncnc.reshape(*y_CK.shape[:-2], C, C))
    return out


def _diagonal_blocks(x_XncK: torch.Tensor, y_ncK: torch.Tensor, g_ncK: torch.Tensor) -> torch.Tensor:
    """For each x of ``x_XncK`` (stacked on the first dim): sum_k x_ik y_jk exp(g_(j+1)k + ... + g_ik) for j <= i
    within each sub-chunk, 0 above: (X, ..., n, c, c). Column by column, so no (c, c, K) tensor is held at once;
    each exponent is a sum of the log decays between the two tokens (a segment sum, <= 0), never a difference of
    larger sums."""
    c = y_ncK.shape[-2]
    columns = []
    for j in range(c):
        log_decay_iK = F.pad(g_ncK[..., j + 1 :, :], (0, 0, 1, 0)).cumsum(-2)  # rows i = j .. c - 1
        decayed_key_iK = _decay(log_decay_iK, y_ncK.dtype) * y_ncK[..., j : j + 1, :]
        columns.append(F.pad((x_XncK[..., j:, :] * decayed_key_iK).sum(-1), (j, 0)))
    return torch.stack(columns, dim=-1)
