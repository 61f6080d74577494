"""Autoregressive generation: left-padded batched prompts, a static cache, greedy or sampled tokens, stop tokens,
and streaming (token ids per step; text deltas for a terminal).

    new_BN = smoe.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16)            # greedy
    for ids_B in generate_stream(model, prompts, temperature=0.8, top_p=0.9, seed=0): ...

Prompts of different lengths are left-padded, so slot s of the cache is step s of every row; positions count each
row's real tokens and padding is never attended, so a row produces the same tokens as its prompt alone. A row that
emits a stop token keeps emitting ``pad_id``; the loop ends when every row stopped or after ``max_new_tokens``.

Legend: B batch (prompts), T prompt length (padded), N new tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from smoe.io.files import read_json
from smoe.io.tokenizer import EOS
from smoe.models.transformer import Transformer


@torch.inference_mode()
def generate(model: Transformer, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_tokens: Iterable[int] = (), pad_id: int | None = None,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The new tokens (B, N), N <= max_new_tokens; see ``generate_stream`` for the arguments."""
    steps = list(generate_stream(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop_tokens=stop_tokens, pad_id=pad_id,
                                 attention_mask=attention_mask))
    return torch.stack(steps, dim=1)


@torch.inference_mode()
def generate_stream(model: Transformer, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_tokens: Iterable[int] = (), pad_id: int | None = None,
                    attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), once per step.

    ``prompts``: a list of token-id lists (any lengths; left-padded here), or a (B, T) tensor, left-padded if
    ``attention_mask`` (1 real, 0 pad) says so. ``temperature`` 0 is greedy; otherwise logits / temperature are
    sampled after keeping the ``top_k`` most likely tokens and the smallest set whose probability reaches ``top_p``.
    ``seed`` makes sampling reproducible (a private generator; the global RNG is untouched). ``pad_id`` (default:
    the smallest stop token, else 0) pads prompts and follows a row's stop token.
    """
    stop = sorted(set(int(t) for t in stop_tokens))
    pad_id = pad_id if pad_id is not None else (stop[0] if stop else 0)
    _check_model(model)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    device = model.embed.weight.device
    input_ids_BT, mask_BT = _as_batch(prompts, attention_mask, pad_id, model.config.vocab_size, device)
    B, T = input_ids_BT.shape
    if T + max_new_tokens - 1 > model.config.max_seq_len:
        raise ValueError(f"max_new_tokens: a {T}-token prompt plus {max_new_tokens} new tokens exceed the model's "
                         f"max_seq_len ({model.config.max_seq_len})")
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stop_S = torch.tensor(stop, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    cache = model.new_cache(B, T + max_new_tokens - 1)
    logits_BV = model(input_ids_BT, attention_mask=mask_BT, cache=cache, logits_to_keep=1, router_stats=False
                      ).logits[:, -1]
    for step in range(max_new_tokens):
        next_B = sample(logits_BV, temperature, top_k, top_p, generator)
        next_B = next_B.masked_fill(done_B, pad_id)
        done_B |= torch.isin(next_B, stop_S)
        yield next_B
        # One host sync per step, to end early; nothing in the layers waits on the host.
        if step + 1 == max_new_tokens or bool(done_B.all()):
            return
        logits_BV = model(next_B[:, None], cache=cache, logits_to_keep=1, router_stats=False).logits[:, -1]


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


def _as_batch(prompts, attention_mask, pad_id: int, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_tensor(prompts):
        ids = prompts if prompts.dim() == 2 else prompts[None]
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(mask.shape)} differs from the prompts' "
                             f"{tuple(ids.shape)}")
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask: only with a prompt tensor; lists of prompts are padded here")
        prompts = [list(p) for p in prompts]
        if not prompts:
            raise ValueError("prompts: no prompt given")
        ids, mask = pad_left(prompts, pad_id)
    empty = [b for b in range(ids.shape[0]) if not mask[b].any()]
    if empty:
        raise ValueError(f"prompts: row {empty[0]} has no token; every prompt needs at least one")
    real = ids[mask.bool()]
    if real.numel() and not (0 <= int(real.min()) and int(real.max()) < vocab_size):
        raise ValueError(f"prompts: token ids must lie in [0, {vocab_size}), got {int(real.min())}..{int(real.max())}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id: must lie in [0, {vocab_size}), got {pad_id}")
    return ids.to(device), mask.to(device)
