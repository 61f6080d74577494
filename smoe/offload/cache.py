"""The expert cache: ``slots`` experts' worth of memory, allocated once as one slab per expert tensor and shared by
every MoE layer, which experts hold which slot, and the reads that fill them.

A layer's call ``reserve``s the experts it routes to: a resident one is a hit; one still being read (prefetched) is
waited for; any other is a miss, read into the slot of the expert the policy gives up. Reserved slots are held until
``release``: nothing evicts them while the layer computes. Reads run on ``io_threads`` background threads
(``pread`` releases the GIL), so the next layer's guessed experts (``prefetch``) load while this one computes; all
bookkeeping happens on the calling thread, under one lock.

Policies (which resident, unheld, unpinned expert a read replaces), each a priority, lowest evicted first:
``lru`` the last use; ``lfu`` the uses since it was read, then the last use; ``load`` the tokens routed to it since
the cache began (kept across evictions: an activation-aware estimate of its popularity, as MoE-Infinity keeps),
each weighing half as much as one routed ``LOAD_HALF_LIFE_SLOTS * S`` tokens later (so a workload that changes kind
is followed), then the last use. A prefetched expert counts as used when read, so a guess is not evicted before its
layer runs.
Pinned experts are read when the cache starts and never evicted.

Legend: S slots.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

import torch

from smoe.offload.budget import CachePolicy, format_size
from smoe.offload.store import ExpertFiles, Key

# `load`'s counts decay with a half-life of this many slots' worth of routed tokens: chosen on trained routers'
# replays (docs/benchmarks.md), where 64 kept the stationary hit rates of counts that never decay and recovered
# their loss when the text changed kind (16 did as well).
LOAD_HALF_LIFE_SLOTS = 64


@dataclass
class CacheStats:
    """Counters since the cache began (or ``reset``). A *need* is one expert one layer call routes to."""

    hits: int = 0  # needs resident when asked for
    late_hits: int = 0  # needs being read (prefetched) when asked for: waited for, not read again
    misses: int = 0  # needs read on demand
    reads: int = 0  # experts read (on demand or prefetched)
    bytes_read: int = 0
    read_seconds: float = 0.0  # summed over the reading threads
    wait_seconds: float = 0.0  # the computing thread waiting for reads
    evictions: int = 0
    prefetched: int = 0  # reads started by a look-ahead guess
    prefetch_used: int = 0  # of those, needed before being evicted
    lookahead_guessed: int = 0  # experts guessed for the next layer
    lookahead_needed: int = 0  # experts that layer then routed to (where a guess was made)
    lookahead_right: int = 0  # guessed and routed to
    tokens: int = 0  # tokens the model computed (counted at the first MoE layer: ``count_token``)

    @property
    def needs(self) -> int:
        return self.hits + self.late_hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Needs not read on demand (resident or already being read) / needs."""
        return (self.hits + self.late_hits) / self.needs if self.needs else float("nan")

    @property
    def lookahead_recall(self) -> float:
        """The share of a layer's experts the previous layer's look-ahead guessed."""
        return self.lookahead_right / self.lookahead_needed if self.lookahead_needed else float("nan")

    @property
    def lookahead_precision(self) -> float:
        return self.lookahead_right / self.lookahead_guessed if self.lookahead_guessed else float("nan")

    @property
    def read_bandwidth(self) -> float:
        """Bytes per second of one reading thread while it reads."""
        return self.bytes_read / self.read_seconds if self.read_seconds else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "lookahead_recall": self.lookahead_recall,
                "lookahead_precision": self.lookahead_precision}

    def summary(self) -> str:
        per_token = f", {format_size(self.bytes_read / self.tokens)} a token" if self.tokens else ""
        lookahead = (f"; look-ahead guessed {self.lookahead_recall:.0%} of the next layer's experts "
                     f"({self.lookahead_precision:.0%} of its guesses right)" if self.lookahead_needed else "")
        return (f"expert cache: hit rate {self.hit_rate:.1%} ({self.hits} resident, {self.late_hits} being read, "
                f"{self.misses} read on demand); {format_size(self.bytes_read)} read{per_token}, waited "
                f"{self.wait_seconds:.2f} s{lookahead}")


