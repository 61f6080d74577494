"""Linear-attention recurrences of the hybrid MoE models (issue 15): a fixed-size state per head instead of a KV
cache, so decoding costs the same at every context length. The layers around them: smoe/nn/linear_layers.py.

Legend: B batch, T time, H heads, K key dim, V value dim, C chunk length, N chunks.

Each recurrence has a plain token-by-token form, the spec, and a chunked form for training (a few matmuls per chunk
and a scan over chunks) tested against it forward and backward (tests/test_linear_attention.py). Both take and
return the state S (B, H, K, V), so a prefill's state continues into decoding. Queries are scaled by ``scale``
(default K^-0.5); computation is in fp32 whatever the inputs' dtype.

- **Decayed linear attention** (the recurrence of MiniMax-01's lightning attention, whose per-head decay is a fixed
  slope): S_t = a_t S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, with a_t = exp(g_t), g_t <= 0 per head and token.
- **Gated delta rule** (Gated DeltaNet; Qwen3-Next's linear layers): the state first decays, then moves its
  prediction for k_t towards v_t by the write strength beta_t:
  S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,  o_t = S_t^T q_t.
- **Kimi Delta Attention** (Kimi Linear): the gated delta rule with a decay per key channel, a_t a K-vector
  scaling the rows of S (diag(a_t) S_{t-1} in place of a_t S_{t-1}); pass g as (B, T, H, K).

Chunked gated delta rule (the WY/UT form of DeltaNet, Yang et al. 2024): with gamma_i the cumulative log decay
inside a chunk and S0 the state at its start, the corrections u_i = beta_i (v_i - k_i^T S_{i-1}) solve the lower
unitriangular system (I + A) u = beta (V - (K * exp gamma) S0), A_ij = beta_i (k_i . k_j) exp(gamma_i - gamma_j)
for j < i. Then o_i = exp(gamma_i) q_i^T S0 + sum_{j<=i} exp(gamma_i - gamma_j) (q_i . k_j) u_j, and the state
leaves the chunk as exp(gamma_C) S0 + sum_j exp(gamma_C - gamma_j) k_j u_j^T. Without the delta (A = 0, beta = 1)
it is the chunked decayed linear attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _prepare(q_BTHK, k_BTHK, v_BTHV, scale: float | None, state_BHKV):
    B, T, H, K = q_BTHK.shape
    q, k, v = (x.float().transpose(1, 2).contiguous() for x in (q_BTHK, k_BTHK, v_BTHV))  # (B, H, T, .)
    q = q * (K**-0.5 if scale is None else scale)
    S = q.new_zeros(B, H, K, v.shape[-1]) if state_BHKV is None else state_BHKV.float()
    return q, k, v, S


def gated_delta_rule(q_BTHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor, g_BTH: torch.Tensor,
                     beta_BTH: torch.Tensor | None, state_BHKV: torch.Tensor | None = None,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrent form (the spec): outputs (B, T, H, V) and the final state (B, H, K, V). ``g_BTH``: log decay
    (<= 0), one per head, or (B, T, H, K) one per key channel (Kimi Delta Attention: row k of S decays by its own
    a); ``beta_BTH``: write strength, or None for decayed linear attention (no delta, every write whole)."""
    q, k, v, S = _prepare(q_BTHK, k_BTHK, v_BTHV, scale, state_BHKV)
    a_BHTG = _log_decay(g_BTH).exp()
    out = []
    for t in range(q.shape[2]):
        S = S * a_BHTG[:, :, t, :, None]
        write_BHV = v[:, :, t]
        if beta_BTH is not None:
            predicted_BHV = torch.einsum("bhk,bhkv->bhv", k[:, :, t], S)
            write_BHV = beta_BTH[:, t, :, None].float() * (write_BHV - predicted_BHV)
        S = S + k[:, :, t, :, None] * write_BHV[:, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(out, dim=1), S


def chunked_gated_delta_rule(q_BTHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor,
                             g_BTH: torch.Tensor, beta_BTH: torch.Tensor | None,
                             state_BHKV: torch.Tensor | None = None, scale: float | None = None,
                             chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_delta_rule`` in chunks of ``chunk`` tokens (the module docstring's algorithm); the same results.
    With a decay per key channel the pairwise decays are a (chunk, chunk, K) tensor per chunk and head: a reference
    for testing and small models (flash-linear-attention's KDA kernel sub-chunks instead)."""
    if chunk < 1:
        raise ValueError(f"chunk: must be a positive number of tokens, got {chunk}")
    T = q_BTHK.shape[1]
    q, k, v, S = _prepare(q_BTHK, k_BTHK, v_BTHV, scale, state_BHKV)
    g = _log_decay(g_BTH)  # (B, H, T, G): G is 1 (per head) or K (per key channel)
    beta = None if beta_BTH is None else beta_BTH.float().transpose(1, 2)
    pad = -T % chunk  # padding tokens write nothing (beta 0, or k = v = 0) and do not decay (g 0)
    q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    beta = None if beta is None else F.pad(beta, (0, pad))
    B, H, Tp, K = q.shape
    N = Tp // chunk
    q, k, v, g = (x.reshape(B, H, N, chunk, x.shape[-1]) for x in (q, k, v, g))
    gamma_BHNCG = g.cumsum(-2)
    # exp(gamma_i - gamma_j) for j <= i, 0 above the diagonal (masked before exp: no overflow)
    causal_CC1 = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()[..., None]
    decay_BHNCCG = _decay(gamma_BHNCG[..., :, None, :] - gamma_BHNCG[..., None, :, :], ~causal_CC1)
    scores_BHNCC = _decayed_products(q, k, decay_BHNCCG)
    if beta is None:  # no delta: every token writes its value whole, whatever the state predicts
        u_BHNCV, w_BHNCK = v, None
    else:
        b = beta.reshape(B, H, N, chunk)[..., None]
        A = _decayed_products(b * k, k, decay_BHNCCG)  # its diagonal is ignored: the system is unitriangular
        k_decayed = k * _decay(gamma_BHNCG)  # k_j * exp(gamma_j): reads S0 through the chunk's decay so far
        uw = torch.linalg.solve_triangular(A, b * torch.cat([v, k_decayed], -1), upper=False, unitriangular=True)
        u_BHNCV, w_BHNCK = uw.split([v.shape[-1], K], dim=-1)
    q_decayed = q * _decay(gamma_BHNCG)
    k_to_end = k * _decay(gamma_BHNCG[..., -1:, :] - gamma_BHNCG)
    chunk_decay_BHNG = _decay(gamma_BHNCG[..., -1, :])
    out = []
    for n in range(N):
        corrections_BHCV = u_BHNCV[:, :, n] if w_BHNCK is None else u_BHNCV[:, :, n] - w_BHNCK[:, :, n] @ S
        out.append(q_decayed[:, :, n] @ S + scores_BHNCC[:, :, n] @ corrections_BHCV)
        S = S * chunk_decay_BHNG[:, :, n, :, None] + k_to_end[:, :, n].transpose(-1, -2) @ corrections_BHCV
    o_BHTV = torch.cat(out, dim=2)[:, :, :T]
    return o_BHTV.transpose(1, 2), S


# Below exp(-60) a decay is 0: it is far under fp32's resolution beside any term it is added to, and a strong
# decay's cumulative products would otherwise be denormal numbers, which x86 CPUs process 10-100x slower (a Gated
# DeltaNet layer ran 2x slower at its initialisation's decay rates).
_DECAY_FLOOR = -60.0


def _decay(log_decay: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """exp(log_decay), 0 where it is below exp(_DECAY_FLOOR) or where ``zero`` is True."""
    drop = log_decay < _DECAY_FLOOR
    return log_decay.masked_fill(drop if zero is None else drop | zero, float("-inf")).exp()


def _log_decay(g: torch.Tensor) -> torch.Tensor:
    """(B, T, H) or (B, T, H, K) log decays as (B, H, T, G), G 1 or K, in fp32."""
    g = g.float()
    return (g[..., None] if g.dim() == 3 else g).transpose(1, 2)


def _decayed_products(x_CK: torch.Tensor, y_CK: torch.Tensor, decay_CCG: torch.Tensor) -> torch.Tensor:
    """sum_k x_ik y_jk decay_ijk over the last dim (over leading batch dims); a decay per head (G = 1) is one
    matmul."""
    if decay_CCG.shape[-1] == 1:
        return (x_CK @ y_CK.transpose(-1, -2)) * decay_CCG[..., 0]
    return torch.einsum("...ik,...jk,...ijk->...ij", x_CK, y_CK, decay_CCG)
