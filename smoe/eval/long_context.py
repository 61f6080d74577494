"""Decoding at long context, the report section of suites whose architectures differ in ``layout.layer_types``
(the hybrid suite, issue 15): what linear-attention layers buy against full attention, beside the loss they cost.

For each architecture, at a context of ``CompareSettings.long_context`` tokens:

- decode tokens/s at each of ``BATCH_SIZES``: ``STEPS`` decode steps (one new token per row, in one forward over
  every row, as offline ``smoe.generate`` decodes) after the context, timed ``REPEATS`` times after a warm-up; the
  best repeat is the figure (other tenants of a machine only ever slow a run down) and the spread over repeats is
  shown beside it. Every repeat starts at the same context: the cache's lengths are reset between repeats (the
  linear layers' states continue, which changes their values, not their cost).
- the cache's memory for one sequence holding the context: ``DecodeCache.nbytes`` measured, beside accounting's
  prediction (``kv_cache_elements`` x element size + ``recurrent_state_bytes``).
- accounting's decode FLOPs per token at the context: the matmuls (head included) plus attention over the context
  in the full-attention layers and the recurrence in the linear ones (``decode_attention_flops``).

The models are fresh, not the trained runs' (seed 0, in the weights' dtype fp32, on the device the runs trained
on): a step's cost does not depend on the weights, except through which experts the tokens pick, and at batch 8
of top-2 over 8 experts nearly every expert is hit either way. ``max_seq_len`` is raised to hold the context for
this measurement only (how RoPE extrapolates does not change the speed). On a CPU it runs on one thread: where
other processes share the cores, an OpenMP region waits for any of its threads that was pre-empted (one query's
attention over 257 keys took 8-12 ms on two threads beside another job, 0.013 ms on one). The context is prefilled
once, into one row, in chunks of ``PREFILL_CHUNK`` tokens of random ids; a batch's rows are copies of that row and
decode random ids, so the rows route differently. Results are written to ``long_context.json`` in the suite
directory and reused while the measurement's settings are unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoe.accounting import account, decode_attention_flops, kv_cache_elements, recurrent_state_bytes
from smoe.eval.document import Block, Heading, Paragraph, Table
from smoe.eval.settings import CompareSettings
from smoe.eval.suite import Arch
from smoe.io.files import read_json, write_json
from smoe.models import build_model
from smoe.models.transformer import DecodeCache

BATCH_SIZES = (1, 8)
STEPS = 32  # decode steps per timed repeat
REPEATS = 5
PREFILL_CHUNK = 1024  # bounds the prefill's attention scores (chunk x context) in memory
FILE = "long_context.json"


def differs_in_layer_types(archs: list[Arch]) -> bool:
    """Whether the suite compares token mixers: some architectures' layer_types differ (None: all full)."""
    kinds = set()
    for arch in archs:
        config = arch.config()
        kinds.add(config.layout.layer_types or ("full_attention",) * config.n_layers)
    return len(kinds) > 1


def measure(arch: Arch, context: int, batch_sizes: tuple[int, ...] = BATCH_SIZES, steps: int = STEPS,
            repeats: int = REPEATS, device: str = "cpu", prefill_chunk: int | None = None) -> dict[str, Any]:
    """One architecture's decode speed, cache memory and decode FLOPs at ``context`` tokens (module docstring)."""
    prefill_chunk = prefill_chunk or PREFILL_CHUNK
    config = replace(arch.config(), max_seq_len=context + steps).validate()
    torch.manual_seed(0)
    model = build_model(config).to(device).eval()
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        one = model.new_cache(1, context + steps, independent_rows=False)
        start = time.perf_counter()
        for begin in range(0, context, prefill_chunk):
            ids = torch.randint(0, config.vocab_size, (1, min(prefill_chunk, context - begin)), generator=g)
            model(ids.to(device), cache=one, logits_to_keep=1, router_stats=False)
        _sync(device)
        prefill_s = time.perf_counter() - start
        decode = {}
        for batch in batch_sizes:
            cache = model.new_cache(batch, context + steps, independent_rows=False)
            _copy_row(one, cache)
            ids = torch.randint(0, config.vocab_size, (steps, batch, 1), generator=g).to(device)
            for t in range(min(2, steps)):  # warm-up
                model(ids[t], cache=cache, logits_to_keep=1, router_stats=False)
            rates = []
            for _ in range(repeats):
                cache.lengths_B.fill_(context)
                start = time.perf_counter()
                for t in range(steps):
                    model(ids[t], cache=cache, logits_to_keep=1, router_stats=False)
                _sync(device)
                rates.append(batch * steps / (time.perf_counter() - start))
            decode[str(batch)] = rates
            del cache
        measured = model.new_cache(1, context).nbytes
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[model.embed.weight.dtype]
    kv = kv_cache_elements(config, context) * model.embed.weight.element_size()
    state = recurrent_state_bytes(config, dtype)
    attention = decode_attention_flops(config, context)
    types = config.layout.layer_types or ("full_attention",) * config.n_layers
    return {"decode_tok_s": decode, "prefill_s": prefill_s, "cache_bytes": measured, "kv_bytes": kv,
            "state_bytes": state, "predicted_cache_bytes": kv + state,
            "decode_flops": account(config).matmul_flops_per_token + attention, "attention_flops": attention,
            "full_layers": types.count("full_attention"), "linear_layers": types.count("linear_attention")}


