"""Expert backends: one registry, one signature.

A backend computes every routed expert's gated FFN on tokens already sorted by expert:

    backend(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation) -> y_RD

R rows (token-expert assignments, sorted so expert e owns rows [offs[e-1], offs[e])), D model dim, E experts,
F expert hidden dim; ``w_gate_up`` stacks the gate (first F rows) and up (last F rows) projections; ``counts_E`` is
an int64 tensor on the same device. ``reference`` is the spec; every other backend must match it forward and
backward (tests/test_backends.py). Backends never change parameter layout, so switching one never changes a
checkpoint.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch


class ExpertBackend(Protocol):
    def __call__(
        self,
        x_RD: torch.Tensor,
        counts_E: torch.Tensor,
        w_gate_up_E2FD: torch.Tensor,
        w_down_EDF: torch.Tensor,
        activation: str,
    ) -> torch.Tensor: ...


_BACKENDS: dict[str, ExpertBackend] = {}
_AVAILABLE: dict[str, Callable[[torch.device], bool]] = {}


def register(name: str, available: Callable[[torch.device], bool] = lambda device: True):
    """Decorator: add a backend under ``name``; ``available(device)`` says whether it can run there."""

    def wrap(fn: ExpertBackend) -> ExpertBackend:
        _BACKENDS[name] = fn
        _AVAILABLE[name] = available
        return fn

    return wrap


def names() -> list[str]:
    return ["auto", *_BACKENDS]


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend name ``name`` stands for on ``device`` (``auto``: the fastest one available)."""
    if name == "auto":
        return next(n for n in _AUTO_ORDER if n in _BACKENDS and _AVAILABLE[n](device))
    if name not in _BACKENDS:
        raise ValueError(f"backend: unknown expert backend {name!r}; known: {', '.join(names())}")
    if not _AVAILABLE[name](device):
        raise ValueError(f"backend: {name!r} cannot run on {device.type}")
    return name


def get(name: str, device: torch.device) -> ExpertBackend:
    return _BACKENDS[resolve(name, device)]


# Fastest first. Fast kernels (issue: Triton on GPU) register themselves and join this order.
_AUTO_ORDER = ["grouped_mm", "reference"]

from smoe.kernels import expert_loop, grouped_mm, reference  # noqa: E402,F401  (registration side effect)