class _Priorities:
    """The resident experts ordered by the policy's priority (lowest first), in a heap whose stale entries are
    skipped: each use pushes a new entry instead of moving the old one."""

    def __init__(self, policy: CachePolicy, half_life: float | None = None):
        self.policy = policy
        self.clock = itertools.count(1)
        self.last: dict[Key, int] = {}
        self.uses: dict[Key, int] = {}
        self.load: dict[Key, float] = {}  # load policy: tokens routed so far, resident or not, weighted as below
        # A token routed now weighs 2 ** (routed tokens so far / half_life) (None: 1), so that each weighs half as
        # much as one routed half_life tokens later: the counts decay without touching them.
        self.half_life, self.weight = half_life, 1.0
        self.heap: list[tuple[tuple[float, ...], Key]] = []
        self.current: dict[Key, tuple[float, ...]] = {}  # the live entry of each resident key

    def _priority(self, key: Key) -> tuple[float, ...]:
        if self.policy == "lru":
            return (self.last[key],)
        if self.policy == "lfu":
            return self.uses[key], self.last[key]
        return self.load.get(key, 0.0), self.last[key]

    def _push(self, key: Key) -> None:
        priority = self._priority(key)
        self.current[key] = priority
        heapq.heappush(self.heap, (priority, key))
        if len(self.heap) > 4 * len(self.current) + 64:  # drop the stale entries now and then
            self.heap = [(p, k) for k, p in self.current.items()]
            heapq.heapify(self.heap)

    def route(self, key: Key, tokens: int) -> None:
        if self.policy != "load":  # the other policies order by uses, which ``used`` counts
            return
        self.load[key] = self.load.get(key, 0.0) + tokens * self.weight
        if key in self.current:
            self._push(key)
        if self.half_life:
            self.weight *= 2.0 ** (tokens / self.half_life)
            if self.weight > 2.0**64:  # rescale every count alike: the order, and so the heap's, is unchanged
                scale, self.weight = 1 / self.weight, 1.0
                self.load = {k: v * scale for k, v in self.load.items()}
                self.current = {k: (p[0] * scale, *p[1:]) for k, p in self.current.items()}
                self.heap = [(p, k) for k, p in self.current.items()]
                heapq.heapify(self.heap)

    def used(self, key: Key) -> None:
        """A resident (or just read) expert used now."""
        self.last[key] = next(self.clock)
        self.uses[key] = self.uses.get(key, 0) + 1
        self._push(key)

    def loaded(self, key: Key) -> None:
        self.uses[key] = 0
        self.used(key)

    def evicted(self, key: Key) -> None:
        self.current.pop(key, None)
        self.uses.pop(key, None)

    def lowest(self, evictable) -> Key | None:
        """The lowest-priority resident key ``evictable(key)`` allows, or None."""
        skipped = []
        found = None
        while self.heap:
            priority, key = heapq.heappop(self.heap)
            if self.current.get(key) != priority:
                continue  # stale
            if evictable(key):
                found = key
                del self.current[key]
                break
            skipped.append((priority, key))
        for entry in skipped:
            heapq.heappush(self.heap, entry)
        return found


