"""Inference economics of a model on given hardware, as a roofline (``smoe cost``; no torch import).

A step that processes N tokens reads bytes from memory and does FLOPs; on D devices that split the work evenly
(the ideal of tensor and expert parallelism) it takes max(bytes / (D x bandwidth), FLOPs / (D x peak)), and the
larger term names the bound. Load imbalance, kernel efficiency and communication latency are not modelled: real
systems reach a fraction of these rates, so read them as ceilings and compare them with each other.

- Decode, batch B at context C (one new token per sequence): bytes = every weight but the routed experts and the
  input embedding (B rows of it), plus the routed experts the batch hits, plus each sequence's cache of C
  positions. With uniform routing each token picks k of E experts, so B tokens hit E (1 - (1 - k/E)^B) distinct
  experts per MoE layer in expectation (k at B = 1, nearly all E at large B). FLOPs = B x (matmul FLOPs per token
  + attention over C positions, MLA in the latent space), from smoe.accounting.
- Prefill, B prompts of P tokens (N = B P): the same weights with N tokens hitting experts, the caches written;
  FLOPs = N x the forward FLOPs per token at sequence length P (causal, the head at every position). Usually
  compute-bound: FLOPs / peak; the table says which bound binds.
- Precision: weights are stored in ``weights`` (int4: 4 bits plus a bf16 scale and zero point per 128 weights; the
  per-channel or 128 x 128 block scales of int8 and fp8 are under 0.1% and left out; norms and biases are counted
  in the same format). Matmuls run in the weights' format where the hardware has a peak for it (fp8 and int8 on
  tensor cores: W8A8), else in the hardware's base dtype (dequantised: W4A16). Activations and the cache are in the
  weights' dtype when that is fp32 or bf16, else in the base dtype; ``kv_dtype`` sets the cache's.
- Expert-parallel all-to-all over D ranks: each of a token's k rows leaves its rank with probability (D - 1) / D
  and comes back combined: 2 k (D - 1) / D rows of d activations per token per MoE layer. Its time at the link
  bandwidth is reported beside the step, not added to it (whether it overlaps is the system's choice).
- Memory per device: all weights plus B caches, over D (activations and workspace left out).
- Routed experts on disk (``max_expert_memory``, smoe.offload): memory holds every other weight and the expert cache
  (as many whole experts as fit the budget); a decode step reads (1 - h) of the experts it hits from disk, h the
  cache's hit rate (``expert_hit_rate``; by default the cache's share of the experts, what routing spread evenly
  gives). At ``disk_bandwidth`` those reads take bytes / bandwidth, added to the step: a read on demand stalls its
  layer (look-ahead prefetch hides part of it; benchmarks/offload.py measures how much).
- $ per million tokens: the price of a device-hour x D / the tokens produced in an hour.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from smoe.accounting import (
    DTYPE_BYTES,
    Accounting,
    account,
    decode_attention_flops,
    human,
    kv_cache_elements,
    recurrent_state_bytes,
)
from smoe.config import ModelConfig
from smoe.config.rules import check_types, fail, option, positive
from smoe.hardware import Hardware, hardware_names
from smoe.offload.budget import moe_layer_count, parse_size

WeightFormat = Literal["fp32", "bf16", "fp8", "int8", "int4"]
WEIGHT_BYTES = {**DTYPE_BYTES, "int8": 1, "int4": (4 + 32 / 128) / 8}  # module docstring
DEFAULT_CONTEXT = 4096  # positions cached per sequence unless the model holds fewer


@dataclass(frozen=True)
class CostSettings:
    hardware: tuple[str, ...] = option(
        ("h100-sxm",), f"hardware profiles (default h100-sxm): {', '.join(hardware_names())} (this machine, "
                       "measured when named); each report prints its profile's source")
    batch: tuple[int, ...] = option((1, 8, 64, 256), "sequences decoded (and prompts prefilled) together, one row "
                                                     "each (default 1,8,64,256)")
    weights: WeightFormat = option("bf16", "weight format (default bf16); int4 counts 4.25 bits per weight")
    kv_dtype: Literal["auto", "fp32", "bf16", "fp8"] = option(
        "auto", "cache dtype (default auto: that of the activations)")
    context: int | None = option(
        None, f"positions in each sequence's cache while decoding: cache bytes, attention reads (default "
              f"{DEFAULT_CONTEXT}, or the model's max_seq_len where that is shorter)")
    prompt_len: int | None = option(None, "tokens per prompt for prefill (default: `context`)")
    devices: int = option(1, "devices the model is split over evenly; the expert-parallel degree of the all-to-all "
                             "(default 1)")
    price_per_hour: float | None = option(None, "price of one device-hour, for $ per million tokens")
    max_expert_memory: str | None = option(None, "routed experts on disk behind a cache of this many bytes (e.g. "
                                                 "24GB; smoe.offload): memory holds the other weights and the cache, "
                                                 "decode reads the misses from disk")
    expert_hit_rate: float | None = option(None, "with `max_expert_memory`: the cache's hit rate (default: its share "
                                                 "of the experts, as routing spread evenly gives)")
    disk_bandwidth: float | None = option(None, "with `max_expert_memory`: bytes per second the expert reads get "
                                                "(e.g. 2e9), to price them in time")

    @property
    def prompt(self) -> int:
        return self.context if self.prompt_len is None else self.prompt_len

    def for_model(self, config: ModelConfig) -> CostSettings:
        """These settings with the default context resolved for ``config``: DEFAULT_CONTEXT positions, or all the
        model holds where that is fewer (a context the user gives is kept, and checked by ``check_model``)."""
        if self.context is not None:
            return self
        return replace(self, context=min(DEFAULT_CONTEXT, config.max_seq_len))

    def validate(self) -> CostSettings:
        check_types(self, "")
        positive("context", self.context, allow_none=True)
        positive("devices", self.devices)
        positive("prompt_len", self.prompt_len, allow_none=True)
        positive("price_per_hour", self.price_per_hour, allow_none=True)
        if not self.batch:
            fail("batch", "must name at least one batch size")
        for b in self.batch:
            positive("batch", b)
        known = hardware_names()
        if not self.hardware:
            fail("hardware", f"must name at least one profile: {', '.join(known)}")
        for name in self.hardware:
            if name not in known:
                fail("hardware", f"unknown profile {name!r}; known: {', '.join(known)}")
        if self.max_expert_memory is not None:
            parse_size(self.max_expert_memory)
        elif self.expert_hit_rate is not None or self.disk_bandwidth is not None:
            fail("expert_hit_rate" if self.expert_hit_rate is not None else "disk_bandwidth",
                 "only with `max_expert_memory`")
        if self.expert_hit_rate is not None and not 0 <= self.expert_hit_rate <= 1:
            fail("expert_hit_rate", f"must lie in [0, 1], got {self.expert_hit_rate}")
        positive("disk_bandwidth", self.disk_bandwidth, allow_none=True)
        return self


def check_model(config: ModelConfig, settings: CostSettings) -> None:
    """What the model must allow, checked before any measurement."""
    config.validate()
    settings = settings.for_model(config)
    for name, value in (("context", settings.context), ("prompt_len", settings.prompt)):
        if value > config.max_seq_len:
            fail(name, f"{value} exceeds the model's max_seq_len ({config.max_seq_len})")
    if config.moe is not None and config.moe.routing == "expert_choice":
        fail("moe.routing", "expert choice sees the whole batch, so it cannot decode one token at a time")
    if settings.max_expert_memory is not None and config.moe is None:
        fail("max_expert_memory", f"{config.name} is dense: no routed experts to keep on disk")


def experts_hit(n_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts ``tokens`` tokens hit when each picks ``top_k`` of ``n_experts`` uniformly."""
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


