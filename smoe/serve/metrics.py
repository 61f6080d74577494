"""/metrics in Prometheus' text format: requests, tokens in and out, tokens/s, queue depth, batch occupancy, and
the MoE view: tokens routed to each expert of each MoE layer, and with --max-expert-memory the expert cache's
hits, misses, bytes read and look-ahead guesses."""

from __future__ import annotations

from collections import Counter

from smoe.offload.experts import cache_of
from smoe.serve.worker import Worker

_GAUGES = {  # name: (type, help)
    "prompt_tokens_total": ("counter", "Prompt tokens prefilled."),
    "generation_tokens_total": ("counter", "Tokens generated."),
    "generation_tokens_per_second": ("gauge", "Tokens generated per second over the last 10 s."),
    "queue_depth": ("gauge", "Requests waiting for a row."),
    "running_requests": ("gauge", "Requests holding a row (prefilling or decoding)."),
    "batch_rows": ("gauge", "Rows of the engine (--max-batch): every decode step computes all of them."),
    "batch_occupancy": ("gauge", "Share of the rows held by requests."),
}

# The expert cache of a model served with --max-expert-memory (smoe.offload.cache.CacheStats): a need is one expert
# one layer call routes to.
_CACHE = {
    "hits": ("counter", "Needs whose expert was resident."),
    "late_hits": ("counter", "Needs whose expert was being read (prefetched): waited for, not read again."),
    "misses": ("counter", "Needs read from disk on demand."),
    "read_bytes": ("counter", "Bytes of experts read from disk (on demand and prefetched)."),
    "wait_seconds": ("counter", "Seconds the engine waited for expert reads."),
    "prefetched": ("counter", "Experts read ahead on a look-ahead guess."),
    "lookahead_needed": ("counter", "Experts a layer routed to where the layer before had guessed."),
    "lookahead_right": ("counter", "Of those, experts the guess had named."),
}


def render(worker: Worker, requests: Counter) -> str:
    """``requests``: responses by (endpoint, status code)."""
    lines = ["# HELP smoe_requests_total HTTP responses, by endpoint and status code.",
             "# TYPE smoe_requests_total counter"]
    lines += [f'smoe_requests_total{{endpoint="{endpoint}",code="{code}"}} {n}'
              for (endpoint, code), n in sorted(requests.items())]
    for name, value in worker.gauges().items():
        kind, text = _GAUGES[name]
        shown = value if isinstance(value, int) else f"{value:.6g}"
        lines += [f"# HELP smoe_{name} {text}", f"# TYPE smoe_{name} {kind}", f"smoe_{name} {shown}"]
    lines += ["# HELP smoe_expert_routed_tokens_total Tokens routed to each expert of each MoE layer (prefill and "
              "decode; padding excluded).", "# TYPE smoe_expert_routed_tokens_total counter"]
    for layer, counts in worker.expert_tokens().items():
        lines += [f'smoe_expert_routed_tokens_total{{layer="{layer}",expert="{e}"}} {n}' for e, n in enumerate(counts)]
    cache = cache_of(worker.engine.model)
    if cache is not None:
        stats = cache.stats
        for name, value in (("hits", stats.hits), ("late_hits", stats.late_hits), ("misses", stats.misses),
                            ("read_bytes", stats.bytes_read), ("wait_seconds", stats.wait_seconds),
                            ("prefetched", stats.prefetched), ("lookahead_needed", stats.lookahead_needed),
                            ("lookahead_right", stats.lookahead_right)):
            kind, text = _CACHE[name]
            lines += [f"# HELP smoe_expert_cache_{name}_total {text}", f"# TYPE smoe_expert_cache_{name}_total {kind}",
                      f"smoe_expert_cache_{name}_total {value if isinstance(value, int) else f'{value:.6g}'}"]
    return "\n".join(lines) + "\n"
