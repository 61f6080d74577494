"""What an expert backend is (``Backend``: one record) and the registry of them, apart from the package that chooses
among them (smoe.kernels), so a backend module never imports its own package.

A backend's entry points come per kind of weights (``Kernels``: float tensors, or ``QWeight`` stacks):

    experts(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation) -> y_RD      rows sorted by expert (the seam)
    tokens(x_ND, assignments, w_gate_up_E2FD, w_down_EDF, activation) -> y_ND    unsorted tokens (optional)
    linear(x_BI, w) -> y_BO                                                       quantised weights only

R rows (token-expert assignments, sorted so expert e owns rows [offs[e-1], offs[e])), D model dim, E experts,
F expert hidden dim; ``w_gate_up`` stacks the gate (first F rows) and up (last F rows) projections; ``counts_E`` is
an int64 tensor on the same device. ``tokens`` starts from the N unsorted tokens and returns each token's weighted
sum of its experts' outputs, so the gather can happen inside its GEMM loads and the combine inside its stores; what
it is told of the routing is an ``Assignments``. Legend: B rows, I inputs, O outputs, A = N*K assignments.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from smoe.kernels.qweight import QWeight


class ExpertBackend(Protocol):
    def __call__(
        self,
        x_RD: torch.Tensor,
        counts_E: torch.Tensor,
        w_gate_up_E2FD: torch.Tensor,
        w_down_EDF: torch.Tensor,
        activation: str,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Assignments:
    """The routing a ``tokens`` entry is given: each token's K assignments, token-major (assignment a belongs to
    token a // K, so K = A // N). A kernel that groups the assignments by expert itself (``Kernels.sorts_tokens``)
    reads the ids; any other reads the caller's sort, ``order_R`` and ``counts_E``."""

    expert_ids_A: torch.Tensor  # int64; an id outside [0, E) routes nowhere (padding, or dropped over capacity)
    weights_A: torch.Tensor  # the combine weights
    order_R: torch.Tensor | None = None  # the kept assignments sorted by expert (None: the kernel sorts)
    counts_E: torch.Tensor | None = None  # int64 rows per expert of order_R


class TokensBackend(Protocol):
    def __call__(
        self, x_ND: torch.Tensor, assignments: Assignments, w_gate_up_E2FD, w_down_EDF, activation: str
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Kernels:
    """A backend's entry points for one kind of weights (float tensors, or ``QWeight`` stacks) and what they
    guarantee."""

    experts: ExpertBackend  # rows sorted by expert in, rows out
    tokens: TokensBackend | None = None  # the unsorted tokens in, each token's weighted sum out
    # ``tokens`` groups the assignments by expert itself (it reads ``expert_ids_A``): the layer then skips its own
    # sort, and hands the tokens over only where it does not sort them anyway (no statistics, no capacity).
    sorts_tokens: bool = False
    linear: Callable[[torch.Tensor, QWeight], torch.Tensor] | None = None  # quantised weights: (x_BI, w) -> y_BO
    # Every row's result is bitwise the same whatever other rows share the call (batch invariance): what the decode
    # engine asks for (smoe.kernels.ROW_INDEPENDENT). Kernels without it get it from fixed-shape tiles (tiled.py).
    row_independent: bool = False


def anywhere(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One expert backend: its name, where it runs, and its entry points per kind of weights (None: it has none
    for that kind)."""

    name: str
    floating: Kernels | None = None  # float weights (fp32, bf16, ...): training and inference
    quantized: Kernels | None = None  # QWeight stacks (smoe.quant): inference
    runs_on: Callable[[torch.device], str | None] = anywhere  # None where it can run on ``device``, else why not
    # Compiles (or loads) native code the kernels need, once: None when it is ready, else why not (a failed build).
    build: Callable[[], str | None] | None = None

    def unavailable(self, device: torch.device) -> str | None:
        """None where this backend can run on ``device``, else why not, as a sentence."""
        if (reason := self.runs_on(device)) is not None:
            return f"{self.name!r} cannot run on {device.type} ({reason})"
        if self.build is not None and (reason := self.build()) is not None:
            return f"the {self.name!r} kernels could not be built here ({reason})"
        return None


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry under its name (replacing one of that name)."""
    _REGISTRY[backend.name] = backend
    return backend


def backends() -> list[Backend]:
    """Every registered backend, in the order of registration."""
    return list(_REGISTRY.values())


def find(name: str) -> Backend | None:
    return _REGISTRY.get(name)


@functools.cache
def native_low_precision(dtype: torch.dtype) -> bool:
    """Whether this CPU's GEMMs run ``dtype`` natively (oneDNN's own check for AVX512-BF16/FP16 or AMX)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def load_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a model stored in ``stored`` is loaded in on ``device`` when none is asked for: its own, except
    that a CPU without native bf16/fp16 GEMMs gets an fp32 copy once, at load. An emulated low-precision GEMM is
    several times slower than fp32, and casting the weights to fp32 inside every call costs that copy every step."""
    if device.type == "cpu" and stored in (torch.bfloat16, torch.float16) and not native_low_precision(stored):
        return torch.float32
    return stored
