"""The HTTP endpoints, on Starlette: OpenAI's POST /v1/completions and /v1/chat/completions (``stream: true`` as
server-sent events), GET /v1/models, /health and /metrics.

A request goes: its Host checked when the server is bound to loopback (403: a web page cannot reach it under its own
name), its key (401), its content type (415 unless application/json: a cross-origin page cannot send that without
asking first), its body read up to a bound (413 past it) and a deadline (408), checked against the schema (400),
tokenised, checked against the context (400), queued for the engine (429 when the queue is full), then answered
from its tokens as they come. Every error is OpenAI's error object. A client that disconnects, or a stop string
met, cancels the request, which frees its row before the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from smoe.generation import Request, TextStream, TokenLogprob, check_sampling
from smoe.serve import metrics
from smoe.serve.chat import ChatTemplate
from smoe.serve.schema import CHARS_PER_TOKEN, APIError, CompletionRequest, bad, parse_request
from smoe.serve.worker import CANCELLED, SHUT_DOWN, Job, Worker

log = logging.getLogger("smoe.serve")
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
DEFAULT_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's; a chat may run to the end of the context


@dataclass
class ServerState:
    model_id: str
    tokenizer: object  # tokenizers.Tokenizer
    chat: ChatTemplate | None
    worker: Worker
    context: int  # tokens one request may hold: prompt + new tokens
    stop_tokens: frozenset[int]
    api_key: str | None = None
    allowed_hosts: frozenset[str] | None = None  # Host header values answered (no port); None: any
    read_timeout: float = 30.0  # seconds to send a request's body
    created: int = field(default_factory=lambda: int(time.time()))
    requests: Counter = field(default_factory=Counter)  # responses by (endpoint, status code)

    @property
    def max_body(self) -> int:
        """Bytes a request body may have: the longest prompt the schema admits, every character JSON-escaped
        (6 bytes), plus 64 KiB for the rest."""
        return 6 * CHARS_PER_TOKEN * self.context + 2**16


def create_app(state: ServerState) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    async def completions(request: HTTPRequest):
        return await _complete(state, request, "completions")

    async def chat(request: HTTPRequest):
        return await _complete(state, request, "chat")

    async def models(request: HTTPRequest):
        model = {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "smoe",
                 "max_model_len": state.context}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(request: HTTPRequest):
        return JSONResponse({"status": "ok"})

    async def metrics_text(request: HTTPRequest):
        return PlainTextResponse(metrics.render(state.worker, state.requests), media_type="text/plain; version=0.0.4")

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models),
              Route("/health", health), Route("/metrics", metrics_text)]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    return _Guard(app, state)


class _Guard:
    """ASGI middleware: counts every response by endpoint and status, and requires the bearer token (when the
    server has one) everywhere but /health."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values

        async def counted(message):
            if message["type"] == "http.response.start":
                self.state.requests[endpoint, message["status"]] += 1
            await send(message)

        if not _host_allowed(scope["headers"], self.state.allowed_hosts):
            error = APIError(403, "Host header: not a name this server answers to (it answers its loopback names and "
                                  "allowed_hosts)", code="host_not_allowed")
            return await JSONResponse(error.body(), 403)(scope, receive, counted)
        key = self.state.api_key
        if key is not None and scope["path"] != "/health" and not _authorized(scope["headers"], key):
            error = APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key")
            return await JSONResponse(error.body(), 401)(scope, receive, counted)
        await self.app(scope, receive, counted)


def _host_allowed(headers, allowed: frozenset[str] | None) -> bool:
    if allowed is None:
        return True
    for name, value in headers:
        if name == b"host":
            return _host_name(value.decode("latin-1")) in allowed
    return True  # HTTP/1.0 without a Host: no browser sends that


