"""Expert backends: one registry of records, one signature.

Each backend is one ``Backend`` record (registry.py): its name, where it runs (``runs_on``, and ``build`` for
native code compiled on first use), and its entry points per kind of weights (``Kernels``: ``floating`` for float
tensors, ``quantized`` for ``QWeight`` stacks): ``experts`` on rows sorted by expert, the seam every backend has,

    experts(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation) -> y_RD

optionally ``tokens`` from the unsorted tokens, ``linear`` for quantised weights, and whether the rows are
independent (``row_independent``: a row's result never depends on the other rows of the call). ``reference`` is
the spec; every other backend must match it forward and backward (tests/test_backends.py, tests/test_quant.py).
Backends never change parameter layout, so switching one never changes a checkpoint.

A caller names a backend (``auto``: chosen per call, ``choose``) or sends a ``BackendRequest``: a name and the
guarantees it needs. The decode engine asks for row independence (``ROW_INDEPENDENT``); kernels that do not keep it
by themselves then run in fixed-shape tiles (tiled.py). ``"tiled"``, once a backend name, still works: it is the
deprecated spelling of that request. docs/design.md has the table of backends and the ``auto`` policy.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass

import torch

from smoe.kernels import cpp_experts, cpp_quant, expert_loop, grouped_mm, quantized_reference, reference
from smoe.kernels.registry import (
    Assignments,
    Backend,
    ExpertBackend,
    Kernels,
    TokensBackend,
    backends,
    find,
    load_dtype,
    native_low_precision,
)
from smoe.kernels.registry import register as _register
from smoe.kernels.tiled import fixed_shape

__all__ = ["ROW_INDEPENDENT", "Assignments", "Backend", "BackendRequest", "ExpertBackend", "Kernels",
           "TokensBackend", "available", "backends", "choose", "expert_selector", "get", "load_dtype", "names",
           "native_low_precision", "quantized", "quantized_names", "register", "resolve", "select"]

HAS_NUMBA = importlib.util.find_spec("numba") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class BackendRequest:
    """What a caller asks of the expert kernels: a backend by ``name`` (``auto``: ``choose`` picks per call) and the
    guarantees it needs. ``row_independent``: a row's result must not depend on the other rows of the call."""

    name: str = "auto"
    row_independent: bool = False


ROW_INDEPENDENT = BackendRequest(row_independent=True)
_AUTO = BackendRequest()


def _cpu_only(device: torch.device) -> str | None:
    return None if device.type == "cpu" else "runs on the CPU only"


def _build_cpp() -> str | None:
    # One library holds both kinds of kernels; each module registers its own ops' shapes (cpp_build.ops_builder).
    return cpp_experts.build() or cpp_quant.build()


def _numba_runs_on(device: torch.device) -> str | None:
    if not HAS_NUMBA:
        return "numba is not installed (pip install 'smoe[quant]')"
    return _cpu_only(device)


def _numba_linear(x_BI, w):
    from smoe.kernels import numba_quant  # imported on first use: importing numba takes about a second

    return numba_quant.linear(x_BI, w)


def _numba_experts(x_RD, counts_E, w_gate_up, w_down, activation):
    from smoe.kernels import numba_quant

    return numba_quant.experts(x_RD, counts_E, w_gate_up, w_down, activation)


# The registry, in the order ``names()`` lists them.
_register(Backend("reference", floating=Kernels(reference.reference_experts), quantized=quantized_reference.KERNELS))
_register(Backend("cpp", floating=cpp_experts.KERNELS, quantized=cpp_quant.KERNELS, runs_on=_cpu_only,
                  build=_build_cpp))
_register(Backend("expert_loop", floating=Kernels(expert_loop.expert_loop_experts)))
_register(Backend("grouped_mm", floating=Kernels(grouped_mm.grouped_mm_experts), runs_on=grouped_mm.runs_on))
_register(Backend("numba", quantized=Kernels(_numba_experts, linear=_numba_linear), runs_on=_numba_runs_on))
if HAS_TRITON:
    from smoe.kernels import triton

    _register(Backend("triton", floating=triton.KERNELS, runs_on=triton.runs_on))


def register(backend: Backend | str, available=None):
    """Add ``backend`` (a ``Backend`` record) to the registry. The former decorator form,
    ``@register(name, available)`` on a float ``experts`` function, still works and is deprecated."""
    if isinstance(backend, Backend):
        return _register(backend)
    warnings.warn("kernels.register(name, available) is deprecated: register a kernels.Backend record",
                  DeprecationWarning, stacklevel=2)
    name = backend

    def runs_on(device: torch.device) -> str | None:
        return None if available is None or available(device) else "its availability check said no"

    def wrap(fn: ExpertBackend) -> ExpertBackend:
        _register(Backend(name, floating=Kernels(fn), runs_on=runs_on))
        return fn

    return wrap


def names() -> list[str]:
    """The names float weights can be computed under: ``auto`` and every backend with float kernels."""
    return ["auto", *(b.name for b in backends() if b.floating is not None)]


def quantized_names() -> list[str]:
    """The names quantised weights can be computed under on this machine's CPU: ``auto`` and every backend with
    quantised kernels that runs there."""
    cpu = torch.device("cpu")
    return ["auto", *(b.name for b in backends() if b.quantized is not None and b.unavailable(cpu) is None)]


def available(name: str, device: torch.device) -> bool:
    backend = find(name)
    return backend is not None and backend.unavailable(device) is None


# Below this many rows per expert (decode: T*K of a few tokens) the per-expert Python loop's overhead dominates and
# torch._grouped_mm's C++ loop wins; above it expert_loop does (benchmarks/moe_layer.py, docs/benchmarks.md).
LOOP_MIN_ROWS_PER_EXPERT = 4


