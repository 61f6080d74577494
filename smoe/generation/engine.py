"""The continuous-batching engine over a static cache: ``Engine`` holds one request per cache row; requests join
free rows, prefill alone in their row in chunks, decode together one token per step in a forward over every row,
and leave when done. ``generate`` (smoe.generation.streaming) and ``smoe serve`` both run it. A forward's shapes
depend only on the engine's row count and the request itself (the other rows are padding to it, each row attends
over its own keys, experts run in fixed-shape tiles), so a request's tokens are the same bit for bit whoever shares
the engine with it.

Legend: B batch (rows), V vocabulary.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from smoe import kernels
from smoe.generation.sampling import GREEDY_BELOW, check_sampling, sample
from smoe.models.transformer import ModelOutput, Transformer
from smoe.moe import RouterStatsMode

# Prompt tokens per prefill forward: bounds how long a newcomer's prefill holds up the requests already decoding.
PREFILL_CHUNK = 256
# A compiled step of rows that may depend on each other attends over the cache's first slots, a multiple of this
# covering every row in it (one graph for every count: the slot axis is dynamic).
SLOT_BLOCK = 64


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (the softmax of its logits, before temperature or filtering) and
    the ``top`` most likely tokens at its position, most likely first, as (token id, log-probability)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Request:
    """A prompt to continue and how, plus what the engine has made of it: ``tokens`` so far and, once done, the
    ``finish_reason``: "stop" (it emitted a stop token, the last of ``tokens``), "length" (``max_new_tokens``),
    "cancelled", or "error" (choosing its next token failed; ``error`` says why, and the other rows go on).

    ``logprobs`` (an int n) records each new token's ``TokenLogprob`` with the n most likely alternatives in
    ``token_logprobs``; ``prompt_logprobs`` records the same for every prompt token but the first in
    ``prompt_token_logprobs`` (scoring a text: its prefill then computes the logits at every position), and then
    ``max_new_tokens`` may be 0."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_tokens: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    row: int | None = None  # the cache row it holds while the engine runs it
    prefilled: int = 0  # prompt tokens in the cache
    generator: torch.Generator | None = None
    error: str | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_token_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Continuous batching over a static cache of ``rows`` rows, one request per row.

    ``add`` puts a request in a free row; ``prefill`` runs the next chunk (``prefill_chunk`` tokens at most) of the
    oldest request still prefilling, in its row alone; ``decode`` gives every request past its prefill its next
    token in one forward over all rows, the others being padding, with the experts in fixed-shape tiles. A request
    that finishes or is cancelled frees its row. The caller decides how to interleave the two (``generate``: every
    prefill first; the server: chunks worth one chunk's tokens between decode steps, so newcomers hold up the others
    by one chunk at most).
    ``count_experts`` keeps ``expert_tokens``: tokens routed to each expert of each MoE layer so far.
    ``independent_rows=False`` gives up the fixed-shape tiles for the fastest expert backend and attends for every
    row in one call per decode step, where a row's result may change in the last bits with its neighbours'
    routing and lengths (offline ``generate`` without ``decode_rows``). ``compile`` runs each decode step as
    one compiled graph (``Transformer.decode_step``; docs/generation.md) of the engine's fixed shape (every row,
    every slot): for one row, for dependent rows, or for independent ones where the experts' own kernels compute
    each row whatever the others hold (quantised experts on the C++ kernels: ``Experts.rows_independent``).
    """

    def __init__(self, model: Transformer, rows: int, max_len: int, *, prefill_chunk: int = PREFILL_CHUNK,
                 count_experts: bool = False, independent_rows: bool = True, compile: bool = False):
        _check_model(model)
        if rows < 1 or prefill_chunk < 1:
            raise ValueError(f"rows, prefill_chunk: must be >= 1, got {rows}, {prefill_chunk}")
        self.model, self.prefill_chunk = model, prefill_chunk
        self.cache = model.new_cache(rows, max_len, independent_rows=independent_rows)
        self.slots: list[Request | None] = [None] * rows
        self.prefilling: deque[Request] = deque()
        self.router_stats = RouterStatsMode.LOAD if count_experts else RouterStatsMode.NONE
        self.expert_tokens: dict[int, torch.Tensor] = {}
        # One row decodes alone, so any expert backend computes it the same way; several ask for row independence.
        self.expert_backend = kernels.ROW_INDEPENDENT if rows > 1 and independent_rows else None
        self.device = model.embed.weight.device
        self.compiled_step = None
        self._bucket: int | None = None  # warm_up's choice of compiled rows
        if compile:
            _check_compilable(model, self.expert_backend is not None, self.device)
            # A C++ wrapper calls the graph's kernels: a Python one costs about 5 us a call, a few hundred a step.
            self.compiled_step = torch.compile(_step_and_argmax, fullgraph=True, options={"cpp_wrapper": True})
            # Independent rows: every step computes every row over every slot, one graph. Otherwise a step runs the
            # first rows of the cache, the fewest of these that hold every request (a graph each), over the first
            # slots that hold them: a fp32 product's last bits (the router's, MLA's) depend on its row count.
            self.row_buckets = [rows] if independent_rows else sorted({min(rows, 1 << i)
                                                                      for i in range(rows.bit_length() + 1)})
            for layer in self.cache.layers:  # one graph for every cache length
                for tensor, axis in layer.slot_axes:
                    torch._dynamo.mark_dynamic(tensor, axis)

    @property
    def free_rows(self) -> int:
        return self.slots.count(None)

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    @property
    def next_chunk(self) -> int:
        """Prompt tokens the next ``prefill`` runs (0 when none is prefilling). Chunks depend on the prompt alone."""
        if not self.prefilling:
            return 0
        request = self.prefilling[0]
        return min(self.prefill_chunk, len(request.prompt) - request.prefilled)

    def add(self, request: Request) -> None:
        """Give ``request`` a free row (ValueError if none is free or it cannot fit)."""
        n, vocab = len(request.prompt), self.model.config.vocab_size
        if not n:
            raise ValueError("prompt: needs at least one token")
        if not all(0 <= t < vocab for t in request.prompt):
            raise ValueError(f"prompt: token ids must lie in [0, {vocab})")
        if request.max_new_tokens == 0 and not request.prompt_logprobs:
            raise ValueError("max_new_tokens: 0 only when scoring the prompt (prompt_logprobs)")
        scoring_only = request.max_new_tokens == 0  # the sampling settings still have to make sense
        check_sampling(1 if scoring_only else request.max_new_tokens, request.temperature, request.top_k,
                       request.top_p)
        if n + request.max_new_tokens - 1 > self.cache.max_len:
            raise ValueError(f"max_new_tokens: a {n}-token prompt plus {request.max_new_tokens} new tokens exceed "
                             f"the {self.cache.max_len} tokens a row holds")
        if None not in self.slots:
            raise ValueError(f"rows: all {len(self.slots)} rows are taken")
        request.row = self.slots.index(None)
        request.prefilled = 0
        request.token_logprobs, request.prompt_token_logprobs = [], []
        if request.seed is not None:
            request.generator = torch.Generator(self.device).manual_seed(request.seed)
        self.cache.clear(request.row)
        self.slots[request.row] = request
        self.prefilling.append(request)

    def prefill(self) -> list[Request]:
        """The next prompt chunk of the oldest request still prefilling; [it] if that was its last chunk (it then
        has its first token), else []."""
        request = self.prefilling[0]
        row, start = request.row, request.prefilled
        chunk = request.prompt[start : start + self.prefill_chunk]
        out = self.model(torch.tensor([chunk], device=self.device), cache=self.cache.rows(row, row + 1),
                         logits_to_keep=len(chunk) if request.prompt_logprobs else 1, router_stats=self.router_stats)
        self._count(out)
        request.prefilled += len(chunk)
        if request.prompt_logprobs:  # position j predicts prompt token start + j + 1
            scored = request.prompt[start + 1 : request.prefilled + 1]
            request.prompt_token_logprobs += _logprobs(out.logits[0, : len(scored)], scored, request.logprobs or 0)
        if request.prefilled < len(request.prompt):
            return []
        self.prefilling.popleft()
        if request.max_new_tokens == 0:  # scored, nothing to generate
            request.finish_reason = "length"
            self._release(request)
        else:
            self._next_tokens([request], out.logits[:, -1], [0])
        return [request]

    def decode(self) -> list[Request]:
        """One token for every request past its prefill (the ones returned), in one forward over every row."""
        decoding = [r for r in self.running if r.prefilled == len(r.prompt)]
        if not decoding:
            return []
        ids_B1 = torch.zeros(len(self.slots), 1, dtype=torch.long)
        real_B1 = torch.zeros(len(self.slots), 1, dtype=torch.bool)
        for request in decoding:
            ids_B1[request.row], real_B1[request.row] = request.tokens[-1], True
        argmax_B = None
        if self.compiled_step is not None:
            logits_BV, argmax_B = self._compiled_decode(ids_B1.to(self.device), real_B1.to(self.device))
        else:
            mask_B1 = None if len(decoding) == len(self.slots) else real_B1.to(self.device)  # no padding: no mask
            out = self.model(ids_B1.to(self.device), attention_mask=mask_B1, cache=self.cache, logits_to_keep=1,
                             router_stats=self.router_stats, expert_backend=self.expert_backend)
            self._count(out)
            logits_BV = out.logits[:, -1]
        self._next_tokens(decoding, logits_BV, [r.row for r in decoding], argmax_B)
        return decoding

    def _compiled_decode(self, ids_B1: torch.Tensor, real_B1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Transformer.decode_step`` and each row's argmax, compiled, for the first b rows (the smallest of
        ``row_buckets`` holding every request; requests take the lowest free rows): each attends over the first n
        slots of its cache, masked to its own keys (independent rows: every row and every slot, the engine's fixed
        shape, in which a row's arithmetic never depends on the others'; else n is a multiple of ``SLOT_BLOCK``
        covering those rows). The logits are b rows'."""
        cache = self.cache
        top = max(r.row for r in self.running) + 1
        b = self._bucket or next(size for size in self.row_buckets if size >= top)
        lengths_b = cache.lengths_B[:b]
        n = cache.max_len
        if len(self.row_buckets) > 1:
            n = min(n, -(-(int(lengths_b.max()) + 1) // SLOT_BLOCK) * SLOT_BLOCK)
        layers = cache.layers
        if (b, n) != (len(self.slots), cache.max_len):
            layers = []
            for layer in cache.layers:
                layer = layer.rows(0, b)
                if layer.slot_axes:  # attention: the first n slots; a recurrent state has none
                    layer = layer.slots(n)
                    for tensor, axis in layer.slot_axes:
                        torch._dynamo.mark_dynamic(tensor, axis)
                layers.append(layer)
        slots_b = lengths_b.clamp(max=n - 1)  # a full row is free: it cannot be decoding
        logits_bV, argmax_b, loads = self.compiled_step(self.model, ids_B1[:b], slots_b.to(self.device), layers,
                                                        real_B1[:b], self.router_stats is RouterStatsMode.LOAD)
        lengths_b += real_B1[:b, 0].cpu()
        self._add_loads(loads)
        return logits_bV, argmax_b

    def warm_up(self) -> None:
        """Run a throwaway request's prefill and a decode step (compiled: one for each of ``row_buckets``), so that
        whatever the first ones build or compile (the C++ kernels, the compiled graphs) is ready before a real
        request comes; the engine is left as it was, its expert counts included. Needs a free row."""
        counts = dict(self.expert_tokens)
        buckets = self.row_buckets if self.compiled_step is not None else [None]
        request = Request([0], max_new_tokens=min(len(buckets) + 1, self.cache.max_len))
        with torch.inference_mode():
            self.add(request)
            try:
                while request in self.prefilling:
                    self.prefill()
                for bucket in buckets:
                    if request.done:
                        break
                    self._bucket = bucket
                    self.decode()
            finally:
                self._bucket = None
                self.cancel(request)
        self.expert_tokens = counts

    def cancel(self, request: Request) -> None:
        """Stop ``request`` (if it still runs) and free its row."""
        if not request.done:
            request.finish_reason = "cancelled"
        self._release(request)

    def _next_tokens(self, requests: list[Request], logits_BV: torch.Tensor, rows: list[int],
                     argmax_B: torch.Tensor | None = None) -> None:
        """Request i's next token from row ``rows[i]`` of ``logits_BV``; ``argmax_B``: every row's argmax, when the
        step computed it."""
        tokens: list[int | None] = [0] * len(requests)
        greedy = [i for i, r in enumerate(requests) if r.temperature < GREEDY_BELOW]
        if greedy:  # one argmax for them all: per row it is the same
            picked = [rows[i] for i in greedy]
            if argmax_B is None:
                argmax = (logits_BV if picked == list(range(len(logits_BV))) else logits_BV[picked]).argmax(-1)
                choices = argmax.tolist()
            else:
                every = argmax_B.tolist()
                choices = [every[row] for row in picked]
            for i, token in zip(greedy, choices, strict=True):
                tokens[i] = token
        for i, r in enumerate(requests):
            if r.temperature >= GREEDY_BELOW:
                try:
                    tokens[i] = int(sample(logits_BV[rows[i] : rows[i] + 1], r.temperature, r.top_k, r.top_p,
                                           r.generator))
                except (RuntimeError, ValueError) as err:  # NaN logits, say: this row ends, the others go on
                    tokens[i], r.finish_reason, r.error = None, "error", f"sampling failed: {err}"
        for i, (request, token) in enumerate(zip(requests, tokens, strict=True)):
            if token is None:
                self._release(request)
                continue
            if request.logprobs is not None:
                request.token_logprobs += _logprobs(logits_BV[rows[i] : rows[i] + 1], [token], request.logprobs)
            request.tokens.append(token)
            if token in request.stop_tokens:
                request.finish_reason = "stop"
            elif len(request.tokens) == request.max_new_tokens:
                request.finish_reason = "length"
            if request.done:
                self._release(request)

    def _release(self, request: Request) -> None:
        if request.row is not None and self.slots[request.row] is request:
            self.slots[request.row] = None
            self.cache.lengths_B[request.row] = 0  # a free row is padding: its stray keys go to slot 0
        if request in self.prefilling:
            self.prefilling.remove(request)
        request.row = None

    def _count(self, out: ModelOutput) -> None:
        self._add_loads({layer: stats.load for layer, stats in out.router_stats.items()})

    def _add_loads(self, loads: dict[int, torch.Tensor]) -> None:
        for layer, load in loads.items():
            total = self.expert_tokens.get(layer)
            self.expert_tokens[layer] = load if total is None else total + load


def _logprobs(logits_TV: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each row's log-probability of its token in ``tokens`` and its ``top`` most likely tokens."""
    logprobs_TV = logits_TV.float().log_softmax(-1)
    chosen = logprobs_TV.gather(-1, torch.tensor(tokens, device=logits_TV.device)[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprob(lp) for lp in chosen]
    values, ids = logprobs_TV.topk(min(top, logprobs_TV.shape[-1]), dim=-1)
    return [TokenLogprob(lp, tuple(zip(i, v, strict=True)))
            for lp, i, v in zip(chosen, ids.tolist(), values.tolist(), strict=True)]


def _step_and_argmax(model: Transformer, ids_B1: torch.Tensor, slots_B: torch.Tensor, layers: list,
                     real_B1: torch.Tensor, count_experts: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """A compiled decode step: ``Transformer.decode_step``'s logits and their argmax, which the graph computes in a
    fused loop (torch's own argmax takes about 0.9 ms for 16 rows of a 32k vocabulary on one core), and the tokens
    per expert when counted."""
    logits_BV, loads = model.decode_step(ids_B1, slots_B, layers, real_B1, count_experts)
    return logits_BV, logits_BV.argmax(-1), loads


# --- checks -------------------------------------------------------------------------------------------------------


def _check_model(model: Transformer) -> None:
    moe = model.config.moe
    if moe is not None and moe.routing == "expert_choice":
        raise ValueError("moe.routing: 'expert_choice' cannot decode: each expert picks its tokens from the whole "
                         "batch, later positions included, so a token's output depends on tokens not yet generated")


def _check_compilable(model: Transformer, independent_rows: bool, device: torch.device) -> None:
    """Raise naming what keeps ``compile`` from capturing a decode step as one graph."""
    if not all(layer.experts.traceable for layer in model.moe_layers):
        raise ValueError("compile: the routed experts are read from disk during the step (max_expert_memory), which "
                         "no compiled graph can capture; decode eagerly")
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:  # another torch: its compile says for itself what it lacks
            get_cpp_compiler = None
        if get_cpp_compiler is not None:
            try:
                get_cpp_compiler()
            except Exception as err:  # Inductor's own error types, which differ between releases
                raise ValueError(f"compile: torch.compile builds the CPU graph with a C++ compiler, and none was "
                                 f"found ({type(err).__name__}: {err}); install one (g++) or decode eagerly") from None
    if independent_rows and not all(layer.experts.rows_independent(device) for layer in model.moe_layers):
        raise ValueError("compile: rows independent of their neighbours (decode_rows) need experts whose kernels "
                         "compute each row alone, as the C++ kernels of quantised experts do; these need the eager "
                         "step's fixed-shape tiles: quantise the model, decode eagerly, or leave decode_rows unset")
