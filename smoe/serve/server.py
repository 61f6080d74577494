"""``smoe serve``: load a model, warm it up, listen, and run the app under uvicorn until SIGTERM or Ctrl-C.

The port is bound before the model loads (a taken port fails fast) but listened on only once the engine has run one
step (the C++ kernels built or loaded, a compiled step compiled): until then connections are refused, and once
``/health`` answers, a request is served at once. Accepted connections get TCP_NODELAY (asyncio sets it only on
sockets made with ``IPPROTO_TCP``; without it each response of a keep-alive connection waits ~40 ms for Nagle's
algorithm and delayed ACKs).

On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish for ``shutdown_timeout``
seconds (a drain); then the worker aborts what is left, each request answered 503 (a stream: an error event), the
engine thread stops and the process exits with 0.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Callable

from smoe.offload.budget import OffloadConfig
from smoe.serve.config import ServeConfig

# Seconds uvicorn waits past the drain for the aborted requests' handlers to answer, before it cancels them.
ABORT_GRACE = 5.0


def serve(path: str, config: ServeConfig, log: Callable[[str], None] = print, offload: OffloadConfig | None = None
          ) -> None:
    """Serve the model at ``path`` (a Hugging Face directory, a smoe checkpoint or a run directory); ``offload``:
    how its routed experts are kept (smoe.offload: on disk behind a budget)."""
    config.validate()
    if offload is not None:
        offload.validate()
    config.resolved_api_key()  # $SMOE_API_KEY checked before the model loads
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise ValueError("serve: needs the serve extra (pip install 'smoe[serve]': starlette, uvicorn, jinja2)") \
            from None
    from smoe.serve.app import create_app

    sock = _bind(config.host, config.port)  # before the model loads: a taken port fails fast
    state = load_state(path, config, offload)
    state.worker.engine.warm_up()
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    log(f"smoe serve: {state.model_id} ({config.max_batch} rows of {state.context} tokens) on "
        f"http://{_url_host(host)}:{port}" + (" (API key required)" if state.api_key else ""))
    server = _draining_server()(uvicorn.Config(
        create_app(state), log_level="warning", lifespan="on", http=_protocol(config.read_timeout),
        timeout_graceful_shutdown=config.shutdown_timeout + ABORT_GRACE), state.worker, config.shutdown_timeout)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: make that one return, so
    # a drained server exits with 0 rather than as killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run(sockets=[sock])


def load_state(path: str, config: ServeConfig, offload: OffloadConfig | None = None):
    """Everything the app serves from: the model, its tokenizer and chat template, the engine and its thread."""
    from smoe.device import resolve_device
    from smoe.generation import Engine, default_stop_tokens
    from smoe.interop.hf import DTYPES, load_pretrained
    from smoe.io.checkpoint import model_directory
    from smoe.io.tokenizer import TOKENIZER_FILE, find_tokenizer
    from smoe.models import quantize
    from smoe.serve.app import ServerState, allowed_hosts
    from smoe.serve.chat import load_chat_template
    from smoe.serve.worker import Worker

    directory = model_directory(path)
    tokenizer = find_tokenizer(directory)
    if tokenizer is None:
        raise ValueError(f"{Path(directory) / TOKENIZER_FILE}: not found; smoe serve needs the model's tokenizer")
    chat = load_chat_template(directory)
    model = load_pretrained(directory, dtype=DTYPES.get(config.dtype), device=resolve_device(config.device),
                            offload=offload)
    if config.quantize is not None:
        quantize(model, config.quantize, config.group_size)
    context = config.max_seq_len or model.config.max_seq_len
    if context > model.config.max_seq_len:
        raise ValueError(f"max_seq_len: {context} exceeds the model's max_seq_len ({model.config.max_seq_len})")
    independent = not config.dependent_rows
    if config.compile and independent and not all(layer.experts.rows_independent(model.embed.weight.device)
                                                   for layer in model.moe_layers):
        raise ValueError("compile: a compiled step keeps a request's tokens independent of its neighbours only "
                         "with experts whose kernels compute each row alone (`quantize` int8 or int4, on the C++ "
                         "kernels); with these, pass `dependent_rows` too, or decode eagerly")
    engine = Engine(model, config.max_batch, context, prefill_chunk=config.prefill_chunk, count_experts=True,
                    independent_rows=independent, compile=config.compile)
    return ServerState(model_id=path, tokenizer=tokenizer, chat=chat, worker=Worker(engine, config.max_queue),
                       context=context, stop_tokens=frozenset(default_stop_tokens(directory, tokenizer)),
                       api_key=config.resolved_api_key(), read_timeout=config.read_timeout,
                       allowed_hosts=allowed_hosts(config.host, config.allowed_hosts))


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port``, not yet listening."""
    try:
        family, kind, proto, _, _ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       proto=socket.IPPROTO_TCP)[0]
        sock = socket.socket(family, kind, proto)  # IPPROTO_TCP, not 0: asyncio then sets TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise ValueError(f"host {host}, port {port}: cannot listen there ({err.strerror or err})") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _protocol(read_timeout: float):
    """uvicorn's h11 protocol with a deadline on each request's headers: from the connection, or from the previous
    response on a kept-alive one, a client has ``read_timeout`` seconds to send them, else the connection is
    closed (uvicorn bounds only the idle time between requests, not a request sent a byte at a time)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _headers_due: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._headers_due is not None and self.conn.their_state is not h11.IDLE:  # they arrived
                self._headers_due.cancel()
                self._headers_due = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:
                self._await_headers()

        def connection_lost(self, exc) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
            self._headers_due = self.loop.call_later(read_timeout, self._headers_late)

        def _headers_late(self) -> None:
            self._headers_due = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def _draining_server():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, whose drain ends with the worker aborting what is left (each request then answers
        503) rather than with uvicorn cancelling the handlers (which answers 500)."""

        def __init__(self, config, worker, drain: float):
            super().__init__(config)
            self.worker, self.drain = worker, drain

        async def shutdown(self, sockets=None) -> None:
            abort = asyncio.get_running_loop().call_later(self.drain, self.worker.abort)
            try:
                await super().shutdown(sockets)
            finally:
                abort.cancel()

    return DrainingServer
