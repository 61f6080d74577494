"""Autoregressive generation: a continuous-batching engine over a static cache, greedy or sampled tokens, stop
tokens, and streaming (token ids per step; text deltas for a terminal).

    new_BN = smoe.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16)            # greedy
    for ids_B in generate_stream(model, prompts, temperature=0.8, top_p=0.9, seed=0): ...

``Engine`` holds one request per cache row: requests join free rows, prefill alone in their row in chunks, decode
together one token per step in a forward over every row, and leave when done. ``generate`` and ``smoe serve`` both
run it. A forward's shapes depend only on the engine's row count and the request itself (the other rows are
padding to it, each row attends over its own keys, experts run in fixed-shape tiles), so a request's tokens are the
same bit for bit whoever shares the engine with it (offline ``generate`` gives up the tiles for speed unless asked
for ``decode_rows``).

Legend: B batch (prompts), T prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smoe import kernels
from smoe.io.files import read_json
from smoe.io.tokenizer import EOS
from smoe.models.transformer import ModelOutput, Transformer

# Prompt tokens per prefill forward: bounds how long a newcomer's prefill holds up the requests already decoding.
PREFILL_CHUNK = 256


@torch.inference_mode()
def generate(model: Transformer, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_tokens: Iterable[int] = (), pad_id: int | None = None,
             attention_mask: torch.Tensor | None = None, decode_rows: int | None = None,
             compile: bool = False) -> torch.Tensor:
    """The new tokens (B, N), N <= max_new_tokens; see ``generate_stream`` for the arguments."""
    steps = list(generate_stream(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop_tokens=stop_tokens, pad_id=pad_id,
                                 attention_mask=attention_mask, decode_rows=decode_rows, compile=compile))
    return torch.stack(steps, dim=1)


@torch.inference_mode()
def generate_stream(model: Transformer, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_tokens: Iterable[int] = (), pad_id: int | None = None,
                    attention_mask: torch.Tensor | None = None, decode_rows: int | None = None,
                    compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), once per step; a row that emitted a stop token yields ``pad_id``
    after it, and the loop ends when every row has stopped or after ``max_new_tokens``.

    ``prompts``: a list of token-id lists (any lengths), or a (B, T) tensor, left-padded if ``attention_mask``
    (1 real, 0 pad) says so. ``temperature`` 0 is greedy; otherwise logits / temperature are sampled after keeping
    the ``top_k`` most likely tokens and the smallest set whose probability reaches ``top_p``. ``seed`` makes
    sampling reproducible: row b draws from a private generator seeded ``seed + b`` (the global RNG is untouched).
    ``pad_id`` (default: the smallest stop token, else 0) follows a row's stop token. ``decode_rows`` (default: one
    per prompt) is the engine's row count. Given, a prompt's tokens depend on it and on nothing else in the batch
    (the experts run in fixed-shape tiles), so ``smoe serve --max-batch R`` answers a request with
    ``generate(model, [prompt], decode_rows=R)``'s tokens. Left out, the experts run on the fastest backend, whose
    results can differ in the last bits with what the other rows route to the same expert (about 25% faster at 16
    rows on a CPU; docs/benchmarks.md). ``compile`` (not with ``decode_rows``) runs each decode step as one
    torch.compile graph (``Engine``): the first call compiles it (tens of seconds on a few cores), later calls on
    the same model and row count reuse it.
    """
    stop = sorted(set(int(t) for t in stop_tokens))
    pad_id = pad_id if pad_id is not None else (stop[0] if stop else 0)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    token_lists = _as_prompts(prompts, attention_mask, model.config.vocab_size)
    if not 0 <= pad_id < model.config.vocab_size:
        raise ValueError(f"pad_id: must lie in [0, {model.config.vocab_size}), got {pad_id}")
    rows = decode_rows if decode_rows is not None else len(token_lists)
    if rows < len(token_lists):
        raise ValueError(f"decode_rows: {rows} rows cannot hold {len(token_lists)} prompts")
    T = max(len(p) for p in token_lists)
    if T + max_new_tokens - 1 > model.config.max_seq_len:
        raise ValueError(f"max_new_tokens: a {T}-token prompt plus {max_new_tokens} new tokens exceed the model's "
                         f"max_seq_len ({model.config.max_seq_len})")
    engine = Engine(model, rows, T + max_new_tokens - 1, independent_rows=decode_rows is not None, compile=compile)
    requests = [Request(p, max_new_tokens, temperature, top_k, top_p, None if seed is None else seed + b,
                        frozenset(stop)) for b, p in enumerate(token_lists)]
    for request in requests:
        engine.add(request)
    while engine.prefilling:
        engine.prefill()
    device = model.embed.weight.device
    for step in range(max_new_tokens):
        yield torch.tensor([r.tokens[step] if step < len(r.tokens) else pad_id for r in requests], device=device)
        if all(r.done for r in requests):
            return
        engine.decode()


