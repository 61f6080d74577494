"""``smoe serve``: load a model, bind, and run the app under uvicorn until SIGTERM or Ctrl-C.

On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish for ``shutdown_timeout``
seconds (a drain), then cancels what is left (each cancelled request frees its row); the engine thread stops and
the process exits with 0.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Callable

from smoe.serve.config import API_KEY_ENV, ServeConfig


def serve(path: str, config: ServeConfig, log: Callable[[str], None] = print) -> None:
    """Serve the model at ``path`` (a Hugging Face directory, a smoe checkpoint or a run directory)."""
    config.validate()
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise ValueError("serve: needs the serve extra (pip install 'smoe[serve]': starlette, uvicorn, jinja2)") \
            from None
    from smoe.serve.app import create_app

    sock = _bind(config.host, config.port)  # before the model loads: a taken port fails fast
    state = load_state(path, config)
    app = create_app(state)
    host, port = sock.getsockname()[:2]
    log(f"smoe serve: {state.model_id} ({config.max_batch} rows of {state.context} tokens) on "
        f"http://{_url_host(host)}:{port}" + (" (API key required)" if state.api_key else ""))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=config.shutdown_timeout,
                                           lifespan="on"))
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: make that one return, so
    # a drained server exits with 0 rather than as killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run(sockets=[sock])


def load_state(path: str, config: ServeConfig):
    """Everything the app serves from: the model, its tokenizer and chat template, the engine and its thread."""
    from smoe.generation import Engine, default_stop_tokens
    from smoe.interop.hf import DTYPES, load_pretrained
    from smoe.io.checkpoint import model_directory
    from smoe.io.tokenizer import TOKENIZER_FILE, find_tokenizer
    from smoe.models import quantize
    from smoe.serve.app import ServerState
    from smoe.serve.chat import load_chat_template
    from smoe.serve.worker import Worker
    from smoe.train.loop import resolve_device

    directory = model_directory(path)
    tokenizer = find_tokenizer(directory)
    if tokenizer is None:
        raise ValueError(f"{Path(directory) / TOKENIZER_FILE}: not found; smoe serve needs the model's tokenizer")
    chat = load_chat_template(directory)
    model = load_pretrained(directory, dtype=DTYPES.get(config.dtype), device=resolve_device(config.device))
    if config.quantize is not None:
        quantize(model, config.quantize, config.group_size)
    context = config.max_seq_len or model.config.max_seq_len
    if context > model.config.max_seq_len:
        raise ValueError(f"max_seq_len: {context} exceeds the model's max_seq_len ({model.config.max_seq_len})")
    engine = Engine(model, config.max_batch, context, count_experts=True)
    return ServerState(model_id=path, tokenizer=tokenizer, chat=chat, worker=Worker(engine, config.max_queue),
                       context=context, stop_tokens=frozenset(default_stop_tokens(directory, tokenizer)),
                       api_key=config.api_key or os.environ.get(API_KEY_ENV) or None)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        raise ValueError(f"host {host}, port {port}: cannot listen there ({err.strerror or err})") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
