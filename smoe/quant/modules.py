"""Modules that hold quantised weights as buffers, for inference: ``QuantizedLinear`` takes the place of an
``nn.Linear``, ``QuantizedExperts`` of ``RoutedExperts``; ``quantize_modules`` swaps them into a model.

State-dict names say what each tensor is: a linear ``wq`` becomes ``wq.qweight``, ``wq.scale`` (``wq.offset`` for
int4, ``wq.bias`` when it had one); routed experts hold ``experts.w_gate_up.qweight`` and so on. The kernels come
from ``smoe.kernels.quantized`` by name; they compute in fp32 whatever the activations' dtype. A backward through a
quantised weight raises: these modules are for generation and evaluation, not training.

Legend: B rows, I inputs, O outputs, R rows sorted by expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoe import kernels
from smoe.config import QuantConfig
from smoe.kernels.qweight import QWeight
from smoe.kernels.tiled import TILE_ROWS
from smoe.moe.experts import Experts, RoutedExperts
from smoe.quant.format import int4_group, quantize_weight


class QuantizedTensor(nn.Module):
    """One quantised (..., O, I) weight: buffers ``qweight``, ``scale`` and, for int4, ``offset``."""

    def __init__(self, w: QWeight):
        super().__init__()
        self.group_size = w.group_size
        self.register_buffer("qweight", w.qweight)
        self.register_buffer("scale", w.scale)
        self.register_buffer("offset", w.offset)

    def value(self) -> QWeight:
        return QWeight(self.qweight, self.scale, self.offset, self.group_size)


class QuantizedLinear(QuantizedTensor):
    def __init__(self, linear: nn.Linear, config: QuantConfig):
        super().__init__(quantize_weight(linear.weight, config))
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_BI = _as(x.reshape(-1, self.in_features), torch.float32)
        y_BO = kernels.quantized("auto", x.device).linear(x_BI, self.value())
        if self.bias is not None:
            y_BO = y_BO + self.bias
        return inference_only(_as(y_BO.view(*x.shape[:-1], self.out_features), x.dtype), x)


class QuantizedExperts(Experts):
    """``RoutedExperts``' seam (rows sorted by expert in, rows out) over quantised ``w_gate_up`` and ``w_down``;
    ``backend`` names quantised kernels (``smoe.kernels.quantized_names``). Where those kernels have a ``moe``,
    ``direct`` hands it to the layer, which then skips its own sort, gather and combine. ``tiled`` (the decode
    engine's promise that a row's result does not depend on the other rows) runs fixed-shape tiles (``_tiled``)
    unless the kernels keep that promise themselves (``row_independent``: the C++ ones)."""

    def __init__(self, experts: RoutedExperts, config: QuantConfig):
        super().__init__()
        self.activation = experts.activation
        self.w_gate_up = QuantizedTensor(quantize_weight(experts.w_gate_up, config))
        self.w_down = QuantizedTensor(quantize_weight(experts.w_down, config))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        if backend == "tiled":  # the decode engine's promise: a row's result does not depend on the other rows
            if not kernels.quantized("auto", x_RD.device).row_independent:
                return inference_only(self._tiled(x_RD.float(), counts_E).to(x_RD.dtype), x_RD)
            backend = "auto"  # these kernels keep it by themselves
        fn = kernels.quantized(backend, x_RD.device).experts
        y_RD = fn(x_RD.float(), counts_E, self.w_gate_up.value(), self.w_down.value(), self.activation)
        return inference_only(y_RD.to(x_RD.dtype), x_RD)

    def direct(self, backend: str, x: torch.Tensor):
        quantized = kernels.quantized("auto" if backend == "tiled" else backend, x.device)
        if quantized.moe is None or (backend == "tiled" and not quantized.row_independent):
            return None
        moe = quantized.moe

        def run(x_ND: torch.Tensor, expert_ids_A: torch.Tensor, weights_A: torch.Tensor) -> torch.Tensor:
            y_ND = moe(_as(x_ND, torch.float32), expert_ids_A, weights_A, self.w_gate_up.value(),
                       self.w_down.value(), self.activation)
            return inference_only(_as(y_ND, x_ND.dtype), x_ND)

        return run

    def _tiled(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The ``tiled`` backend's promise (smoe.kernels.tiled) for quantised weights: each expert's rows, padded
        to whole tiles of TILE_ROWS, go to the kernel one tile per call, so every call has one shape and a row's
        result does not depend on the rows routed beside it (the decode engine's steps)."""
        fn = kernels.quantized("auto", x_RD.device).experts
        one_tile = torch.tensor([TILE_ROWS])
        w_gate_up, w_down = self.w_gate_up.value(), self.w_down.value()
        y_RD = x_RD.new_zeros(x_RD.shape[0], w_down.qweight.shape[-2])
        start = 0
        for e, c in enumerate(counts_E.tolist()):
            if c:
                tiles = F.pad(x_RD[start : start + c], (0, 0, 0, -c % TILE_ROWS)).split(TILE_ROWS)
                expert_gate_up, expert_down = w_gate_up.expert(e, keepdim=True), w_down.expert(e, keepdim=True)
                y_RD[start : start + c] = torch.cat([fn(tile, one_tile, expert_gate_up, expert_down, self.activation)
                                                     for tile in tiles])[:c]
            start += c
        return y_RD


class _InferenceOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("quantization: quantised weights are for inference only and have no backward pass; "
                           "train or fine-tune the full-precision model, then quantise it")


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a call when it already is (decode runs thousands of these a step)."""
    return t if t.dtype == dtype else t.to(dtype)


def inference_only(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y``, made to raise if a backward pass reaches it (only where autograd records one)."""
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return _InferenceOnly.apply(y, x)
    return y


def quantize_modules(root: nn.Module, config: QuantConfig) -> None:
    """Replace, in place, every ``nn.Linear`` and every ``RoutedExperts`` under ``root`` by its quantised twin, but
    the linears a module names in its ``keep_full_precision`` (a class attribute: MLA's ``wkv_b``, the MoE layer's
    shared-expert gate). For int4 every weight's input count is checked (``int4_group``) before any is
    quantised."""
    config.validate()
    targets = []
    for parent_name, parent in root.named_modules():
        kept = getattr(type(parent), "keep_full_precision", ())
        for name, child in parent.named_children():
            if isinstance(child, RoutedExperts) or (isinstance(child, nn.Linear) and name not in kept):
                targets.append((parent, name, child, f"{parent_name}.{name}".lstrip(".")))
    if config.scheme == "int4":
        for _, _, child, path in targets:
            for w in [child.weight] if isinstance(child, nn.Linear) else [child.w_gate_up, child.w_down]:
                try:
                    int4_group(w.shape[-1], config.group_size)
                except ValueError as err:
                    raise ValueError(f"{err} ({path})") from None
    for parent, name, child, _ in targets:
        quantized = QuantizedExperts(child, config) if isinstance(child, RoutedExperts) else QuantizedLinear(child,
                                                                                                             config)
        setattr(parent, name, quantized)