def _host_name(host: str) -> str:
    """The name or address of a Host header value, without its port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def allowed_hosts(bound: str, extra: tuple[str, ...]) -> frozenset[str] | None:
    """The Host values a server bound to ``bound`` answers: with ``extra`` given or on a loopback address, its
    loopback names plus ``extra``; else any (None)."""
    if not extra and not _loopback(bound):
        return None
    return frozenset({"localhost", "127.0.0.1", "::1", _host_name(bound), *(_host_name(h) for h in extra)})


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _authorized(headers, key: str) -> bool:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


async def _complete(state: ServerState, http: HTTPRequest, endpoint: str):
    media_type = http.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"Content-Type: must be application/json, got {media_type[:100]!r}")
    body = await _read_body(http, state.max_body, state.read_timeout)
    request = parse_request(body, endpoint, state.context)
    if request.model != state.model_id:  # the served model's name is a path: GET /v1/models shows it, behind the key
        raise bad("model", f"unknown model {request.model[:200]!r}; GET /v1/models lists the one this server serves",
                  "model_not_found")
    prompt = await asyncio.to_thread(_prompt_ids, state, request)
    job = Job(_engine_request(state, request, prompt), asyncio.get_running_loop())
    state.worker.submit(job)
    reply = Reply(state.tokenizer, request.stop)
    answer = Answer(state.model_id, endpoint, len(prompt), state.tokenizer, request.logprobs is not None)
    if request.echo:
        answer.echo = request.prompt if isinstance(request.prompt, str) else state.tokenizer.decode(prompt)
    if request.stream:
        return StreamingResponse(_stream(state, job, reply, answer, request.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(_cancel_on_disconnect(http, state.worker, job))
    try:
        while reply.finish_reason is None:
            reply.push(*_check(await job.events.get()))
    finally:
        watcher.cancel()
        state.worker.cancel(job)
    return JSONResponse(answer.whole(reply, _prompt_scores(job.request)))


async def _read_body(http: HTTPRequest, limit: int, timeout: float) -> bytes:
    length = http.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise APIError(413, f"request body: larger than the {limit} bytes this server's context admits")
    try:
        return await asyncio.wait_for(_body(http, limit), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"request body: not received within {timeout:g} s") from None
    except ClientDisconnect:  # nginx's "client closed request", as for a request cancelled later
        raise APIError(499, "request cancelled: the client went away while sending its body") from None


async def _body(http: HTTPRequest, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body: larger than the {limit} bytes this server's context admits")
        chunks.append(chunk)
    return b"".join(chunks)


def _prompt_ids(state: ServerState, request: CompletionRequest) -> list[int]:
    """The prompt's token ids, checked against the vocabulary and the context (400 naming the field)."""
    param = "messages" if request.messages is not None else "prompt"
    if request.messages is not None:
        if state.chat is None:
            raise bad("messages", "this model has no chat template (no chat_template in its tokenizer_config.json)"
                                  "; use /v1/completions with a prompt", "no_chat_template")
        ids = state.tokenizer.encode(state.chat.render(request.messages), add_special_tokens=False).ids
    elif isinstance(request.prompt, str):
        ids = state.tokenizer.encode(request.prompt).ids
    else:
        ids = request.prompt
    vocab = state.worker.engine.model.config.vocab_size
    if not ids:
        raise bad(param, "has no token")
    if not all(0 <= t < vocab for t in ids):
        raise bad(param, f"token ids must lie in [0, {vocab})")
    if len(ids) > state.context:
        raise bad(param, f"{len(ids)} tokens exceed the context of {state.context} tokens", "context_length_exceeded")
    return ids


def _engine_request(state: ServerState, request: CompletionRequest, prompt: list[int]) -> Request:
    room = state.context - len(prompt) + 1  # the last new token is never fed back, so it takes no slot
    max_tokens = request.max_tokens
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room) if request.prompt is not None else room
    elif max_tokens > room:
        raise bad("max_tokens", f"a {len(prompt)}-token prompt plus {max_tokens} new tokens exceed the context of "
                                f"{state.context} tokens", "context_length_exceeded")
    if max_tokens == 0 and not request.echo:
        raise bad("max_tokens", "must be >= 1 (0 only with echo: the prompt scored, nothing generated)")
    try:
        check_sampling(max_tokens or 1, request.temperature, request.top_k, request.top_p)  # 0: echo scores
    except ValueError as err:  # named as smoe.generate names them
        field, _, rule = str(err).partition(": ")
        raise bad("max_tokens" if field == "max_new_tokens" else field, rule) from None
    scored = request.echo and (request.logprobs is not None or max_tokens == 0)
    return Request(prompt, max_tokens, request.temperature, request.top_k, request.top_p, request.seed,
                   state.stop_tokens, logprobs=request.logprobs, prompt_logprobs=scored)


