"""Training data: sources -> documents -> byte-level BPE -> cached token arrays -> packed, mixed batches.

A data spec is ``stdlib`` or ``ENTRY[@W][,ENTRY[@W]...]`` where an entry is a file or a directory (searched
recursively, in sorted order) of ``.txt``, ``.jsonl`` (a text field per line) and ``.parquet`` (a text column), or
``hf:NAME[:SPLIT]`` / ``hf:NAME:CONFIG:SPLIT`` for a Hugging Face ``datasets`` dataset already in the local cache
(loaded offline: nothing is downloaded). ``@W`` is a mixing weight (default 1). Every document keeps the name of the
entry it came from, so results can be broken down by source.

``spec`` parses specs and finds their files, ``sources`` reads documents, ``tokenizer`` trains the BPE, ``cache``
splits, tokenizes and caches (``prepare_data``), and ``sampler`` draws batches: the batch of step ``s`` is a pure
function of ``(seed, s)``, so resuming at any step reproduces the data order with no iterator state to save.

Errors start with the config field at fault (``data``, ``val_data``, ``seq_len``, ``text_field``, ...) or the file.
"""

from smoe.train.data.cache import DEFAULT_VAL_FRACTION, prepare_data, tokenize_documents
from smoe.train.data.sampler import BatchSampler, val_batches, val_sequences
from smoe.train.data.tokenizer import token_byte_lengths, train_tokenizer

__all__ = ["DEFAULT_VAL_FRACTION", "BatchSampler", "prepare_data", "token_byte_lengths", "tokenize_documents",
           "train_tokenizer", "val_batches", "val_sequences"]
