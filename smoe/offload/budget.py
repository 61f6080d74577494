"""The settings of an expert budget (``OffloadConfig``: the one place they are written; the command line's flags are
generated from it), size strings (``parse_size``), and what a budget means for a model (``plan``). No torch import:
``smoe inspect`` and ``smoe cost`` use it on a config alone.

Bytes of one expert (its gate, up and down projections: 3 F D weights) in smoe's formats (smoe/kernels/qweight.py):
fp32 4 bytes a weight, bf16/fp16 2; int8 1 plus an fp32 scale per output channel (2F + D of them); int4 half a byte
plus an fp32 scale and offset per group of G inputs (G = 64 unless the checkpoint says otherwise).

Reads per token: a decoded token routes to top_k experts in each of the L MoE layers; each that is not resident is
read whole. At hit rate h that is (1 - h) * top_k * L * expert bytes per token. With routing spread evenly over the
experts (what random weights give; the worst case), any eviction policy hits about as often as the cache is large
against all experts (``budget / expert bytes``); a skewed load (trained models) hits more
(benchmarks/offload.py measures both).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

from smoe.config import DEFAULT_INT4_GROUP, ModelConfig
from smoe.config.rules import check_types, fail, option

ExpertFormat = Literal["fp32", "bf16", "fp16", "int8", "int4"]
CachePolicy = Literal["lru", "lfu", "load"]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MINIMUM = "min"  # a budget of one layer's active experts
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: int | str, name: str = "max_expert_memory") -> int:
    """Bytes from an int or a size string: ``4GB`` (10^9), ``512MiB`` (2^20), ``1.5GB``, ``4096`` (bytes). A bare
    ``G`` or ``M`` is refused: it could mean either."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        fail(name, f"must be a number of bytes or a size such as 4GB or 512MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in ("", *_UNITS):
            fail(name, f"{value!r} is not a size: give bytes or a number with one of B, KB, MB, GB, TB (powers of "
                       "1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 4GB")
        size = int(float(match.group(1)) * _UNITS.get(unit or "b"))
    if size <= 0:
        fail(name, f"must be a positive size, got {value!r}")
    return size


def format_size(n: float) -> str:
    """Bytes as the largest decimal unit (the way sizes are written to ``max_expert_memory``): 4.29 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class OffloadConfig:
    """How a model's routed experts are kept: all in memory (``max_expert_memory`` None, the default), or on disk
    with a cache of at most that many bytes."""

    max_expert_memory: str | int | None = option(
        None, "keep the routed experts in the checkpoint's files and read them on demand into a cache of at most "
              "this many bytes (e.g. 4GB, 512MiB; min: one layer's active experts, the least that runs); the other "
              "weights load as usual. Tokens are those of the in-memory model, bit for bit (docs/offload.md)")
    expert_cache_policy: CachePolicy = option(
        "load", "with `max_expert_memory`: which resident expert a read replaces: load (fewest tokens routed to it, "
                "recent ones weighing more; the most hits on trained routers, docs/offload.md), lru (least recently "
                "used) or lfu (fewest uses since it was read)")
    expert_prefetch: Literal["lookahead", "off"] = option(
        "lookahead", "with `max_expert_memory`: lookahead applies the next MoE layer's router to this layer's input "
                     "and reads the experts it picks in the background while this layer computes (Eliseev and "
                     "Mazur 2023); off reads only what a layer routes to")
    expert_io_threads: int = option(2, "with `max_expert_memory`: threads reading experts")
    pin_experts: str | None = option(
        None, "with `max_expert_memory`: a JSON file {\"LAYER\": [EXPERT, ...]} of experts read at load and never "
              "evicted (e.g. each layer's most routed); they count against the budget")
    drop_page_cache: bool = option(
        False, "with `max_expert_memory`: ask the kernel to drop each expert's file pages once read, so that every "
               "miss reads the disk (as when the model exceeds RAM: benchmarks)")

    @property
    def enabled(self) -> bool:
        return self.max_expert_memory is not None

    @property
    def budget(self) -> int | None:
        """Bytes, or None for ``min``: one layer's active experts, the least that runs."""
        return None if self.max_expert_memory == MINIMUM else parse_size(self.max_expert_memory)

    def validate(self) -> OffloadConfig:
        check_types(self, "")
        if self.max_expert_memory not in (None, MINIMUM):
            parse_size(self.max_expert_memory)
        elif self.max_expert_memory is None and self != OffloadConfig():
            changed = [k for k, v in asdict(self).items() if v != getattr(OffloadConfig(), k)]
            fail(changed[0], "only with `max_expert_memory` (the experts are all in memory without it)")
        if self.expert_io_threads < 1:
            fail("expert_io_threads", f"must be at least 1, got {self.expert_io_threads}")
        return self


