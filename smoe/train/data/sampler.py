"""Batches from prepared splits: the training sampler, a pure function of (seed, step) that mixes sources by weight,
and the fixed validation sequences.

Shapes: B batch (sequences), T sequence length (tokens), N sequences.
"""

from __future__ import annotations

import numpy as np
import torch

from smoe.train.data.cache import Split
from smoe.train.data.spec import Source


class BatchSampler:
    """Fixed-length sequences (seq_len inputs + the shifted targets, non-overlapping windows of each source's
    stream) drawn as a pure function of (seed, step).

    The global sequence stream is cut into cycles of ``PATTERN`` slots. Each cycle holds every source in proportion
    to its weight (largest remainder, at least one slot each) in a seeded order redrawn per cycle, so mixing is exact
    over every cycle rather than only in expectation. The k-th slot of a source takes the k-th sequence of that
    source's seeded permutation, redrawn every epoch: each epoch visits every sequence once. Both orders are computed
    from (seed, cycle) and (seed, source, epoch), so ``batch(step)`` needs no history.
    """

    PATTERN = 1024

    def __init__(self, split: Split, sources: list[Source], seq_len: int, batch_size: int, seed: int):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size: must be >= 1, got {seq_len} and {batch_size}")
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.streams = [split.tokens[s.name] for s in sources]
        self.n_seqs = [(len(t) - 1) // seq_len if len(t) else 0 for t in self.streams]
        for s, n in zip(sources, self.n_seqs, strict=True):
            if n < 1:
                raise ValueError(f"seq_len {seq_len}: training source {s.name} has only {len(split.tokens[s.name])}"
                                 f" tokens, fewer than one sequence of seq_len + 1")
        if sum(self.n_seqs) < batch_size:
            raise ValueError(f"seq_len {seq_len}: the training data holds {sum(self.n_seqs)} sequences of "
                             f"{seq_len} tokens, fewer than one batch of {batch_size}; lower seq_len or "
                             "batch_size, or add data")
        self.cycle_len = max(self.PATTERN, len(sources))
        self.per_cycle = _slot_counts([s.weight for s in sources], self.cycle_len)
        self._cycle_cache: tuple[int, np.ndarray, np.ndarray] | None = None  # pure caches of derived orders
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    def _cycle(self, cycle: int) -> tuple[np.ndarray, np.ndarray]:
        """The cycle's slot -> source, and slot -> rank among that source's slots."""
        if self._cycle_cache is None or self._cycle_cache[0] != cycle:
            slots = np.repeat(np.arange(len(self.per_cycle)), self.per_cycle)
            slots = np.random.default_rng([self.seed, 1, cycle]).permutation(slots)
            starts = np.cumsum(self.per_cycle) - self.per_cycle  # where each source's run begins once sorted
            rank = np.empty_like(slots)
            rank[np.argsort(slots, kind="stable")] = np.arange(len(slots)) - np.repeat(starts, self.per_cycle)
            self._cycle_cache = (cycle, slots, rank)
        return self._cycle_cache[1], self._cycle_cache[2]

    def _sequence(self, g: int) -> tuple[int, int]:
        """Global sequence number -> (source index, sequence index within that source's stream)."""
        cycle, slot = divmod(g, self.cycle_len)
        slots, rank = self._cycle(cycle)
        s = int(slots[slot])
        epoch, pos = divmod(cycle * int(self.per_cycle[s]) + int(rank[slot]), self.n_seqs[s])
        cached = self._perm_cache.get(s)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, 2, s, epoch]).permutation(self.n_seqs[s]))
            self._perm_cache[s] = cached
        return s, int(cached[1][pos])

    def sources(self, step: int) -> list[int]:
        """The source index (into the sources given) of each row of ``batch(step)``."""
        return [self._sequence(g)[0] for g in range(step * self.batch_size, (step + 1) * self.batch_size)]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BT, targets_BT) int64 for ``step``; targets are the inputs shifted by one token."""
        if step < 0:
            raise ValueError(f"step: must be >= 0, got {step}")
        rows = []
        for g in range(step * self.batch_size, (step + 1) * self.batch_size):
            s, j = self._sequence(g)
            start = j * self.seq_len
            rows.append(np.asarray(self.streams[s][start:start + self.seq_len + 1], dtype=np.int64))
        seqs_BT1 = torch.from_numpy(np.stack(rows))
        return seqs_BT1[:, :-1], seqs_BT1[:, 1:]


def _slot_counts(weights: list[float], length: int) -> np.ndarray:
    """Integer slots per source summing to ``length``, proportional to the weights, at least one each."""
    ideal = np.asarray(weights, dtype=np.float64) / sum(weights) * length
    counts = np.maximum(1, np.floor(ideal)).astype(np.int64)
    while counts.sum() > length:  # the minimum of one pushed the total over: take from the most over-served
        counts[np.argmax(np.where(counts > 1, counts - ideal, -np.inf))] -= 1
    while counts.sum() < length:  # largest remainder fills the rest
        counts[np.argmax(ideal - counts)] += 1
    return counts


def val_sequences(split: Split, seq_len: int, max_sequences: int) -> tuple[torch.Tensor, list[int]]:
    """Up to ``max_sequences`` non-overlapping sequences of seq_len + 1 tokens from the validation streams, and the
    source index of each: a fixed evaluation set. Sources take turns (sequence 0 of each, then sequence 1, ...), so a
    cap on the count still covers every source; within a source the sequences follow its stream in order."""
    streams = list(split.tokens.values())
    counts = [(len(t) - 1) // seq_len if len(t) else 0 for t in streams]
    rows, sources = [], []
    for j in range(max(counts, default=0)):
        if len(rows) == max_sequences:
            break
        for s, stream in enumerate(streams):
            if j < counts[s] and len(rows) < max_sequences:
                rows.append(np.asarray(stream[j * seq_len:j * seq_len + seq_len + 1], dtype=np.int64))
                sources.append(s)
    if not rows:
        raise ValueError(f"seq_len {seq_len}: the validation data holds {split.total_tokens} tokens, fewer than one "
                         f"sequence of seq_len + 1; add validation text or lower seq_len")
    return torch.from_numpy(np.stack(rows)), sources


def val_batches(split: Split, seq_len: int, batch_size: int, max_batches: int) -> list[tuple[torch.Tensor, ...]]:
    """``val_sequences`` cut into (inputs_BT, targets_BT) batches; the same list every call."""
    seqs_NT1, _ = val_sequences(split, seq_len, batch_size * max_batches)
    return [(t[:, :-1], t[:, 1:]) for t in seqs_NT1.split(batch_size)]