def _prompt_scores(request: Request) -> list[tuple[int, TokenLogprob | None]]:
    """The prompt's tokens with their log-probabilities (the first has none) when they were scored, else []."""
    if not request.prompt_logprobs:
        return []
    # not strict: a request cancelled during its prefill has scored only the prompt's first chunks
    return [(request.prompt[0], None), *zip(request.prompt[1:], request.prompt_token_logprobs, strict=False)]


def _check(event):
    if event is None:
        raise APIError(500, "the engine failed while running this request; see the server's log")
    if event == CANCELLED:  # nginx's "client closed request": nobody reads it, but the metrics count it
        raise APIError(499, "request cancelled: the client went away")
    if event == SHUT_DOWN:
        raise APIError(503, "the server is shutting down; the request was aborted")
    return event


async def _cancel_on_disconnect(http: HTTPRequest, worker: Worker, job: Job) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass
    worker.cancel(job)


async def _stream(state: ServerState, job: Job, reply: Reply, answer: Answer, include_usage: bool):
    """Server-sent events: a chunk per text delta, one with the finish reason, the usage if asked, [DONE]. When the
    client goes away, the response task is cancelled and ``finally`` frees the row."""
    try:
        if answer.endpoint == "chat":
            yield _sse(answer.chunk({"role": "assistant", "content": ""}, None))
        first = True
        while reply.finish_reason is None:
            try:
                event = _check(await job.events.get())
            except APIError as err:
                yield _sse(err.body())
                return
            if first and answer.echo is not None:  # the prompt, scored once its prefill is done
                yield _sse(answer.chunk(answer.echo, None, _prompt_scores(job.request)))
            first = False
            delta = reply.push(*event)
            if delta:
                yield _sse(answer.chunk({"content": delta} if answer.endpoint == "chat" else delta, None,
                                        reply.take_scores()))
        yield _sse(answer.chunk({} if answer.endpoint == "chat" else "", reply.finish_reason, reply.take_scores()))
        if include_usage:
            yield _sse({**answer.chunk(None, None), "choices": [], "usage": answer.usage(reply)})
        yield "data: [DONE]\n\n"
    finally:
        state.worker.cancel(job)


def _sse(value: dict) -> str:
    return f"data: {json.dumps(value, ensure_ascii=False)}\n\n"


