"""Exact parameter, FLOP and memory accounting from a ModelConfig (no torch import, no model built).

Conventions (those of shared/REFERENCES.md, which reproduce the published totals):
- total: every parameter of the main model, all experts included: embedding, head (unless tied), attention, norms,
  dense FFNs, routed and shared experts, routers and their biases (the aux-free expert bias counts). Multi-token
  prediction modules (each: two input norms, the 2d -> d projection, one block like the last layer, an output norm;
  embedding and head shared) are the ``mtp`` component and ``mtp_params``, outside every total, as DeepSeek-V3's
  671B leaves them out. So ``total_params`` is the sum of the components other than ``mtp``.
- active: what one token touches: everything but the routed experts, plus top_k of them per MoE layer.
  ``active_params`` counts the input embedding and the head; ``active_params_excl_embedding`` drops the input
  embedding (with tied embeddings the matrix is still used as the head, so it stays).
- forward FLOPs per token: 2 x the matmul parameters a token touches (``matmul_flops_per_token``: head included,
  embedding lookup, norms and biases excluded) plus causal attention: 2 x heads x (qk_dim + v_dim) x average visible
  context, where the average context at sequence length S (default: max_seq_len) is (S + 1) / 2, capped by a
  sliding window. Training = 3 x forward. MTP modules are left out, as in the parameter totals.
- one decoded token at context C (``decode_attention_flops``): the same 2 x heads x (qk_dim + v_dim) x min(C, window),
  except that MLA attends in the latent space, as smoe.generation decodes it (W_UK into the query, W_UV after the
  values; DeepSeek-V2 §2.1.2): qk_dim = kv_lora_rank + qk_rope_head_dim, v_dim = kv_lora_rank. The absorbed
  projections cost what W_kvb costs, so the matmul FLOPs are unchanged.
- weight bytes: ``total_params`` at 4 / 2 / 1 bytes (fp32 / bf16 / fp8).
- KV cache per token: GQA stores k and v (2 x kv_heads x head_dim); MLA stores the latent and the rotary key
  (kv_lora_rank + qk_rope_head_dim), per full-attention layer; a sliding window caps the positions kept
  (``kv_cache_elements``).
- linear-attention layers (hybrid models, layout.layer_types): their projections and short convolution count as
  matmul weights. The recurrence is counted as it runs. Training and prefill run the chunked form (smoe.nn.
  linear_attention), whose multiply-adds per token and head at chunk length C are, for the delta rules,
  C (2.5 K + 1.5 V) + 3 K V: per chunk the scores Q K^T and the system A = beta K K^T (C^2 K each), solving it for
  U and W (C^2 (K + V) / 2), the corrections W S0, the read Q S0 and the state update K^T U (C K V each), and the
  scores times the corrections (C^2 V); Kimi Delta Attention adds (c + 1) K for the diagonal sub-blocks of both
  products (sub-chunks of c = 16). Lightning has neither A, its solve nor W S0: C (K + V) + 2 K V. C is the
  config's chunk, or the sequence rounded up to whole sub-chunks when shorter, and the padding of a last partial
  chunk counts. A decode step (``decode_attention_flops``) runs the token-by-token form: 2 x heads x key_dim x
  value_dim x n FLOPs, n = 2 for lightning (write k v^T, read q S) and 3 for the delta rules (also read S^T k). Each
  keeps a state per sequence, constant in the context (``recurrent_state_bytes``): heads x key_dim x value_dim in
  fp32 (as smoe and the reference kernels keep it) plus the convolution's last kernel - 1 inputs in the cache dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from smoe.config import LinearAttentionConfig, MLAConfig, ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}


@dataclass(frozen=True)
class Accounting:
    """Parameters, FLOPs and memory of one config, by the conventions of the module docstring."""

    name: str
    total_params: int
    active_params: int
    active_params_excl_embedding: int
    params_by_component: dict[str, int]
    active_by_component: dict[str, int]
    mtp_params: int
    seq_len: int
    matmul_flops_per_token: float
    forward_flops_per_token: float
    train_flops_per_token: float
    weight_bytes: dict[str, int]
    kv_cache_bytes_per_token: dict[str, int]
    n_moe_layers: int
    n_linear_layers: int = 0
    recurrent_state_bytes: dict[str, int] | None = None  # per sequence, all linear layers, by cache dtype

    def to_dict(self) -> dict:
        return asdict(self)


def attention_params(config: ModelConfig) -> int:
    """Parameters of one attention layer: projections, their biases and the q/k (or MLA latent) norms."""
    d, attn = config.dim, config.attention
    if isinstance(attn, MLAConfig):
        H, qk = attn.n_heads, attn.qk_head_dim
        r = attn.q_lora_rank
        q = d * H * qk if r is None else d * r + r + r * H * qk  # wq, or wq_a + q_norm + wq_b
        kv = d * (attn.kv_lora_rank + attn.qk_rope_head_dim) + attn.kv_lora_rank
        kv += attn.kv_lora_rank * H * (attn.qk_nope_head_dim + attn.v_head_dim)
        return q + kv + H * attn.v_head_dim * d
    hd = attn.resolved_head_dim(d)
    q_dim, kv_dim = attn.n_heads * hd, attn.n_kv_heads * hd
    params = d * q_dim + 2 * d * kv_dim + q_dim * d
    if attn.qkv_bias:
        params += q_dim + 2 * kv_dim
    if attn.output_gate:
        params += d * q_dim + (q_dim if attn.qkv_bias else 0)
    if attn.qk_norm == "head":
        params += 2 * hd
    elif attn.qk_norm == "full":
        params += q_dim + kv_dim
    return params


def linear_attention_params(config: ModelConfig) -> int:
    """Parameters of one linear-attention layer (smoe.nn.linear_layers)."""
    la, d = config.linear_attention, config.dim
    H, K = la.n_heads, la.head_dim
    if la.kind == "lightning":
        return 5 * d * H * K + H * K  # q, k, v, output gate, output; the output norm
    matmul = _linear_matmul_params(config.dim, la)
    if la.kind == "kda":
        return matmul + H + H * K + K  # A_log, dt_bias per channel, the output norm
    return matmul + 2 * H + la.resolved_v_head_dim  # A_log, dt_bias, the output norm


def _conv_channels(la: LinearAttentionConfig) -> int:
    return 2 * la.resolved_n_k_heads * la.head_dim + la.n_heads * la.resolved_v_head_dim


def _linear_matmul_params(d: int, la: LinearAttentionConfig) -> int:
    """A linear-attention layer's matmul weights and convolution taps, for FLOPs."""
    H, K = la.n_heads, la.head_dim
    if la.kind == "lightning":
        return 5 * d * H * K
    conv = _conv_channels(la) * la.conv_kernel
    if la.kind == "kda":  # q, k, v, beta, output; the low-rank decay and gate (d -> K -> H K)
        return 4 * d * H * K + d * H + 2 * (d * K + K * H * K) + conv
    Hk, V = la.resolved_n_k_heads, la.resolved_v_head_dim
    return 2 * d * Hk * K + 3 * d * H * V + 2 * d * H + conv  # q, k; v, z, output; b, a


