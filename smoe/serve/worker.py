"""The engine's thread, and what the server counts for /metrics.

``Worker`` runs a ``smoe.generation.Engine`` in one thread (torch releases the GIL inside its kernels, so the event
loop keeps answering HTTP meanwhile). The event loop ``submit``s jobs to a bounded queue and ``cancel``s them (a
client gone, a stop string met); each job's tokens come back through its asyncio queue. Between engine steps the
thread frees cancelled requests' rows, admits waiting requests to free rows, then runs prefill chunks of the
newcomers (oldest first, up to the engine's ``prefill_chunk`` prompt tokens in all, or until one is decoding) and
one decode step for every request past its prefill: newcomers hold up the running streams by one chunk's worth of
tokens, never by a whole long prompt.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from smoe.generation import Engine, Request
from smoe.serve.schema import APIError

log = logging.getLogger("smoe.serve")
RATE_WINDOW = 10.0  # seconds over which the tokens/s gauge is measured


# The last event of a job cancelled because its client left, and of one the stopping server aborts.
CANCELLED, SHUT_DOWN = "cancelled", "shut down"


@dataclass(eq=False)
class Job:
    """One request between the event loop and the engine thread. ``events`` receives (token, finish_reason,
    TokenLogprob or None) per new token (a prompt scored with no new token: one (None, "length", None)); then None
    if the engine failed, or CANCELLED / SHUT_DOWN if it was stopped."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def post(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening any more
            pass


class Worker:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.rows = len(engine.slots)
        self._wake = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._cancelled: list[Job] = []
        self._jobs: dict[Request, Job] = {}  # admitted to the engine
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="smoe-engine", daemon=True)
        self.prompt_tokens = self.generated_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for the rate

    def start(self) -> None:
        self._thread.start()

    def abort(self) -> None:
        """Refuse new requests (503) and end every waiting or running one with SHUT_DOWN (the drain is over)."""
        with self._wake:
            self._stopping = True
            jobs = [*self._waiting, *self._jobs.values()]
            self._cancelled.extend(jobs)
            self._waiting.clear()
            self._wake.notify()
        for job in jobs:
            job.post(SHUT_DOWN)

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left (in-flight requests had the shutdown timeout to finish) and end the thread."""
        self.abort()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stopping:
                raise APIError(503, "the server is shutting down")
            if len(self._waiting) + len(self._jobs) >= self.rows + self.max_queue:
                raise APIError(429, f"all {self.rows} rows are busy and {self.max_queue} requests already wait; "
                                    f"retry later", headers={"Retry-After": "1"})
            self._waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Stop ``job`` if it still waits or runs (its row is freed before the next step), and tell whoever still
        listens to it; else nothing."""
        with self._wake:
            if job in self._waiting:
                self._waiting.remove(job)
            elif self._jobs.get(job.request) is job:
                self._cancelled.append(job)
                self._wake.notify()
            else:
                return
        job.post(CANCELLED)

    def gauges(self) -> dict[str, float]:
        with self._wake:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()
            running = len(self._jobs)
            return {"queue_depth": len(self._waiting), "running_requests": running, "batch_rows": self.rows,
                    "batch_occupancy": running / self.rows,
                    "generation_tokens_per_second": sum(n for _, n in self._recent) / RATE_WINDOW,
                    "prompt_tokens_total": self.prompt_tokens, "generation_tokens_total": self.generated_tokens}

    def expert_tokens(self) -> dict[int, list[int]]:
        """Tokens routed to each expert of each MoE layer so far (the engine replaces, never mutates, its sums)."""
        return {layer: load.tolist() for layer, load in sorted(list(self.engine.expert_tokens.items()))}

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    self._schedule()
                    if not self.engine.running:
                        if self._stopping:
                            return
                        self._wake.wait()
                        continue
                try:
                    # Prefill chunks up to one chunk's worth of prompt tokens per step: short prompts join several
                    # at a time, and the running streams wait one chunk at most; with none decoding, nobody waits.
                    budget = self.engine.prefill_chunk
                    while 0 < self.engine.next_chunk and (self.engine.next_chunk <= budget or not self._decoding()):
                        budget -= self.engine.next_chunk
                        self._deliver(self.engine.prefill())
                    self._deliver(self.engine.decode())
                except Exception:  # a bug or out of memory: fail the running requests, keep serving
                    log.exception("engine step failed; its requests are aborted")
                    with self._wake:
                        for job in list(self._jobs.values()):
                            self._finish(job)
                            job.post(None)

    def _decoding(self) -> bool:
        return any(r.prefilled == len(r.prompt) for r in self.engine.running)

    def _schedule(self) -> None:
        """Under the lock: free cancelled requests' rows, then fill free rows from the queue."""
        for job in self._cancelled:
            self.engine.cancel(job.request)
            self._jobs.pop(job.request, None)
        self._cancelled.clear()
        while self._waiting and self.engine.free_rows and not self._stopping:
            job = self._waiting.popleft()
            try:
                self.engine.add(job.request)
            except ValueError:  # the app checks requests against the same rules first: a bug if it happens
                log.exception("request refused by the engine")
                job.post(None)
                continue
            self._jobs[job.request] = job

    def _deliver(self, advanced: list[Request]) -> None:
        """Post each request's newest token to its job."""
        if not advanced:
            return
        with self._wake:
            new = sum(1 for r in advanced if r.tokens)
            self._recent.append((time.monotonic(), new))
            self.generated_tokens += new
            for request in advanced:
                job = self._jobs.get(request)
                if job is None:  # cancelled meanwhile
                    continue
                if request.finish_reason == "error":  # this row alone failed
                    log.error("request failed: %s", request.error)
                    self._finish(job)
                    job.post(None)
                    continue
                if len(request.tokens) <= 1:  # its prefill just ended
                    self.prompt_tokens += len(request.prompt)
                if request.tokens:
                    logprob = request.token_logprobs[-1] if request.logprobs is not None else None
                    job.post((request.tokens[-1], request.finish_reason, logprob))
                else:
                    job.post((None, request.finish_reason, None))
                if request.done:
                    self._finish(job)

    def _finish(self, job: Job) -> None:
        self.engine.cancel(job.request)  # frees the row; a finished request keeps its finish_reason
        self._jobs.pop(job.request, None)
