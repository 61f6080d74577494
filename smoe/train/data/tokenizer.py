"""Training smoe's byte-level BPE tokenizer, and the UTF-8 bytes each token stands for (for bits per byte).
Loading a tokenizer.json is smoe.io.tokenizer's."""

from __future__ import annotations

import json
import re
from typing import Iterable

import numpy as np

from smoe.io.tokenizer import EOS


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) with one special token, EOS; deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _is_byte_level(tokenizer) -> bool:
    spec = json.loads(tokenizer.to_str())

    def has(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(spec.get("pre_tokenizer")) or has(spec.get("decoder"))


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for; special tokens (EOS) count 0. Exact for byte-level BPE (every symbol of
    a token is one byte), so summing over a text's tokens gives its byte count, for bits per byte. For other
    tokenizers an approximation (sentencepiece's '▁' and <0xNN> byte tokens count one byte each)."""
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    added = tokenizer.get_added_tokens_decoder()
    byte_level = _is_byte_level(tokenizer)
    for token, idx in tokenizer.get_vocab().items():
        if idx in added:
            lengths[idx] = 0 if added[idx].special else len(added[idx].content.encode("utf-8"))
        elif byte_level:
            lengths[idx] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            lengths[idx] = 1
        else:
            lengths[idx] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths
