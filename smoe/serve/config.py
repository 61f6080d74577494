"""What ``smoe serve`` is asked to do, written once: each field carries its help text and the command line's flags
are generated from it (smoe.cli.flags). No torch import."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Literal

from smoe.config import DEFAULT_INT4_GROUP, INT4_GROUP_SIZES, QuantConfig, QuantScheme
from smoe.config.rules import check_types, fail, non_negative, positive
from smoe.train.config import option

# The environment variable that sets `api_key` when the flag is not given (a key on the command line shows in ps).
API_KEY_ENV = "SMOE_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    host: str = option("127.0.0.1", "address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                                    "interface)")
    port: int = option(8000, "port to listen on (0: any free port; the one chosen is printed)")
    max_batch: int = option(16, "requests decoded together: the cache's rows. Every decode step runs all of them, "
                                "so a request's tokens never depend on the others")
    max_seq_len: int | None = option(None, "context of each request, prompt + new tokens (default: the model's "
                                           "max_seq_len); the cache holds `max_batch` times this")
    max_queue: int = option(64, "requests waiting for a row beyond `max_batch`; more are refused with 429")
    prefill_chunk: int = option(64, "prompt tokens prefilled between two decode steps (newcomers' prompts "
                                               "in chunks, oldest first): a smaller one stalls the running streams "
                                               "less and delays newcomers' first tokens more")
    compile: bool = option(False, "run each decode step as one compiled graph (torch.compile, before the server "
                                  "listens: 20-60 s a graph on a few cores) of the engine's fixed shape, or with "
                                  "`dependent_rows` of the fewest rows that hold the requests; fp32 experts need "
                                  "`dependent_rows`, quantised ones (`quantize`) keep rows independent")
    dependent_rows: bool = option(False, "let a request's tokens depend, in the last bits, on the requests beside "
                                         "it: eagerly, experts without fixed-shape tiles; compiled, steps of only "
                                         "as many rows and slots as the running requests need (a graph per power "
                                         "of two rows), and `compile` on fp32 experts")
    dtype: Literal["fp32", "bf16", "fp16"] | None = option(
        None, "compute dtype (default: as stored, but fp32 for bf16/fp16 weights on a CPU without native GEMMs for "
              "them)")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    quantize: QuantScheme | None = option(None, "serve with weight-only quantised linear layers and experts (int8: a "
                                                "scale per output channel; int4: per group of inputs; "
                                                "docs/quantization.md)")
    group_size: int | None = option(None, f"with `quantize` int4: inputs per group, one of "
                                          f"{', '.join(map(str, INT4_GROUP_SIZES))} (default {DEFAULT_INT4_GROUP})")
    api_key: str | None = option(None, f"require `Authorization: Bearer KEY` on every endpoint but /health "
                                       f"(default: ${API_KEY_ENV} if set, else no key)")
    shutdown_timeout: float = option(10.0, "seconds in-flight requests may take to finish after SIGTERM before "
                                           "they are aborted (503)")
    allowed_hosts: tuple[str, ...] = option((), "Host header values (names or addresses, no port) answered besides "
                                                "the loopback ones, which are the only ones answered when `host` is "
                                                "a loopback address (so a web page cannot reach the server under "
                                                "its own name: DNS rebinding); given, the list is enforced on any "
                                                "address")
    read_timeout: float = option(30.0, "seconds a client may take to send a request's headers, and again its body; "
                                       "then the connection is closed (headers) or answered 408 (body)")

    def validate(self) -> ServeConfig:
        check_types(self, "")
        positive("max_batch", self.max_batch)
        positive("prefill_chunk", self.prefill_chunk)
        positive("max_seq_len", self.max_seq_len, allow_none=True)
        non_negative("max_queue", self.max_queue)
        non_negative("shutdown_timeout", self.shutdown_timeout)
        positive("read_timeout", self.read_timeout)
        for name in self.allowed_hosts:
            if not name or (any(c in name for c in " /:[]") and not _is_ipv6(name)):
                fail("allowed_hosts", f"{name!r} is not a host name or address without a port")
        if not 0 <= self.port <= 65535:
            fail("port", f"must lie in [0, 65535], got {self.port}")
        if not self.host:
            fail("host", "must not be empty")
        if self.api_key is not None:
            check_api_key(self.api_key, "api_key")
        if self.group_size is not None and self.quantize != "int4":
            fail("group_size", "only with `quantize` int4 (int8 has one scale per output channel)")
        if self.quantize is not None:
            group = self.group_size or (DEFAULT_INT4_GROUP if self.quantize == "int4" else None)
            QuantConfig(self.quantize, group).validate(prefix="")
        return self

    def resolved_api_key(self) -> str | None:
        """``api_key``, else ``$SMOE_API_KEY`` when set, checked as ``api_key`` is."""
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV) or None
        if key is not None and self.api_key is None:
            check_api_key(key, API_KEY_ENV)
        return key


def check_api_key(key: str, name: str) -> None:
    """A key travels in an HTTP header, whose bytes clients send as ASCII: any other character could never match."""
    if not key:
        fail(name, "must not be empty")
    if not (key.isascii() and key.isprintable() and " " not in key):
        fail(name, "must be printable ASCII without spaces (it travels in the Authorization header)")


def _is_ipv6(name: str) -> bool:
    try:
        ipaddress.IPv6Address(name)
    except ValueError:
        return False
    return True