class ExpertCache:
    """``slots`` experts of the tensors ``spec`` describes (name -> (shape of one expert, dtype)), filled from
    ``files``."""

    def __init__(self, files: ExpertFiles, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], slots: int,
                 policy: CachePolicy = "load", io_threads: int = 2, drop_page_cache: bool = False,
                 load_half_life: float | None = LOAD_HALF_LIFE_SLOTS):
        self.files, self.n_slots, self.drop_page_cache = files, slots, drop_page_cache
        if drop_page_cache:
            files.advise_random()
        self.slab = {name: torch.empty((slots, *shape), dtype=dtype) for name, (shape, dtype) in spec.items()}
        self.expert_bytes = sum(t[0].numel() * t.element_size() for t in self.slab.values())
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * slots
        self.held = [0] * slots
        self.pinned: set[int] = set()
        self.loading: dict[int, Future] = {}  # slot -> its read
        self.unused_prefetch: set[Key] = set()
        self.free = list(reversed(range(slots)))
        # load_half_life: in slots' worth of routed tokens; None: counts never decay.
        self.priorities = _Priorities(policy, None if load_half_life is None else load_half_life * slots)
        self.guesses: dict[int, set[int]] = {}  # layer -> experts the previous layer's look-ahead guessed
        self.stats = CacheStats()
        self.lock = threading.RLock()
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="smoe-expert-read")

    def slot(self, s: int) -> dict[str, torch.Tensor]:
        return {name: t[s] for name, t in self.slab.items()}

    # --- reads -----------------------------------------------------------------------------------------------------

    def _read(self, key: Key, s: int) -> tuple[int, float]:
        start = time.perf_counter()
        n = self.files.read(key, self.slot(s), self.drop_page_cache)
        return n, time.perf_counter() - start

    def _start(self, key: Key, s: int) -> None:
        self.slot_of[key], self.key_of[s] = s, key
        self.loading[s] = self.pool.submit(self._read, key, s)
        self.priorities.loaded(key)

    def _settle(self, s: int) -> BaseException | None:
        """Account for slot ``s``'s finished read. A failed read frees the slot (its holds stay for their
        ``release``) and is returned."""
        future = self.loading.pop(s)
        error = future.exception()
        if error is not None:
            self._forget(s)
            self.free.append(s)
            return error
        n, seconds = future.result()
        self.stats.reads += 1
        self.stats.bytes_read += n
        self.stats.read_seconds += seconds
        return None

    def _reap(self) -> None:
        """Settle the reads that finished; a failed prefetch is forgotten (a need reads it again, and raises)."""
        for s in [s for s, f in self.loading.items() if f.done()]:
            self._settle(s)

    def _forget(self, s: int) -> None:
        key = self.key_of[s]
        if key is not None:
            del self.slot_of[key]
            self.priorities.evicted(key)
            if key in self.unused_prefetch:
                self.unused_prefetch.discard(key)
        self.key_of[s] = None

    def _victim(self, block: bool) -> int | None:
        """A slot for a new read: a free one, else the lowest-priority evictable expert's (evicted). ``block``:
        wait for reads in flight when nothing else can be evicted; else None."""
        while True:
            if self.free:
                return self.free.pop()
            key = self.priorities.lowest(lambda k: self._evictable(self.slot_of[k]))
            if key is not None:
                s = self.slot_of[key]
                self._forget(s)
                self.stats.evictions += 1
                return s
            waiting = [f for s, f in self.loading.items() if not self.held[s]]
            if not block or not waiting:
                return None
            wait(waiting, return_when=FIRST_COMPLETED)
            self._reap()

    def _evictable(self, s: int) -> bool:
        return not self.held[s] and s not in self.pinned and s not in self.loading

    # --- what a layer call uses -------------------------------------------------------------------------------------

    def capacity(self, layer: int, experts: list[int]) -> int:
        """Experts of ``experts`` beyond the pinned ones that fit at once: the slots less the pinned others."""
        pinned_here = sum(1 for e in experts if self.slot_of.get((layer, e)) in self.pinned)
        return self.n_slots - len(self.pinned) + pinned_here

    def reserve(self, layer: int, experts: list[int], tokens: list[int]) -> list[int]:
        """Hold a slot for each of ``experts`` (``tokens`` routed to each), starting the reads of those not
        resident; returns their slots, in order. ``wait`` for them before computing, ``release`` after."""
        with self.lock:
            self._reap()
            self._score_lookahead(layer, experts)
            slots: list[int | None] = []
            for e, n in zip(experts, tokens, strict=True):
                key = (layer, e)
                self.priorities.route(key, n)
                s = self.slot_of.get(key)
                if s is not None:
                    self.held[s] += 1
                    if s in self.loading:
                        self.stats.late_hits += 1
                    else:
                        self.stats.hits += 1
                    self.priorities.used(key)
                    if key in self.unused_prefetch:
                        self.unused_prefetch.discard(key)
                        self.stats.prefetch_used += 1
                slots.append(s)
            for i, (e, s) in enumerate(zip(experts, slots, strict=True)):
                if s is None:
                    s = self._victim(block=True)
                    if s is None:  # OffloadedExperts splits a call into waves that fit: a bug if reached
                        raise RuntimeError(f"expert cache: no slot free for expert {e} of layer {layer}")
                    self._start((layer, e), s)
                    self.held[s] += 1
                    self.stats.misses += 1
                    slots[i] = s
            return slots

    def wait(self, slots: list[int]) -> None:
        """Block until the reads into ``slots`` are done; raises if one failed (its slots stay held: release
        them)."""
        pending = [self.loading[s] for s in slots if s in self.loading]
        if pending:
            start = time.perf_counter()
            wait(pending)
            self.stats.wait_seconds += time.perf_counter() - start
        with self.lock:
            for s in slots:
                key = self.key_of[s]
                if s in self.loading and (error := self._settle(s)) is not None:
                    raise OSError(f"expert cache: reading expert {key[1]} of layer {key[0]} failed: {error}") \
                        from error

    def release(self, slots: list[int]) -> None:
        with self.lock:
            for s in slots:
                self.held[s] -= 1

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading those of ``experts`` (most likely first) that are not resident, into slots nothing holds;
        stops when none is left. Remembers the guess to score it when ``layer`` runs."""
        with self.lock:
            self.guesses[layer] = set(experts)
            for e in experts:
                key = (layer, e)
                if key in self.slot_of:
                    continue
                s = self._victim(block=False)
                if s is None:
                    return
                self._start(key, s)
                self.unused_prefetch.add(key)
                self.stats.prefetched += 1

    def _score_lookahead(self, layer: int, experts: list[int]) -> None:
        guess = self.guesses.pop(layer, None)
        if guess is not None:
            self.stats.lookahead_guessed += len(guess)
            self.stats.lookahead_needed += len(experts)
            self.stats.lookahead_right += len(guess.intersection(experts))

    def pin(self, keys: list[Key]) -> None:
        """Read ``keys`` now and keep them resident for good."""
        with self.lock:
            slots = []
            for key in keys:
                if key in self.slot_of:
                    continue
                s = self._victim(block=True)
                self._start(key, s)
                slots.append(s)
            self.wait(slots)
            self.pinned.update(self.slot_of[key] for key in keys)

    def resident(self) -> set[Key]:
        """The experts held in slots whose reads are done."""
        with self.lock:
            return {k for k, s in self.slot_of.items() if s not in self.loading}

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.files.close()

    def __repr__(self) -> str:
        return (f"ExpertCache({len(self.slot_of)}/{self.n_slots} slots of {format_size(self.expert_bytes)}, "
                f"{self.priorities.policy})")