def routed_rows_sent(config: ModelConfig, devices: int) -> float:
    """Rows one token sends off its rank per MoE layer under expert parallelism over ``devices`` ranks, uniform
    routing: each of its top_k rows lands on another rank with probability (devices - 1) / devices."""
    return 0.0 if config.moe is None else config.moe.top_k * (devices - 1) / devices


@dataclass(frozen=True)
class Precision:
    weights: str
    matmul: str  # the dtype whose peak prices the FLOPs
    activations: str
    cache: str

    @classmethod
    def of(cls, hardware: Hardware, weights: str, kv_dtype: str = "auto") -> Precision:
        activations = weights if weights in ("fp32", "bf16") else hardware.base_dtype
        matmul = weights if weights in hardware.peak_flops else hardware.base_dtype
        return cls(weights, matmul, activations, activations if kv_dtype == "auto" else kv_dtype)


@dataclass(frozen=True)
class Step:
    """One roofline step of ``tokens`` tokens: ``batch`` sequences (decode) or prompts (prefill)."""

    batch: int
    tokens: int
    experts_hit: float  # per MoE layer
    bytes: float
    flops: float
    seconds: float
    bound: str  # "memory", "compute", or "disk" (experts read from disk take longer than the rest)
    tokens_per_s: float  # all devices together
    tokens_per_s_per_sequence: float
    tokens_per_s_per_device: float
    memory_bytes_per_device: float  # all weights and the batch's caches
    fits: bool
    all_to_all_bytes_per_device: float
    all_to_all_seconds: float | None  # at the link bandwidth; None without a link
    usd_per_million_tokens: float | None
    disk_bytes: float = 0.0  # experts read from disk (max_expert_memory), in ``seconds`` at disk_bandwidth