@dataclass(eq=False)
class Request:
    """A prompt to continue and how, plus what the engine has made of it: ``tokens`` so far and, once done, the
    ``finish_reason``: "stop" (it emitted a stop token, the last of ``tokens``), "length" (``max_new_tokens``) or
    "cancelled"."""

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
    one compiled graph (``Transformer.decode_step``; docs/generation.md), for one row or dependent rows.
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
        self.router_stats = "load" if count_experts else False
        self.expert_tokens: dict[int, torch.Tensor] = {}
        # One row decodes alone, so any expert backend computes it the same way; several ask for row independence.
        self.expert_backend = kernels.ROW_INDEPENDENT if rows > 1 and independent_rows else None
        self.device = model.embed.weight.device
        self.compiled_step = None
        if compile:
            _check_compilable(model, self.expert_backend is not None, count_experts, self.device)
            # A C++ wrapper calls the graph's kernels: a Python one costs about 5 us a call, a few hundred a step.
            self.compiled_step = torch.compile(_step_and_argmax, fullgraph=True, options={"cpp_wrapper": True})
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
        if n + request.max_new_tokens - 1 > self.cache.max_len:
            raise ValueError(f"max_new_tokens: a {n}-token prompt plus {request.max_new_tokens} new tokens exceed "
                             f"the {self.cache.max_len} tokens a row holds")
        if None not in self.slots:
            raise ValueError(f"rows: all {len(self.slots)} rows are taken")
        request.row = self.slots.index(None)
        request.prefilled = 0
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
                         logits_to_keep=1, router_stats=self.router_stats)
        self._count(out)
        request.prefilled += len(chunk)
        if request.prefilled < len(request.prompt):
            return []
        self.prefilling.popleft()
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
        """``Transformer.decode_step`` and each row's argmax, compiled: every row attends over all of its cache's
        slots, masked to its own keys (``generate`` sizes the cache to the request)."""
        cache = self.cache
        slots_B = cache.lengths_B.clamp(max=cache.max_len - 1)  # a full row is free: it cannot be decoding
        logits_BV, argmax_B = self.compiled_step(self.model, ids_B1, slots_B.to(self.device), cache.layers, real_B1)
        cache.lengths_B += real_B1[:, 0].cpu()
        return logits_BV, argmax_B

    def cancel(self, request: Request) -> None:
        """Stop ``request`` (if it still runs) and free its row."""
        if not request.done:
            request.finish_reason = "cancelled"
        self._release(request)

    def _next_tokens(self, requests: list[Request], logits_BV: torch.Tensor, rows: list[int],
                     argmax_B: torch.Tensor | None = None) -> None:
        """Request i's next token from row ``rows[i]`` of ``logits_BV``; ``argmax_B``: every row's argmax, when the
        step computed it."""
        tokens = [0] * len(requests)
        greedy = [i for i, r in enumerate(requests) if r.temperature == 0]
        if greedy:  # one argmax for them all: per row it is the same
            picked = [rows[i] for i in greedy]
            if argmax_B is None:
                argmax = (logits_BV if picked == list(range(len(logits_BV))) else logits_BV[picked]).argmax(-1)
                choices = argmax.tolist()
            else:
                every = argmax_B.tolist()
                choices = [every[row] for row in picked]
            for i, token in zip(greedy, choices):
                tokens[i] = token
        for i, r in enumerate(requests):
            if r.temperature != 0:
                tokens[i] = int(sample(logits_BV[rows[i] : rows[i] + 1], r.temperature, r.top_k, r.top_p,
                                       r.generator))
        for request, token in zip(requests, tokens):
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
        if request in self.prefilling:
            self.prefilling.remove(request)
        request.row = None

    def _count(self, out: ModelOutput) -> None:
        for layer, stats in out.router_stats.items():
            total = self.expert_tokens.get(layer)
            self.expert_tokens[layer] = stats.load if total is None else total + stats.load