def _copy_row(one: DecodeCache, cache: DecodeCache) -> None:
    """Every row of ``cache`` becomes a copy of ``one``'s single row (its buffers and length)."""
    for src, dst in zip(one.layers, cache.layers, strict=True):
        for name, tensor in vars(src).items():
            if isinstance(tensor, torch.Tensor):
                target = getattr(dst, name)
                target.copy_(tensor.expand_as(target))
    cache.lengths_B.copy_(one.lengths_B.expand_as(cache.lengths_B))


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_suite(out: Path, archs: list[Arch], settings: CompareSettings, device: str, log=print
                  ) -> dict[str, Any]:
    """``long_context.json`` of the suite in ``out``: reused when it was measured with the same settings, else
    every architecture measured (``measure``, at this module's BATCH_SIZES, STEPS and REPEATS) and written."""
    threads = 1 if torch.device(device).type == "cpu" else torch.get_num_threads()
    options = {"batch_sizes": tuple(BATCH_SIZES), "steps": STEPS, "repeats": REPEATS}
    wanted = json.loads(json.dumps({"context": settings.long_context, **options, "device": device,
                                    "threads": threads, "archs": [a.definition() for a in archs]}))  # as read back
    path = Path(out) / FILE
    if path.is_file():
        saved = read_json(path)
        if saved.get("settings") == wanted:
            return saved
    results, before = {}, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for arch in archs:
            log(f"{arch.label}: decoding at {settings.long_context:,} tokens of context")
            results[arch.label] = measure(arch, settings.long_context, device=device, **options)
    finally:
        torch.set_num_threads(before)
    write_json(path, {"settings": wanted, "archs": results}, indent=1)
    return {"settings": wanted, "archs": results}


def _rate(rates: list[float]) -> str:
    """``best (median, min-max over n)``"""
    if len(rates) < 2:
        return f"{rates[0]:,.1f} (one repeat)"
    return f"{max(rates):,.1f} ({np.median(rates):,.1f}, {min(rates):,.1f}-{max(rates):,.1f})"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def blocks(measured: dict[str, Any]) -> list[Block]:
    """The report's section from ``measure_suite``'s results; the first architecture is the reference of the
    speed ratios."""
    s, archs = measured["settings"], measured["archs"]
    context, batches = s["context"], [str(b) for b in s["batch_sizes"]]
    first = next(iter(archs.values()))
    rows = [("architecture", "layers full / linear",
             *(f"decode tok/s, batch {b}: best (median, range)" for b in batches),
             *(f"× {next(iter(archs))}, batch {b}" for b in batches),
             "cache MiB / sequence (accounting)", "of it: recurrent state", "decode GFLOPs / token (attention)",
             "prefill s")]
    for label, r in archs.items():
        rows.append((label, f"{r['full_layers']} / {r['linear_layers']}",
                     *(_rate(r["decode_tok_s"][b]) for b in batches),
                     *(f"{max(r['decode_tok_s'][b]) / max(first['decode_tok_s'][b]):.2f}x" for b in batches),
                     f"{_mib(r['cache_bytes'])} ({_mib(r['predicted_cache_bytes'])})", _mib(r["state_bytes"]),
                     f"{r['decode_flops'] / 1e9:.4f} ({r['attention_flops'] / 1e9:.4f})", f"{r['prefill_s']:.1f}"))
    return [Heading(3, f"Decoding at {context:,} tokens of context"),
            Paragraph(f"Each architecture freshly initialised (speed does not depend on the weights) with max_seq_len "
                      f"raised to hold the context, on {s['device']} with {s['threads']} thread(s), its context "
                      f"prefilled once (random tokens). Decode tokens/s: {s['steps']} steps of one token per row "
                      f"after the {context:,}-token context, timed {s['repeats']} times; the best repeat, with the "
                      "median and range over repeats (the spread other work on the machine adds), and the ratio of "
                      "best to the first architecture's. Cache: one sequence's DecodeCache.nbytes at the context, "
                      "measured, with accounting's prediction (key/value buffers of the full layers plus the linear "
                      "layers' fixed-size states); the recurrent state is constant in the context, the rest grows "
                      "with it. Decode FLOPs: accounting's per generated token at the context, matmuls and head "
                      "included, attention over the context (and the linear layers' recurrence) in parentheses. "
                      "Prefill: one timing of the context's prefill, in chunks, for scale only."),
            Table(tuple(rows))]
