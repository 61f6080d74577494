"""The registry the expert backends add themselves to (``register``), apart from the package that chooses among
them (smoe.kernels), so a backend module imports this one and never its own package."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Protocol

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


class QuantizedKernels(NamedTuple):
    """A backend for quantised weights (smoe.kernels.qweight): a linear layer and the routed experts, on fp32 rows.
    The experts take the plain seam's arguments with ``QWeight`` stacks in place of the weight tensors. ``moe``,
    where a backend has it, starts from the unsorted tokens instead (inference without capacity limits): token-major
    expert ids and weights in, each token's weighted sum out, the dispatch and combine inside the kernel."""

    linear: Callable[[torch.Tensor, QWeight], torch.Tensor]  # (x_BI, w) -> y_BO
    experts: Callable[[torch.Tensor, torch.Tensor, QWeight, QWeight, str], torch.Tensor]
    # (x_ND, expert_ids_A, weights_A, w_gate_up, w_down, activation) -> y_ND; an id outside [0, E) routes nowhere
    moe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, QWeight, QWeight, str], torch.Tensor] | None = None
    # Every row's result is bitwise the same whatever other rows a call holds: the promise the `tiled` expert
    # backend keeps by fixing the GEMM shape (smoe.kernels.tiled), kept here by the kernels themselves.
    row_independent: bool = False


_BACKENDS: dict[str, ExpertBackend] = {}
_FUSED: dict[str, Callable[..., torch.Tensor]] = {}
_AVAILABLE: dict[str, Callable[[torch.device], bool]] = {}
_QUANTIZED: dict[str, QuantizedKernels] = {}


def register(name: str, available: Callable[[torch.device], bool] = lambda device: True):
    """Decorator: add a backend under ``name``; ``available(device)`` says whether it can run there."""

    def wrap(fn: ExpertBackend) -> ExpertBackend:
        _BACKENDS[name] = fn
        _AVAILABLE[name] = available
        return fn

    return wrap


def register_quantized(name: str, kernels: QuantizedKernels) -> None:
    """Add the quantised-weight kernels ``name`` (smoe.kernels.quantized says where each can run)."""
    _QUANTIZED[name] = kernels


def register_fused(name: str):
    """Decorator: the fused variant of the already registered backend ``name``."""

    def wrap(fn):
        _FUSED[name] = fn
        return fn

    return wrap


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