def _step_and_argmax(model: Transformer, ids_B1: torch.Tensor, slots_B: torch.Tensor, layers: list,
                     real_B1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A compiled decode step: ``Transformer.decode_step``'s logits and their argmax, which the graph computes in a
    fused loop (torch's own argmax takes about 0.9 ms for 16 rows of a 32k vocabulary on one core)."""
    logits_BV = model.decode_step(ids_B1, slots_B, layers, real_B1)
    return logits_BV, logits_BV.argmax(-1)


def sample(logits_BV: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token per row: argmax at temperature 0, else a draw from the (top-k, top-p) filtered softmax."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        # Drop a token once the more likely ones already reach top_p; the most likely one always stays.
        drop_BV = probs_BV.cumsum(-1) - probs_BV >= top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T_max), prompts right-aligned behind ``pad_id``."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        if len(prompt):
            ids[b, T - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[b, T - len(prompt):] = 1
    return ids, mask


class TextStream:
    """Turns a growing list of token ids into printable text deltas. A byte-level token can end inside a
    multi-byte character; its text is held back until the character completes, so no partial U+FFFD is printed.
    Decodes only a short window (the last printed token onward), as text-generation-inference does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context (a leading space depends on it)
        self.read = 0  # ids before this have been printed

    def push(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        printed = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) > len(printed) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(printed):]
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end (bytes that never completed a character decode as U+FFFD)."""
        printed = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(printed):]


def default_stop_tokens(directory: str | Path, tokenizer=None) -> list[int]:
    """The model's end-of-sequence ids: ``eos_token_id`` of a Hugging Face generation_config.json or config.json,
    else the tokenizer's ``<|endoftext|>`` (what ``smoe train`` ends documents with); [] when neither knows."""
    for name in ("generation_config.json", "config.json"):
        file = Path(directory) / name
        if not file.is_file():
            continue
        eos = read_json(file).get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else eos
        if ids is not None:
            if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
                raise ValueError(f"{file}: eos_token_id must be a token id or a list of them, got {eos!r}")
            return ids
    if tokenizer is not None:
        eos_id = tokenizer.token_to_id(EOS)
        if eos_id is not None:
            return [eos_id]
    return []


# --- checks --------------------------------------------------------------------------------------------------------


def _check_model(model: Transformer) -> None:
    moe = model.config.moe
    if moe is not None and moe.routing == "expert_choice":
        raise ValueError("moe.routing: 'expert_choice' cannot decode: each expert picks its tokens from the whole "
                         "batch, later positions included, so a token's output depends on tokens not yet generated")


def _check_compilable(model: Transformer, independent_rows: bool, count_experts: bool, device: torch.device
                      ) -> None:
    """Raise naming what keeps ``compile`` from capturing a decode step as one graph."""
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
    if count_experts:
        raise ValueError("compile: counting the tokens routed to each expert needs the eager decode step")
    if independent_rows:
        raise ValueError("compile: decode_rows promises rows independent of their neighbours, which needs the "
                         "eager step (a call per row and fixed-shape expert tiles); leave decode_rows unset")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise naming the first out-of-range generation argument."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature: must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


def _as_prompts(prompts, attention_mask, vocab_size: int) -> list[list[int]]:
    """Each prompt's real tokens, checked."""
    if torch.is_tensor(prompts):
        ids = prompts if prompts.dim() == 2 else prompts[None]
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(mask.shape)} differs from the prompts' "
                             f"{tuple(ids.shape)}")
        token_lists = [row[keep.bool()].tolist() for row, keep in zip(ids.cpu(), mask.cpu())]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask: only with a prompt tensor; a list gives each prompt's tokens exactly")
        token_lists = [[int(t) for t in p] for p in prompts]
    if not token_lists:
        raise ValueError("prompts: no prompt given")
    empty = [b for b, p in enumerate(token_lists) if not p]
    if empty:
        raise ValueError(f"prompts: row {empty[0]} has no token; every prompt needs at least one")
    real = [t for p in token_lists for t in p]
    if not (0 <= min(real) and max(real) < vocab_size):
        raise ValueError(f"prompts: token ids must lie in [0, {vocab_size}), got {min(real)}..{max(real)}")
    return token_lists
