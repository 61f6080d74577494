"""Where a process computes and in what precision: a device name resolved (``auto``: CUDA when present), a training
precision resolved for a device (``auto``: bf16 autocast where it is faster than fp32), and the autocast context
for it. Training, evaluation, generation, serving and the command line all start here, so it sits below them all."""

from __future__ import annotations

import contextlib

import torch

from smoe import kernels


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is available")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` (``auto``, ``bf16`` or ``fp32``) as training runs it on ``device``: ``auto`` is bf16 autocast
    where the device multiplies bf16 natively and faster than fp32 (a CUDA GPU with bf16, a CPU with AMX tiles), else
    fp32; the measurements behind the rule are in docs/training.md and docs/benchmarks.md."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if device.type == "cpu" and amx and kernels.native_low_precision(torch.bfloat16) else "fp32"


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