class Reply:
    """One request's text as its tokens come. A delta never splits a character (``TextStream``) nor shows the
    beginning of a stop string; the text ends before the first stop string met, and a stop token adds no text."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.stream, self.stops = TextStream(tokenizer), stops
        self.text, self.sent = "", 0  # all text so far; how much of it was handed out
        self.tokens = 0
        self.finish_reason: str | None = None
        self.scores: list[tuple[int, TokenLogprob]] = []  # each token with its log-probability, when asked for
        self.scores_sent = 0

    def push(self, token: int | None, finish: str | None, logprob: TokenLogprob | None = None) -> str:
        """The text to send for one more token (``finish``: the engine's finish reason, if this was the last;
        ``token`` None: there was none, a prompt scored with ``max_tokens`` 0)."""
        if token is not None:
            self.tokens += 1
            if logprob is not None:
                self.scores.append((token, logprob))
        if finish != "stop" and token is not None:
            self.text += self.stream.push([token])
        if finish is not None:
            self.text += self.stream.flush()
        hits = [i for stop in self.stops if (i := self.text.find(stop, self.sent)) >= 0]
        if hits:
            self.text, self.finish_reason = self.text[: min(hits)], "stop"
        elif finish is not None:
            self.finish_reason = finish
        end = len(self.text) - (0 if self.finish_reason else self._could_begin_a_stop())
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        return delta

    def take_scores(self) -> list[tuple[int, TokenLogprob]]:
        """The tokens' log-probabilities not yet handed out (a stream's chunk carries those of the tokens behind
        its text)."""
        new, self.scores_sent = self.scores[self.scores_sent :], len(self.scores)
        return new

    def _could_begin_a_stop(self) -> int:
        """Characters at the end of the unsent text that a stop string could begin with."""
        tail = self.text[self.sent :]
        return max((k for stop in self.stops for k in range(min(len(stop) - 1, len(tail)), 0, -1)
                    if tail.endswith(stop[:k])), default=0)


@dataclass
class Answer:
    """The response objects of one request, OpenAI's shapes for either endpoint: with ``echo`` (completions) the
    prompt's text comes first, and with ``logprobs`` each token's log-probability and alternatives."""

    model: str
    endpoint: str
    prompt_tokens: int
    tokenizer: object
    logprobs: bool = False
    echo: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    offset: int = 0  # completions' text_offset of the next token

    def head(self, kind: str) -> dict:
        prefix = "chatcmpl-" if self.endpoint == "chat" else "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, reply: Reply) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": reply.tokens,
                "total_tokens": self.prompt_tokens + reply.tokens}

    def whole(self, reply: Reply, prompt_scores: list) -> dict:
        scores = self.scored([*prompt_scores, *reply.take_scores()])
        if self.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": reply.text}}
            kind = "chat.completion"
        else:
            choice, kind = {"index": 0, "text": (self.echo or "") + reply.text}, "text_completion"
        choice.update(logprobs=scores, finish_reason=reply.finish_reason)
        return {**self.head(kind), "choices": [choice], "usage": self.usage(reply)}

    def chunk(self, delta, finish_reason: str | None, scores: list | None = None) -> dict:
        if self.endpoint == "chat":
            choice, kind = {"index": 0, "delta": delta}, "chat.completion.chunk"
        else:
            choice, kind = {"index": 0, "text": delta}, "text_completion"
        choice.update(logprobs=self.scored(scores or []), finish_reason=finish_reason)
        return {**self.head(kind), "choices": [choice]}

    def scored(self, scores: list[tuple[int, TokenLogprob | None]]) -> dict | None:
        """OpenAI's ``logprobs`` object for these tokens (None when not asked for). Completions: parallel lists of
        the tokens' text, log-probabilities (None for the prompt's first token), alternatives (a dict by text, the
        token's own included) and text offsets (each token's text decoded alone, so a character split across
        tokens shows in both as U+FFFD). Chat: a ``content`` list of {token, logprob, bytes, top_logprobs}."""
        if not self.logprobs:
            return None
        text = [self.tokenizer.decode([token]) for token, _ in scores]
        if self.endpoint == "chat":
            return {"content": [{**_token(t, entry.logprob), "top_logprobs": [
                _token(self.tokenizer.decode([i]), lp) for i, lp in entry.top]}
                for t, (_, entry) in zip(text, scores, strict=True)]}
        offsets = []
        for t in text:
            offsets.append(self.offset)
            self.offset += len(t)
        top = []
        for t, (_, entry) in zip(text, scores, strict=True):
            if entry is None:
                top.append(None)
                continue
            alternatives: dict[str, float] = {}
            for i, lp in entry.top:  # most likely first: a text two tokens share keeps the higher
                alternatives.setdefault(self.tokenizer.decode([i]), lp)
            alternatives.setdefault(t, entry.logprob)
            top.append(alternatives)
        return {"tokens": text, "token_logprobs": [None if e is None else e.logprob for _, e in scores],
                "top_logprobs": top, "text_offset": offsets}


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


async def _api_error(request: HTTPRequest, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), err.status, headers=err.headers)


async def _http_error(request: HTTPRequest, err: HTTPException) -> JSONResponse:
    return JSONResponse(APIError(err.status_code, f"{request.url.path[:200]}: {err.detail}").body(), err.status_code)


async def _server_error(request: HTTPRequest, err: Exception) -> JSONResponse:
    log.exception("request failed", exc_info=err)
    return JSONResponse(APIError(500, "internal error; see the server's log").body(), 500)