@dataclass(frozen=True)
class ExpertBudget:
    """Routed experts on disk behind ``budget`` bytes of cache (module docstring)."""

    budget: int
    expert_bytes: float  # one expert in the weight format
    slots: int  # experts the cache holds
    n_experts: int  # over every MoE layer
    hit_rate: float
    resident_bytes: float  # the other weights and the cache


@dataclass(frozen=True)
class CostReport:
    model: str
    total_params: int
    active_params: int
    hardware: Hardware
    settings: CostSettings
    precision: Precision
    weight_bytes: float
    cache_bytes_per_sequence: float  # at the context
    cache_elements_per_token_layer: int  # per full-attention layer
    state_bytes_per_sequence: float  # the linear-attention layers' recurrent state, in the cache bytes
    all_to_all_bytes_per_token: float  # dispatch + combine, every MoE layer
    decode: list[Step]
    prefill: list[Step]
    expert_budget: ExpertBudget | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _weights_read(config: ModelConfig, acc: Accounting, tokens: int, weights: str) -> tuple[float, float]:
    """(bytes of weights a step of ``tokens`` tokens reads, routed experts it hits per MoE layer)."""
    parts = acc.params_by_component
    params = acc.total_params - parts["routed_experts"]
    if not config.tie_embeddings:  # a lookup reads the tokens' rows only; a tied matrix is read whole as the head
        params -= parts["embedding"] - min(tokens, config.vocab_size) * config.dim
    hit = 0.0
    if config.moe is not None and parts["routed_experts"]:
        E = config.moe.n_routed_experts
        hit = experts_hit(E, config.moe.top_k, tokens)
        params += parts["routed_experts"] * hit / E
    return params * WEIGHT_BYTES[weights], hit