def _step_flops(la: LinearAttentionConfig) -> float:
    """One decode step's recurrence in one linear layer: the token-by-token form (module docstring)."""
    return 2.0 * la.n_heads * la.head_dim * la.resolved_v_head_dim * (2 if la.kind == "lightning" else 3)


# smoe.nn.linear_attention.SUB_CHUNK (no torch import here; tests/test_accounting.py holds them equal)
_SUB_CHUNK = 16


def chunked_recurrence_flops(la: LinearAttentionConfig, seq_len: int) -> float:
    """FLOPs per token of one linear layer's chunked recurrence over sequences of ``seq_len`` tokens (module
    docstring), padding included."""
    H, K, V = la.n_heads, la.head_dim, la.resolved_v_head_dim
    sub = math.gcd(la.chunk, _SUB_CHUNK)
    C = min(la.chunk, -(-seq_len // sub) * sub)
    if la.kind == "lightning":
        macs = C * (K + V) + 2 * K * V
    else:
        macs = C * (2.5 * K + 1.5 * V) + 3 * K * V + ((sub + 1) * K if la.kind == "kda" else 0)
    padded = -(-seq_len // C) * C
    return 2.0 * H * macs * padded / seq_len


def recurrent_state_bytes(config: ModelConfig, dtype: str = "bf16") -> int:
    """One sequence's recurrent state over all linear layers: fp32 states plus convolution histories in ``dtype``
    (0 for a model without linear layers)."""
    la = config.linear_attention
    if la is None:
        return 0
    state = 4 * la.n_heads * la.head_dim * la.resolved_v_head_dim
    conv = 0 if la.kind == "lightning" else _conv_channels(la) * (la.conv_kernel - 1) * DTYPE_BYTES[dtype]
    return config.layout.n_linear * (state + conv)



def _attention_matmul_params(config: ModelConfig) -> int:
    """Attention parameters that are matmul weights (no norms or biases), for FLOPs."""
    d, attn = config.dim, config.attention
    if isinstance(attn, MLAConfig):
        H, qk = attn.n_heads, attn.qk_head_dim
        q = d * H * qk if attn.q_lora_rank is None else d * attn.q_lora_rank + attn.q_lora_rank * H * qk
        return (q + d * (attn.kv_lora_rank + attn.qk_rope_head_dim)
                + attn.kv_lora_rank * H * (attn.qk_nope_head_dim + attn.v_head_dim) + H * attn.v_head_dim * d)
    hd = attn.resolved_head_dim(d)
    return (3 if attn.output_gate else 2) * d * attn.n_heads * hd + 2 * d * attn.n_kv_heads * hd


def _attention_width(config: ModelConfig, latent: bool = False) -> int:
    """heads x (qk_dim + v_dim) of one layer: the multiply-adds per visible position; ``latent``: MLA in the latent
    space (module docstring)."""
    attn = config.attention
    if isinstance(attn, MLAConfig):
        if latent:
            return attn.n_heads * (2 * attn.kv_lora_rank + attn.qk_rope_head_dim)
        return attn.n_heads * (attn.qk_head_dim + attn.v_head_dim)
    return attn.n_heads * 2 * attn.resolved_head_dim(config.dim)


def _window(config: ModelConfig) -> int | None:
    return None if isinstance(config.attention, MLAConfig) else config.attention.sliding_window


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def decode_attention_flops(config: ModelConfig, context: int) -> float:
    """Attention FLOPs (scores and values, all layers) of one new token over ``context`` cached positions; a
    linear layer's recurrence, the same at every context."""
    _positive_int("context", context)
    window = _window(config)
    visible = context if window is None else min(context, window)
    n_linear = config.layout.n_linear
    recurrence = n_linear * _step_flops(config.linear_attention) if n_linear else 0.0
    return 2.0 * (config.n_layers - n_linear) * _attention_width(config, latent=True) * visible + recurrence


def kv_cache_elements(config: ModelConfig, context: int = 1) -> int:
    """Cache elements (all full-attention layers) of one sequence holding ``context`` positions: GQA k and v, or
    MLA's latent and rotary key; a sliding window keeps its last ``window`` positions. Linear layers keep a state
    instead (``recurrent_state_bytes``)."""
    _positive_int("context", context)
    attn, window = config.attention, _window(config)
    if isinstance(attn, MLAConfig):
        per_position = attn.kv_lora_rank + attn.qk_rope_head_dim
    else:
        per_position = 2 * attn.n_kv_heads * attn.resolved_head_dim(config.dim)
    n_full = config.n_layers - config.layout.n_linear
    return n_full * per_position * (context if window is None else min(context, window))


def _attention_score_flops(config: ModelConfig, seq_len: int) -> float:
    per_ctx, window = _attention_width(config), _window(config)
    context = (seq_len + 1) / 2
    if window is not None and window < seq_len:
        # positions < window see t+1 keys, later ones see window keys
        context = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len
    return 2 * per_ctx * context


def _block_components(config: ModelConfig, moe_layer: bool, linear: bool = False
                      ) -> tuple[dict[str, int], dict[str, int]]:
    """(all parameters, active parameters) of one block, by component."""
    d = config.dim
    total = {"linear_attention": linear_attention_params(config)} if linear else {"attention": attention_params(config)}
    total["norms"] = 2 * d
    if not moe_layer:
        total["dense_ffn"] = 3 * d * config.ffn_dim
        return total, dict(total)
    moe = config.moe
    E = moe.n_routed_experts
    router = (E * d if moe.routing != "hash" else 0) + (E if moe.router_bias else 0) + (E if moe.has_expert_bias else 0)
    total.update(
        router=router,
        routed_experts=3 * E * d * moe.expert_dim,
        shared_experts=(3 * d * moe.n_shared_experts * moe.resolved_shared_expert_dim
                        + (d if moe.shared_expert_gate else 0)),
    )
    if config.layout.dense_residual:
        total["dense_ffn"] = 3 * d * config.ffn_dim
        total["norms"] += d
    active = dict(total)
    active["routed_experts"] = 3 * moe.top_k * d * moe.expert_dim
    return total, active


def _add(into: dict[str, int], other: dict[str, int], times: int = 1) -> None:
    for k, v in other.items():
        into[k] = into.get(k, 0) + v * times


def account(config: ModelConfig, seq_len: int | None = None) -> Accounting:
    config.validate()
    seq_len = config.max_seq_len if seq_len is None else seq_len
    _positive_int("seq_len", seq_len)
    d, V = config.dim, config.vocab_size
    total = {"embedding": V * d, "head": 0 if config.tie_embeddings else V * d, "norms": d}
    active = dict(total)
    n_moe, n_linear = config.n_moe_layers, config.layout.n_linear
    for (moe_layer, linear), count in _layer_kinds(config).items():
        block_total, block_active = _block_components(config, moe_layer, linear)
        _add(total, block_total, count)
        _add(active, block_active, count)
    for key in ("attention", "dense_ffn", "routed_experts", "shared_experts", "router"):
        total.setdefault(key, 0)
        active.setdefault(key, 0)

    total_params = sum(total.values())
    active_params = sum(active.values())

    # Each MTP module: enorm + hnorm + eh_proj (2d -> d) + a block like the last layer + its output norm.
    last_moe = config.moe is not None and config.layout.is_moe(config.n_layers - 1)
    mtp_total, mtp_active = (sum(c.values()) + 3 * d + 2 * d * d for c in _block_components(config, last_moe))
    total["mtp"] = config.layout.n_mtp_modules * mtp_total
    active["mtp"] = config.layout.n_mtp_modules * mtp_active
    excl = active_params - (total["embedding"] if not config.tie_embeddings else 0)

    # FLOPs: matmul weights a token touches, plus attention over its context.
    attn_mm = _attention_matmul_params(config) * (config.n_layers - n_linear)
    if n_linear:
        attn_mm += _linear_matmul_params(d, config.linear_attention) * n_linear
    ffn_mm = active["dense_ffn"] + active["routed_experts"] + active["shared_experts"] + active["router"]
    if config.moe is not None:
        # the router's logit bias and the aux-free selection bias are additions, not matmul weights
        ffn_mm -= n_moe * ((config.moe.n_routed_experts if config.moe.router_bias else 0)
                                + (config.moe.n_routed_experts if config.moe.has_expert_bias else 0))
    matmul = attn_mm + ffn_mm + V * d  # the head (tied or not) is a matmul
    forward = 2 * matmul + (config.n_layers - n_linear) * _attention_score_flops(config, seq_len)
    if n_linear:
        forward += n_linear * chunked_recurrence_flops(config.linear_attention, seq_len)

    kv_elems = kv_cache_elements(config)
    return Accounting(
        name=config.name,
        total_params=total_params,
        active_params=active_params,
        active_params_excl_embedding=excl,
        params_by_component=total,
        active_by_component=active,
        mtp_params=total["mtp"],
        seq_len=seq_len,
        matmul_flops_per_token=float(2 * matmul),
        forward_flops_per_token=float(forward),
        train_flops_per_token=float(3 * forward),
        weight_bytes={k: total_params * b for k, b in DTYPE_BYTES.items()},
        kv_cache_bytes_per_token={k: kv_elems * b for k, b in DTYPE_BYTES.items() if k != "fp32"},
        n_moe_layers=n_moe,
        n_linear_layers=n_linear,
        recurrent_state_bytes={k: recurrent_state_bytes(config, k) for k in DTYPE_BYTES if k != "fp32"}
        if n_linear else None,
    )


def _layer_kinds(config: ModelConfig) -> dict[tuple[bool, bool], int]:
    """How many layers of each (MoE, linear attention) kind, the kind of layer 0 first so that the components keep
    the order in which the layers introduce them. Counted without visiting each layer unless layer_types lists them
    (a config may claim millions of layers)."""
    n_moe = config.n_moe_layers
    if config.layout.layer_types is None:
        kinds = [((False, False), config.n_layers - n_moe), ((True, False), n_moe)]
        if config.moe is not None and config.layout.is_moe(0):
            kinds.reverse()
        return {kind: count for kind, count in kinds if count}
    counts: dict[tuple[bool, bool], int] = {}
    for i in range(config.n_layers):
        kind = (config.moe is not None and config.layout.is_moe(i), config.layout.is_linear(i))
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def human(n: float) -> str:
    """1234567 -> '1.23M'; 671026419200 -> '671.0B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value >= 100 else f"{value:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_accounting(acc: Accounting) -> str:
    """A human-readable report (``smoe inspect``)."""
    excl = acc.active_params_excl_embedding
    lines = [
        f"{acc.name}",
        f"  total parameters      {human(acc.total_params):>10}  ({acc.total_params:,})",
        f"  active parameters     {human(acc.active_params):>10}  ({acc.active_params:,}, embedding and head counted)",
        f"  active excl. embedding{human(excl):>10}  ({excl:,})",
    ]
    if acc.mtp_params:
        lines.append(f"  MTP modules (extra)   {human(acc.mtp_params):>10}  ({acc.mtp_params:,}, not in the total)")
    lines.append("  by component              total      active")
    for key, value in acc.params_by_component.items():
        if value:
            note = "  (not in the totals)" if key == "mtp" else ""
            lines.append(f"    {key:<20}{human(value):>10}  {human(acc.active_by_component[key]):>10}{note}")
    lines += [
        f"  MoE layers            {acc.n_moe_layers:>10}",
        f"  FLOPs/token @ {acc.seq_len:<7} {human(acc.forward_flops_per_token):>9}  forward, "
        f"{human(acc.train_flops_per_token)} training",
        "  weights               " + ", ".join(f"{k} {_bytes(v)}" for k, v in acc.weight_bytes.items()),
        "  KV cache / token      " + ", ".join(f"{k} {_bytes(v)}" for k, v in acc.kv_cache_bytes_per_token.items()),
    ]
    if acc.recurrent_state_bytes:  # the convolution history in the cache dtype, the state in fp32
        states = ", ".join(f"{k} {_bytes(v)}" for k, v in acc.recurrent_state_bytes.items())
        lines.append(f"  recurrent state / seq {states}  ({acc.n_linear_layers} linear-attention layers, constant "
                     f"in the context)")
    return "\n".join(lines)
