"""Expert backends: one registry, one signature.

A backend computes every routed expert's gated FFN on tokens already sorted by expert:

    backend(x_RD, counts_E, w_gate_up_E2FD, w_down_EDF, activation) -> y_RD

R rows (token-expert assignments, sorted so expert e owns rows [offs[e-1], offs[e])), D model dim, E experts,
F expert hidden dim; ``w_gate_up`` stacks the gate (first F rows) and up (last F rows) projections; ``counts_E`` is
an int64 tensor on the same device. ``reference`` is the spec; every other backend must match it forward and
backward (tests/test_backends.py). Backends never change parameter layout, so switching one never changes a
checkpoint.

A backend may also register a *fused* variant that starts from the unsorted tokens, so the gather can happen
inside its GEMM loads and the weighted combine inside its stores:

    fused(x_ND, weights_A, order_R, counts_E, w_gate_up_E2FD, w_down_EDF, activation) -> y_ND

(N tokens, A = N*K token-major assignments, ``order_R`` the kept assignments sorted by expert). The layer uses it
only for token-choice routing with the stock ``RoutedExperts``; a replaced experts module (expert parallelism)
keeps the plain signature above.

``auto`` picks per call from the device, dtype and shape (``choose``): on CUDA ``grouped_mm`` for bf16 on sm90,
else Triton when installed; on CPU ``cpp`` for fp32 where it builds (the experts in C++, each expert a task on one
thread, with a fused variant: cpp_experts.py), else ``expert_loop``, or ``grouped_mm`` for decode-sized calls (a
few rows per expert), where its C++ loop beats a Python one. ``tiled`` (every GEMM of one fixed shape, so a row's
result does not depend on the other rows) is never chosen by ``auto``: the decode engine asks for it by name.

Quantised weights (smoe.quant) have their own kernels by name, a linear and the experts for each
(``quantized(name, device)``): ``reference`` (dequantise, then the float maths: the spec, and the fallback),
``cpp`` (CPU, compiled on first use; cpp_quant.py) and ``numba`` (CPU, when numba is installed; imported on first
use, since importing numba takes about a second). ``auto`` is cpp on a CPU where it builds, else numba where it
runs, else the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from smoe.kernels.registry import (
    _AVAILABLE,
    _BACKENDS,
    _FUSED,
    _QUANTIZED,
    ExpertBackend,
    QuantizedKernels,
    load_dtype,
    native_low_precision,
    register,
    register_fused,
)

__all__ = ["ExpertBackend", "QuantizedKernels", "available", "choose", "expert_selector", "get", "get_fused",
           "load_dtype", "names", "native_low_precision", "quantized", "quantized_names", "register",
           "register_fused", "resolve"]

HAS_NUMBA = importlib.util.find_spec("numba") is not None


def available(name: str, device: torch.device) -> bool:
    return _AVAILABLE[name](device)


def names() -> list[str]:
    return ["auto", *_BACKENDS]


# Below this many rows per expert (decode: T*K of a few tokens) the per-expert Python loop's overhead dominates and
# torch._grouped_mm's C++ loop wins; above it expert_loop does (benchmarks/moe_layer.py, docs/benchmarks.md).
LOOP_MIN_ROWS_PER_EXPERT = 4


def choose(device: torch.device, dtype: torch.dtype = torch.float32, n_rows: int | None = None,
           n_experts: int | None = None) -> str:
    """What ``auto`` runs for ``n_rows`` rows over ``n_experts`` experts. On CUDA: grouped_mm for bf16 on sm90+
    (verified on an H100), else the Triton kernels when installed (so far verified in Triton's interpreter only,
    which is why they do not outrank grouped_mm), else the reference loop. On CPU: fp32 runs the C++ kernels
    (``cpp``, at every size: they beat grouped_mm at decode too) where they build, with a warning once where they
    do not; other dtypes run expert_loop, or grouped_mm for decode-sized calls."""
    if device.type == "cuda":
        if dtype == torch.bfloat16 and _AVAILABLE["grouped_mm"](device):
            return "grouped_mm"
        return "triton" if "triton" in _BACKENDS else "reference"
    if device.type == "cpu" and dtype == torch.float32:
        if (reason := cpp_experts.build()) is None:
            return "cpp"
        _warn_once(f"backend: the C++ expert kernels could not be built ({reason}); running expert_loop instead")
    if n_rows is not None and n_experts and n_rows < LOOP_MIN_ROWS_PER_EXPERT * n_experts:
        return "grouped_mm" if _AVAILABLE["grouped_mm"](device) else "expert_loop"
    return "expert_loop"


def resolve(name: str, device: torch.device, dtype: torch.dtype = torch.float32, n_rows: int | None = None,
            n_experts: int | None = None) -> str:
    """The concrete backend name ``name`` stands for on ``device`` (``auto``: see ``choose``)."""
    if name == "auto":
        return choose(device, dtype, n_rows, n_experts)
    if name not in _BACKENDS:
        raise ValueError(f"backend: unknown expert backend {name!r}; known: {', '.join(names())}")
    if not _AVAILABLE[name](device):
        raise ValueError(f"backend: {name!r} cannot run on {device.type}")
    return name


def get(name: str, device: torch.device, dtype: torch.dtype = torch.float32, n_rows: int | None = None,
        n_experts: int | None = None) -> ExpertBackend:
    return _BACKENDS[resolve(name, device, dtype, n_rows, n_experts)]


def get_fused(name: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The fused variant of the backend ``name`` resolves to, or None if it has none."""
    return _FUSED.get(resolve(name, device, dtype))