def _expert_budget(config: ModelConfig, acc: Accounting, s: CostSettings, p: Precision) -> ExpertBudget | None:
    if s.max_expert_memory is None:
        return None
    budget = parse_size(s.max_expert_memory)
    one = acc.params_by_component["routed_experts"] / (acc.n_moe_layers * config.moe.n_routed_experts) \
        * WEIGHT_BYTES[p.weights]
    n = moe_layer_count(config) * config.moe.n_routed_experts
    slots = min(int(budget // one), n)
    if slots < config.moe.top_k:
        fail("max_expert_memory", f"{budget:,} bytes hold {slots} expert(s) of {one:,.0f} bytes; one layer's "
                                  f"{config.moe.top_k} active experts need at least {config.moe.top_k * one:,.0f}")
    other = (acc.total_params - acc.params_by_component["routed_experts"]) * WEIGHT_BYTES[p.weights]
    hit = s.expert_hit_rate if s.expert_hit_rate is not None else slots / n
    return ExpertBudget(budget, one, slots, n, hit, other + slots * one)


def _step(config: ModelConfig, hw: Hardware, s: CostSettings, p: Precision, acc: Accounting, batch: int, tokens: int,
          flops: float, cache_bytes: float, offload: ExpertBudget | None = None) -> Step:
    """``cache_bytes``: the caches the step reads (decode) or writes (prefill), which are also what they hold."""
    D = s.devices
    weights, hit = _weights_read(config, acc, tokens, p.weights)
    total = weights + cache_bytes
    memory_s, compute_s = total / (D * hw.memory_bandwidth), flops / (D * hw.peak_flops[p.matmul])
    seconds = max(memory_s, compute_s)
    memory = (acc.total_params * WEIGHT_BYTES[p.weights] + cache_bytes) / D
    disk = disk_s = 0.0
    if offload is not None:
        disk = (1 - offload.hit_rate) * hit * acc.n_moe_layers * offload.expert_bytes
        disk_s = 0.0 if s.disk_bandwidth is None else disk / s.disk_bandwidth
        memory = (offload.resident_bytes + cache_bytes) / D
    a2a = tokens * _all_to_all_per_token(config, D, p) / D
    bound = "disk" if disk_s > seconds else "memory" if memory_s >= compute_s else "compute"
    seconds += disk_s
    rate = tokens / seconds
    return Step(
        batch=batch, tokens=tokens, experts_hit=hit, bytes=total, flops=flops, seconds=seconds,
        bound=bound, tokens_per_s=rate,
        tokens_per_s_per_sequence=rate / batch, tokens_per_s_per_device=rate / D, memory_bytes_per_device=memory,
        fits=memory <= hw.memory_bytes, all_to_all_bytes_per_device=a2a,
        all_to_all_seconds=None if hw.link_bandwidth is None else a2a / hw.link_bandwidth,
        usd_per_million_tokens=None if s.price_per_hour is None else s.price_per_hour * D / (3600 * rate) * 1e6,
        disk_bytes=disk,
    )


def _all_to_all_per_token(config: ModelConfig, devices: int, p: Precision) -> float:
    row = config.dim * DTYPE_BYTES[p.activations]
    return 2 * config.n_moe_layers * routed_rows_sent(config, devices) * row


def estimate(config: ModelConfig, hw: Hardware, settings: CostSettings) -> CostReport:
    """Decode and prefill at every batch size of ``settings`` on ``hw`` (module docstring); ``settings.hardware``
    names the profiles a caller resolves (measuring ``cpu-measured``), ``hw`` is the one priced here."""
    settings = settings.validate().for_model(config)
    check_model(config, settings)
    p = Precision.of(hw, settings.weights, settings.kv_dtype)
    acc, at_prompt = account(config), account(config, seq_len=settings.prompt)
    kv = DTYPE_BYTES[p.cache]
    state = recurrent_state_bytes(config, p.cache)  # linear-attention layers: the same at every context
    per_sequence = kv_cache_elements(config, settings.context) * kv + state
    decode_flops = acc.matmul_flops_per_token + decode_attention_flops(config, settings.context)
    offload = _expert_budget(config, acc, settings, p)
    decode = [_step(config, hw, settings, p, acc, B, B, B * decode_flops, B * per_sequence, offload)
              for B in settings.batch]
    prompt_cache = kv_cache_elements(config, settings.prompt) * kv + state
    prefill = [_step(config, hw, settings, p, acc, B, B * settings.prompt,
                     B * settings.prompt * at_prompt.forward_flops_per_token, B * prompt_cache, offload)
               for B in settings.batch]
    return CostReport(
        model=config.name, total_params=acc.total_params, active_params=acc.active_params, hardware=hw,
        settings=settings, precision=p, weight_bytes=acc.total_params * WEIGHT_BYTES[p.weights],
        cache_bytes_per_sequence=per_sequence, state_bytes_per_sequence=state,
        cache_elements_per_token_layer=kv_cache_elements(config) // max(1, config.n_layers - acc.n_linear_layers),
        all_to_all_bytes_per_token=_all_to_all_per_token(config, settings.devices, p), decode=decode,
        prefill=prefill, expert_budget=offload)


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f}" if n >= 1e8 else f"{n / 1e9:.3f}"


def _num(x: float) -> str:
    """Three significant digits or more: 0.0123, 1.23, 12.3, 1,234."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _table(steps: list[Step], seconds_label: str, disk: bool = False) -> list[str]:
    head = (f"  {'batch':>6} {'experts':>8} {'GB':>8} {'TFLOP':>8} {seconds_label:>9} {'bound':>7} {'tok/s/seq':>10} "
            f"{'tok/s':>10} {'tok/s/dev':>10} {'GB/dev':>7} {'fits':>4} {'a2a MB/dev':>10} {'a2a ms':>7} {'$/Mtok':>7}"
            + (f" {'disk MB':>8}" if disk else ""))
    rows = [head]
    for st in steps:
        a2a_ms = "-" if st.all_to_all_seconds is None else _num(st.all_to_all_seconds * 1e3)
        usd = "-" if st.usd_per_million_tokens is None else _num(st.usd_per_million_tokens)
        rows.append(f"  {st.batch:>6} {st.experts_hit:>8.1f} {_gb(st.bytes):>8} {_num(st.flops / 1e12):>8} "
                    f"{_num(st.seconds * 1e3):>9} {st.bound:>7} {_num(st.tokens_per_s_per_sequence):>10} "
                    f"{_num(st.tokens_per_s):>10} {_num(st.tokens_per_s_per_device):>10} "
                    f"{_gb(st.memory_bytes_per_device):>7} {'yes' if st.fits else 'NO':>4} "
                    f"{_num(st.all_to_all_bytes_per_device / 1e6):>10} {a2a_ms:>7} {usd:>7}"
                    + (f" {_num(st.disk_bytes / 1e6):>8}" if disk else ""))
    return rows


def format_cost(report: CostReport) -> str:
    """The text report of one model on one hardware profile."""
    r, hw, s, p = report, report.hardware, report.settings, report.precision
    link = "no link" if hw.link_bandwidth is None else f"link {hw.link_bandwidth / 1e9:,.0f} GB/s each way"
    lines = [
        f"{r.model} on {s.devices} x {hw.name}: {human(r.total_params)} parameters ({human(r.active_params)} "
        f"active), {p.weights} weights {_gb(r.weight_bytes)} GB, {p.activations} activations, {p.cache} cache",
        f"  {hw.name}: {_num(hw.memory_bandwidth / 1e9)} GB/s, {_num(hw.peak_flops[p.matmul] / 1e12)} TFLOP/s "
        f"{p.matmul} matmuls, {hw.memory_bytes / 1e9:,.0f} GB, {link}",
        f"  source: {hw.source}",
        f"  cache: {r.cache_elements_per_token_layer:,} elements per token per "
        f"{'full-attention ' if r.state_bytes_per_sequence else ''}layer, "
        f"{r.cache_bytes_per_sequence / 1e6:,.1f} MB per sequence at {s.context:,} tokens",
    ]
    if r.state_bytes_per_sequence:
        lines[-1] += f" (of which {r.state_bytes_per_sequence / 1e6:,.1f} MB recurrent state, the same at any context)"
    if r.all_to_all_bytes_per_token:
        lines.append(f"  all-to-all over {s.devices} devices: {r.all_to_all_bytes_per_token / 1e6:.3g} MB per token "
                     "(dispatch + combine, every MoE layer, uniform routing)")
    lines.append(f"decode at context {s.context:,}: ms per step = max(bytes / bandwidth, FLOPs / peak) with the "
                 "work split over the devices; experts hit per MoE layer E(1 - (1 - k/E)^B), uniform routing")
    if (b := r.expert_budget) is not None:
        disk = "not priced (give `disk_bandwidth`)" if s.disk_bandwidth is None else \
            f"at {s.disk_bandwidth / 1e9:.3g} GB/s, added to each step"
        lines.append(f"  experts on disk behind {b.budget / 1e9:.3g} GB: the cache holds {b.slots} of {b.n_experts} "
                     f"experts ({b.expert_bytes / 1e6:.3g} MB each), {b.resident_bytes / 1e9:.3g} GB resident with the "
                     f"other weights; hit rate {b.hit_rate:.0%}; disk MB = the misses a step reads, {disk}")
    lines += _table(r.decode, "ms/step", disk=r.expert_budget is not None)
    lines.append(f"prefill of {s.prompt:,}-token prompts (usually compute-bound: FLOPs / peak); ms = time to the "
                 "first token of the batch")
    lines += _table(r.prefill, "ms", disk=r.expert_budget is not None)
    return "\n".join(lines)
