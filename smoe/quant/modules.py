"""Modules that hold quantised weights as buffers, for inference: ``QuantizedLinear`` takes the place of an
``nn.Linear``, ``QuantizedExperts`` of ``RoutedExperts``; ``quantize_modules`` swaps them into a model.

State-dict names say what each tensor is: a linear ``wq`` becomes ``wq.qweight``, ``wq.scale`` (``wq.offset`` for
int4, ``wq.bias`` when it had one); routed experts hold ``experts.w_gate_up.qweight`` and so on. The kernels come
from ``smoe.kernels`` (``kernels.quantized``): the experts' under the MoE layer's backend, the linears' under
``auto``; they compute in fp32 whatever the activations' dtype. A backward through a quantised weight raises: these
modules are for generation and evaluation, not training.

Legend: B rows, I inputs, O outputs, R rows sorted by expert.
"""

from __future__ import annotations

import torch
from torch import nn

from smoe import kernels
from smoe.config import QuantConfig
from smoe.kernels.qweight import QWeight
from smoe.moe.dispatch import Routed
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
    """``RoutedExperts``' seam (rows sorted by expert in, rows out) over quantised ``w_gate_up`` and ``w_down``,
    computed by the quantised kernels of the layer's backend (``smoe.kernels.select(..., quantized=True)``; a
    request for row independence gets fixed-shape tiles where the kernels do not keep it). Where those kernels
    start from the unsorted tokens (``tokens``: the C++ ones), ``run`` hands them over, and the layer's sort, gather
    and combine are skipped."""

    def __init__(self, experts: RoutedExperts, config: QuantConfig):
        super().__init__()
        self.activation = experts.activation
        self.w_gate_up = QuantizedTensor(quantize_weight(experts.w_gate_up, config))
        self.w_down = QuantizedTensor(quantize_weight(experts.w_down, config))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor, backend: str | kernels.BackendRequest = "auto"
                ) -> torch.Tensor:
        fn = kernels.quantized(backend, x_RD.device).experts
        y_RD = fn(x_RD.float(), counts_E, self.w_gate_up.value(), self.w_down.value(), self.activation)
        return inference_only(y_RD.to(x_RD.dtype), x_RD)

    def rows_independent(self, device: torch.device) -> bool:
        return kernels.quantized("auto", device).row_independent

    def run(self, x_ND: torch.Tensor, routed: Routed, backend: str | kernels.BackendRequest = "auto"
            ) -> torch.Tensor:
        entry = kernels.quantized(backend, x_ND.device)
        if not routed.hands_over(entry):
            return super().run(x_ND, routed, backend)
        y_ND = entry.tokens(_as(x_ND, torch.float32), routed.assignments(entry), self.w_gate_up.value(),
                            self.w_down.value(), self.activation)
        return inference_only(_as(y_ND, x_ND.dtype), x_ND)


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
            if isinstance(child, Experts) and not isinstance(child, (RoutedExperts, QuantizedExperts)):
                raise ValueError(f"quantization: {parent_name}.{name} is {type(child).__name__}, whose weights are not "
                                 "in memory to quantise; quantise the checkpoint instead (smoe convert --quantize), "
                                 "then load that")
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