def choose(device: torch.device, dtype: torch.dtype = torch.float32, n_rows: int | None = None,
           n_experts: int | None = None, *, quantized: bool = False, row_independent: bool = False) -> Backend:
    """The backend ``auto`` runs for ``n_rows`` rows over ``n_experts`` experts of ``dtype`` (or quantised) weights
    on ``device``; with ``row_independent``, one whose rows never depend on the others (that choice if its kernels
    keep it, else fixed-shape tiles). The policy, and the measurements behind it, are written once, in
    docs/design.md ("``auto``"); the code below is that policy."""
    chosen = _choose_quantized(device) if quantized else _choose_floating(device, dtype, n_rows, n_experts)
    return _row_independent(chosen, quantized) if row_independent else chosen


def _row_independent(backend: Backend, quantized: bool) -> Backend:
    """``backend`` where its kernels keep row independence, else fixed-shape tiles (tiled.py): of its own kernels
    for quantised weights, of the spec for float weights."""
    if (backend.quantized if quantized else backend.floating).row_independent:
        return backend
    return fixed_shape(backend if quantized else find("reference"))


def _choose_floating(device: torch.device, dtype: torch.dtype, n_rows: int | None, n_experts: int | None
                     ) -> Backend:
    grouped = find("grouped_mm")
    if device.type == "cuda":
        if dtype == torch.bfloat16 and grouped.unavailable(device) is None:
            return grouped
        return find("triton") or find("reference")
    if device.type == "cpu" and dtype == torch.float32:
        cpp = find("cpp")
        if (reason := cpp.build()) is None:
            return cpp
        _warn_once(f"backend: the C++ expert kernels could not be built ({reason}); running expert_loop instead")
    if n_rows is not None and n_experts and n_rows < LOOP_MIN_ROWS_PER_EXPERT * n_experts:
        return grouped if grouped.unavailable(device) is None else find("expert_loop")
    return find("expert_loop")


def _choose_quantized(device: torch.device) -> Backend:
    if device.type != "cpu":
        return find("reference")
    cpp = find("cpp")
    if (reason := cpp.build()) is None:
        return cpp
    numba = find("numba")
    fallback = numba if numba.unavailable(device) is None else find("reference")
    _warn_once(f"quantization: the C++ kernels could not be built ({reason}); running the {fallback.name} kernels "
               f"instead")
    return fallback


def select(backend: str | BackendRequest, device: torch.device, dtype: torch.dtype = torch.float32,
           n_rows: int | None = None, n_experts: int | None = None, *, quantized: bool = False) -> Backend:
    """The record that computes a call under ``backend`` (a name, or a ``BackendRequest``) on ``device``, with its
    kernels for the weights' kind (``quantized``): ``auto`` as ``choose`` picks; a named backend must have that kind
    of kernels and run here (a ValueError says why not); where row independence is asked for and its kernels do not
    keep it, fixed-shape tiles as ``choose`` makes them."""
    request = _request(backend)
    if request.name == "auto":
        return choose(device, dtype, n_rows, n_experts, quantized=quantized, row_independent=request.row_independent)
    record = find(request.name)
    kind = "quantised" if quantized else "float"
    if record is None:
        raise ValueError(f"backend: unknown expert backend {request.name!r}; known: {', '.join(names())}, "
                         f"and for quantised weights {', '.join(quantized_names())}")
    kernels = record.quantized if quantized else record.floating
    if kernels is None:
        with_kind = [b.name for b in backends() if (b.quantized if quantized else b.floating) is not None]
        raise ValueError(f"backend: {request.name!r} has no kernels for {kind} weights; those with: auto, "
                         f"{', '.join(with_kind)}")
    if (reason := record.unavailable(device)) is not None:
        raise ValueError(f"backend: {reason}")
    return _row_independent(record, quantized) if request.row_independent else record


def _request(backend: str | BackendRequest) -> BackendRequest:
    if isinstance(backend, BackendRequest):
        return backend
    if backend == "auto":  # most calls: no new request
        return _AUTO
    if backend == "tiled":
        _deprecated_tiled()
        return ROW_INDEPENDENT
    return BackendRequest(backend)


@functools.cache
def _deprecated_tiled() -> None:
    warnings.warn("backend: 'tiled' is no longer a backend but a guarantee: ask for it with "
                  "kernels.ROW_INDEPENDENT (a BackendRequest); 'tiled' still means that request, and is deprecated",
                  DeprecationWarning, stacklevel=5)


def get(name: str | BackendRequest, device: torch.device, dtype: torch.dtype = torch.float32,
        n_rows: int | None = None, n_experts: int | None = None) -> ExpertBackend:
    """The float ``experts`` entry that ``name`` stands for (see ``select``)."""
    return select(name, device, dtype, n_rows, n_experts).floating.experts


def resolve(name: str | BackendRequest, device: torch.device, dtype: torch.dtype = torch.float32,
            n_rows: int | None = None, n_experts: int | None = None) -> str:
    """The name of the backend ``name`` stands for on ``device`` for float weights (see ``select``)."""
    return select(name, device, dtype, n_rows, n_experts).name


def quantized(name: str | BackendRequest, device: torch.device) -> Kernels:
    """The quantised-weight kernels ``name`` stands for on ``device`` (see ``select``)."""
    return select(name, device, quantized=True).quantized


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=5)


def expert_selector(device: torch.device):
    """The router's top-k selection kernel for ``device`` (Triton on CUDA), or None: the router's torch code,
    which is the spec it is tested against."""
    if device.type == "cuda" and find("triton") is not None:
        from smoe.kernels.triton import select_experts

        return select_experts
    return None