def quantized_names() -> list[str]:
    return ["auto", "reference", "cpp", *(["numba"] if HAS_NUMBA else [])]


def quantized(name: str, device: torch.device) -> QuantizedKernels:
    """The quantised-weight kernels ``name`` stands for on ``device`` (``auto``: on a CPU the C++ kernels, else
    numba where it is installed, else the reference; elsewhere the reference)."""
    if name == "auto":
        name = _auto_quantized() if device.type == "cpu" else "reference"
    if name not in quantized_names()[1:]:
        raise ValueError(f"backend: unknown backend {name!r} for quantised weights; known: "
                         f"{', '.join(quantized_names())}")
    if name in ("cpp", "numba") and device.type != "cpu":
        raise ValueError(f"backend: {name!r} runs on the CPU only, not on {device.type}")
    if name == "cpp":
        from smoe.kernels import cpp_quant

        if (reason := cpp_quant.build()) is not None:
            raise ValueError(f"backend: the 'cpp' kernels could not be built here ({reason})")
    if name == "numba":
        from smoe.kernels import numba_quant  # noqa: F401  (registers itself; numba is slow to import)
    return _QUANTIZED[name]


def _auto_quantized() -> str:
    """The CPU's ``auto`` for quantised weights: ``cpp`` if it builds, else numba or the reference, with a warning
    saying why (once per process)."""
    from smoe.kernels import cpp_quant

    if (reason := cpp_quant.build()) is None:
        return "cpp"
    fallback = "numba" if HAS_NUMBA else "reference"
    _warn_once(f"quantization: the C++ kernels could not be built ({reason}); running the {fallback} kernels "
               f"instead")
    return fallback


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def expert_selector(device: torch.device):
    """The router's top-k selection kernel for ``device`` (Triton on CUDA), or None: the router's torch code,
    which is the spec it is tested against."""
    if device.type == "cuda" and "triton" in _BACKENDS:
        from smoe.kernels.triton import select_experts

        return select_experts
    return None


# The backends register themselves on import.
from smoe.kernels import cpp_experts, expert_loop, grouped_mm, quantized_reference, reference, tiled  # noqa: E402,F401

if importlib.util.find_spec("triton") is not None:
    from smoe.kernels import triton  # noqa: E402,F401
