"""Generation as a user calls it: ``generate`` (the new tokens of a batch of prompts) and ``generate_stream`` (the
next token of every row, step by step) over the engine, the prompts checked and left-padded, the model's stop tokens,
and ``TextStream`` (token ids to printable text deltas, for a terminal).

Legend: B batch (prompts), T prompt length, N new tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from smoe.generation.engine import PREFILL_CHUNK, Engine, Request
from smoe.generation.sampling import check_sampling
from smoe.io.files import read_json
from smoe.io.tokenizer import EOS
from smoe.models.transformer import Transformer


@torch.inference_mode()
def generate(model: Transformer, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_tokens: Iterable[int] = (), pad_id: int | None = None,
             attention_mask: torch.Tensor | None = None, decode_rows: int | None = None,
             compile: bool = False, prefill_chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """The new tokens (B, N), N <= max_new_tokens; see ``generate_stream`` for the arguments."""
    steps = list(generate_stream(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop_tokens=stop_tokens, pad_id=pad_id,
                                 attention_mask=attention_mask, decode_rows=decode_rows, compile=compile,
                                 prefill_chunk=prefill_chunk))
    return torch.stack(steps, dim=1)


@torch.inference_mode()
def generate_stream(model: Transformer, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_tokens: Iterable[int] = (), pad_id: int | None = None,
                    attention_mask: torch.Tensor | None = None, decode_rows: int | None = None,
                    compile: bool = False, prefill_chunk: int = PREFILL_CHUNK) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), once per step; a row that emitted a stop token yields ``pad_id``
    after it, and the loop ends when every row has stopped or after ``max_new_tokens``.

    ``prompts``: a list of token-id lists (any lengths), or a (B, T) tensor, left-padded if ``attention_mask``
    (1 real, 0 pad) says so. ``temperature`` 0 (or below ``GREEDY_BELOW``) is greedy; otherwise logits / temperature
    are sampled after keeping the ``top_k`` most likely tokens and the smallest set whose probability reaches
    ``top_p``. ``seed`` makes sampling reproducible: row b draws from a private generator seeded ``seed + b`` (the
    global RNG is untouched).
    ``pad_id`` (default: the smallest stop token, else 0) follows a row's stop token. ``decode_rows`` (default: one
    per prompt) is the engine's row count. Given, a prompt's tokens depend on it and on nothing else in the batch
    (the experts run in fixed-shape tiles): they are the tokens an ``Engine`` of that many rows gives it among any
    others. Left out, the experts run on the fastest backend, whose results can differ in the last bits with what
    the other rows route to the same expert. ``compile`` runs each decode step as one torch.compile graph
    (``Engine``): the first call compiles it, later calls on the same model and row count reuse it; with
    ``decode_rows`` only where the experts compute each row alone (quantised, C++ kernels). ``prefill_chunk``:
    prompt tokens per prefill forward (the chunks' shapes move a prompt's last bits: the same tokens need the same
    chunk). What these cost, and the serving settings that give the same tokens: docs/generation.md.
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
    engine = Engine(model, rows, T + max_new_tokens - 1, independent_rows=decode_rows is not None, compile=compile,
                    prefill_chunk=prefill_chunk)
    requests = [Request(p, max_new_tokens, temperature, top_k, top_p, None if seed is None else seed + b,
                        frozenset(stop)) for b, p in enumerate(token_lists)]
    for request in requests:
        engine.add(request)
    while engine.prefilling:
        engine.prefill()
    device = model.embed.weight.device
    for step in range(max_new_tokens):
        _raise_failed(requests)
        yield torch.tensor([r.tokens[step] if step < len(r.tokens) else pad_id for r in requests], device=device)
        if all(r.done for r in requests):
            return
        engine.decode()


def _raise_failed(requests: list[Request]) -> None:
    failed = [(b, r) for b, r in enumerate(requests) if r.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"row {failed[0][0]}: {failed[0][1].error}")


def _as_prompts(prompts, attention_mask, vocab_size: int) -> list[list[int]]:
    """Each prompt's real tokens, checked."""
    if torch.is_tensor(prompts):
        ids = prompts if prompts.dim() == 2 else prompts[None]
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(mask.shape)} differs from the prompts' "
                             f"{tuple(ids.shape)}")
        token_lists = [row[keep.bool()].tolist() for row, keep in zip(ids.cpu(), mask.cpu(), strict=True)]
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
