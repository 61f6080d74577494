"""The request bodies ``smoe serve`` accepts and the OpenAI error object it answers with.

A body is checked before anything is tokenised: JSON at all, an object, known keys only, each value of its JSON
type, finite numbers, one prompt (``n`` = 1), and prompts, messages and stop strings within bounds that follow from
the context. Every failure is one ``APIError`` whose message names the field (``param``) and the rule it broke.
Fields OpenAI defines but smoe does not implement (penalties, ``suffix``, ...) are accepted only at the value that
means "off", so a client that always sends them keeps working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from smoe.config.rules import matches, type_name
from smoe.io.files import parse_json

# A text prompt (or the messages of a chat) longer than this many characters per token of context is refused before
# it is tokenised: ordinary text averages 3-5 characters per token, and a longer one could not fit anyway.
CHARS_PER_TOKEN = 16
MAX_MESSAGES = 1024
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's limit on stop strings; their length keeps the tail search cheap
MAX_LOGPROBS = 20  # alternatives per token: OpenAI's chat limit (its completions stop at 5), and vLLM's default

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
                408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                429: "rate_limit_error", 499: "cancelled", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, rule: str, code: str | None = None) -> APIError:
    """A 400 naming ``param`` and the rule it broke."""
    return APIError(400, f"{param}: {rule}", param, code)


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions or /v1/chat/completions body: exactly one of ``prompt`` (text or token ids) and
    ``messages``."""

    model: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: int | None = None  # each token's log-probability and this many alternatives; None: none
    echo: bool = False  # /v1/completions: the prompt comes back before the completion (with logprobs: scored)


# The keys each endpoint reads, with the JSON types they take (null means "the default").
_COMMON = {"model": str, "max_tokens": int | None, "temperature": float | None, "top_p": float | None,
           "top_k": int | None, "seed": int | None, "stop": str | list[str] | None, "n": int | None,
           "stream": bool | None, "stream_options": dict | None, "user": str | None,
           "presence_penalty": float | None, "frequency_penalty": float | None, "logit_bias": dict | None}
_KEYS = {
    "completions": {**_COMMON, "prompt": str | list[int] | list[str] | list[list[int]], "echo": bool | None,
                    "suffix": str | None, "best_of": int | None, "logprobs": int | None},
    "chat": {**_COMMON, "messages": list[dict], "max_completion_tokens": int | None, "logprobs": bool | None,
             "top_logprobs": int | None},
}
# Known fields smoe does not implement, and the values that mean "off" (0 == False == 0.0 in Python).
_OFF = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
        "best_of": (1,), "n": (1,)}
_ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_request(body: bytes, endpoint: str, context: int) -> CompletionRequest:
    """``body`` of ``endpoint`` ("completions" or "chat") checked against the schema; ``context`` is the tokens a
    request may hold (prompt + new tokens), which bounds the prompt before it is tokenised."""
    try:
        fields = parse_json(body, "request body")
    except ValueError as err:
        raise APIError(400, str(err)) from None
    keys = _KEYS[endpoint]
    for key, value in fields.items():
        if not _unicode(key) or not _unicode(value):
            raise bad(key if _unicode(key) else "request body", "holds a lone surrogate (such as \\ud800): not "
                                                                "Unicode text")
        if key not in keys:
            raise bad(key[:64], f"unknown field for /v1/{endpoint.replace('chat', 'chat/completions')}")
        if not matches(value, keys[key]):
            raise bad(key, f"must be {type_name(keys[key])}, got {_kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(key, f"must be a finite number, got {value}")
        if key in _OFF and value is not None and value not in _OFF[key]:
            rule = "only 1 is supported" if key in ("n", "best_of") else f"not supported (only {_OFF[key][0]!r})"
            raise bad(key, rule)
    main = "messages" if endpoint == "chat" else "prompt"
    for key in ("model", main):
        if key not in fields:
            raise bad(key, "required")
    max_tokens = _or(fields.get("max_completion_tokens"), fields.get("max_tokens"))
    request = CompletionRequest(
        model=fields["model"], max_tokens=max_tokens, stream=bool(fields.get("stream")),
        temperature=_or(fields.get("temperature"), 1.0), top_p=_or(fields.get("top_p"), 1.0),
        top_k=fields.get("top_k"), seed=fields.get("seed"), stop=_stops(fields.get("stop")),
        include_usage=_include_usage(fields.get("stream_options")), echo=bool(fields.get("echo")),
        logprobs=_logprobs(fields, endpoint),
        prompt=_prompt(fields["prompt"], context) if main == "prompt" else None,
        messages=_messages(fields["messages"], context) if main == "messages" else None,
    )
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise bad("seed", f"must lie in [0, 2**63), got {request.seed}")
    return request


def _logprobs(fields: dict, endpoint: str) -> int | None:
    """Alternatives per token, or None for no log-probabilities: completions' ``logprobs`` is the count; chat's
    ``logprobs`` is a switch and ``top_logprobs`` the count."""
    if endpoint == "chat":
        top = fields.get("top_logprobs")
        if top and not fields.get("logprobs"):
            raise bad("top_logprobs", "needs logprobs: true")
        count = (top or 0) if fields.get("logprobs") else None
        param = "top_logprobs"
    else:
        count, param = fields.get("logprobs"), "logprobs"
    if count is not None and not 0 <= count <= MAX_LOGPROBS:
        raise bad(param, f"must lie in [0, {MAX_LOGPROBS}], got {count}")
    return count


def _unicode(value) -> bool:
    """Whether every string in ``value`` is Unicode text: JSON's \\ud800 escapes decode to lone surrogates, which
    no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_unicode(k) and _unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_unicode(v) for v in value)
    return True


def _or(value, default):
    return default if value is None else value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _prompt(prompt, context: int) -> str | list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad("prompt", f"one prompt per request (n = 1), got {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, str) and len(prompt) > CHARS_PER_TOKEN * context:
        raise bad("prompt", f"{len(prompt)} characters cannot fit the context of {context} tokens")
    if isinstance(prompt, list) and len(prompt) > context:
        raise bad("prompt", f"{len(prompt)} tokens exceed the context of {context} tokens", "context_length_exceeded")
    return prompt


def _messages(messages: list[dict], context: int) -> list[dict]:
    if not messages or len(messages) > MAX_MESSAGES:
        raise bad("messages", f"must hold 1 to {MAX_MESSAGES} messages, got {len(messages)}")
    checked, chars = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.keys() - {"role", "content", "name"}:
            raise bad(where, f"unknown field {sorted(message.keys() - {'role', 'content', 'name'})[0]!r}")
        if message.get("role") not in _ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(_ROLES)}, got {message.get('role')!r}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{where}.content", "parts must be {\"type\": \"text\", \"text\": ...}; only text is "
                                              "supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, (str, type(None))):
            raise bad(f"{where}.content", f"must be a string, text parts or null, got {_kind(content)}")
        if not isinstance(message.get("name", ""), str):
            raise bad(f"{where}.name", "must be a string")
        chars += len(content or "")
        checked.append({**message, "content": content or ""})
    if chars > CHARS_PER_TOKEN * context:
        raise bad("messages", f"{chars} characters cannot fit the context of {context} tokens")
    return checked


def _stops(stop) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOPS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise bad("stop", f"at most {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters")
    return stops


def _include_usage(options: dict | None) -> bool:
    options = options or {}
    if options.keys() - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise bad("stream_options", "only {\"include_usage\": true|false} is supported")
    return options.get("include_usage", False)