def expert_bytes(config: ModelConfig, fmt: ExpertFormat, group_size: int | None = None) -> int:
    """Bytes of one routed expert of ``config`` stored as ``fmt`` (module docstring); int4 groups of ``group_size``
    inputs (default 64) where they divide the inputs."""
    moe = config.moe
    if moe is None:
        raise ValueError(f"{config.name}: a dense model has no routed experts to keep on disk")
    D, F = config.dim, moe.expert_dim
    weights = 3 * F * D
    if fmt in ("fp32", "bf16", "fp16"):
        return weights * (4 if fmt == "fp32" else 2)
    if fmt == "int8":
        return weights + 4 * (2 * F + D)
    G = group_size or DEFAULT_INT4_GROUP
    groups = 2 * F * -(-D // G) + D * -(-F // G)
    return weights // 2 + 8 * groups


@dataclass(frozen=True)
class BudgetPlan:
    """What ``budget`` bytes of expert cache mean for a model whose experts are stored in ``format``."""

    format: str
    budget: int
    expert_bytes: int  # one expert
    n_experts: int  # routed experts over all MoE layers (multi-token prediction layers included)
    n_moe_layers: int
    top_k: int
    slots: int  # experts the budget holds at once (at most all of them)
    minimum: int  # bytes: one layer's active experts (top_k), below which a token cannot be computed
    hit_rate: float  # assumed: given, else the slots' share of the experts (routing spread evenly)
    hit_rate_given: bool

    @property
    def total_expert_bytes(self) -> int:
        return self.n_experts * self.expert_bytes

    @property
    def resident_bytes(self) -> int:
        """The cache's memory: the slots it allocates."""
        return self.slots * self.expert_bytes

    @property
    def share(self) -> float:
        return self.slots / self.n_experts

    @property
    def bytes_read_per_token(self) -> float:
        """Expected bytes read from disk per decoded token (batch 1) at ``hit_rate``."""
        return (1 - self.hit_rate) * self.top_k * self.n_moe_layers * self.expert_bytes

    @property
    def fits(self) -> bool:
        return self.budget >= self.minimum

    def to_dict(self) -> dict:
        return {**asdict(self), "total_expert_bytes": self.total_expert_bytes, "resident_bytes": self.resident_bytes,
                "share": self.share, "bytes_read_per_token": self.bytes_read_per_token, "fits": self.fits}

    def describe(self) -> str:
        """One line (``smoe inspect``, ``smoe cost``)."""
        if not self.fits:
            return (f"{self.format:>5}: experts {format_size(self.total_expert_bytes)}, "
                    f"{format_size(self.expert_bytes)} each; too small: one layer's {self.top_k} active experts need "
                    f"at least {format_size(self.minimum)}")
        source = "given" if self.hit_rate_given else "routing spread evenly"
        return (f"{self.format:>5}: experts {format_size(self.total_expert_bytes)} ({format_size(self.expert_bytes)} "
                f"each); the cache holds {self.slots} of {self.n_experts} ({self.share:.0%}), "
                f"{format_size(self.resident_bytes)} resident; at hit rate {self.hit_rate:.0%} ({source}) a token "
                f"reads {format_size(self.bytes_read_per_token)}")


def moe_layer_count(config: ModelConfig) -> int:
    """MoE layers a forward runs, the multi-token prediction modules' included (they are loaded and routed too)."""
    if config.moe is None:
        return 0
    mtp = config.layout.n_mtp_modules if config.layout.is_moe(config.n_layers - 1) else 0
    return sum(config.layout.is_moe(i) for i in range(config.n_layers)) + mtp


def plan(config: ModelConfig, budget: int | str, fmt: ExpertFormat = "bf16", hit_rate: float | None = None,
         group_size: int | None = None) -> BudgetPlan:
    """What ``budget`` (bytes, a size, or ``min``) means for ``config``'s experts stored as ``fmt`` (module
    docstring)."""
    if hit_rate is not None and not 0 <= hit_rate <= 1:
        fail("hit_rate", f"must lie in [0, 1], got {hit_rate}")
    one = expert_bytes(config, fmt, group_size)
    size = config.moe.top_k * one if budget == MINIMUM else parse_size(budget)
    layers = moe_layer_count(config)
    n = layers * config.moe.n_routed_experts
    slots = min(size // one, n)
    return BudgetPlan(fmt, size, one, n, layers, config.moe.top_k, slots, config.moe.top_k * one,
                      hit_rate if hit_rate is not None else slots / n, hit_rate is not None)
