"""The ``cpp`` backend of ``smoe.kernels.quantized``: weight-only int8 / int4 kernels in C++ (cpp_quant.cpp, whose
header says how they work), compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja;
about 10 s once, then loaded from torch's extension cache) and registered as ``torch.ops.smoe_quant``.

Why a compiled op (docs/quantization.md has the numbers): its loops run on torch's own thread pool
(``at::parallel_for``), so several threads speed up decode instead of competing with the next torch op for the
cores as numba's pool does; it prefetches the next channels' weights, which doubles the rate at which one thread
streams them from memory; and it unpacks int4 nibbles in registers instead of into a scratch buffer.

``build()`` compiles or loads it and returns None, or says why it cannot (no compiler, a failed build): then
``auto`` runs numba or the reference (smoe.kernels.quantized).

Legend: B rows, I inputs, O outputs, R rows sorted by expert, D model dim, E experts.
"""

from __future__ import annotations

import functools
import hashlib
import time
import warnings
from pathlib import Path

import torch

from smoe.kernels.registry import QuantizedKernels, register_quantized
from smoe.quant.format import QWeight

SOURCE = Path(__file__).with_suffix(".cpp")


@functools.cache
def build() -> str | None:
    """Compile (or load the cached build of) the kernels for this CPU; None when they are ready, else the reason
    they are not. AVX2 + FMA builds get the vector tiles; any other CPU the portable loops."""
    from torch.utils import cpp_extension

    vector = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    # No contraction of the scalar maths into FMAs, which the compiler would choose per tile shape: every tile then
    # computes a row bitwise alike, so a row's result never depends on the rows beside it (row_independent).
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", *(["-mavx2", "-mfma"] if vector else [])]
    try:
        # Named by the source's hash: checkouts of different versions never rebuild or replace each other's library.
        name = f"smoe_quant_{'avx2' if vector else 'portable'}_{hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]}"
        _clear_stale_lock(name)
        cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False)
    except (OSError, RuntimeError, ImportError) as err:  # no source, compiler or ninja, or the build failed
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else err}"
    _register_shapes()
    return None


# A build takes seconds to a minute; a lock file older than this was left by a build that was killed.
STALE_LOCK_SECONDS = 600


def _clear_stale_lock(name: str) -> None:
    """Remove the lock file a killed build left in the extension's build directory. torch waits for it to go away
    and would otherwise wait forever (the directory is torch's: ``TORCH_EXTENSIONS_DIR`` or its cache)."""
    from torch.utils import cpp_extension

    build_directory = getattr(cpp_extension, "_get_build_directory", None)  # private: absent in some torch, skip
    if build_directory is None:
        return
    lock = Path(build_directory(name, verbose=False)) / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        warnings.warn(f"quantization: removing {lock}, left by a build of the C++ kernels that did not finish",
                      stacklevel=3)
        lock.unlink(missing_ok=True)


def _register_shapes() -> None:
    """Output shapes of the ops for tracing (torch.compile, fake tensors); the kernels stay opaque to it."""
    @torch.library.register_fake("smoe_quant::linear")
    def _(x, q, scale, offset, group):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("smoe_quant::experts")
    def _(x, offs, gu_q, gu_s, gu_z, gu_group, down_q, down_s, down_z, down_group, gelu):
        return x.new_empty(x.shape[0], down_q.shape[1])

    @torch.library.register_fake("smoe_quant::moe")
    def _(x, ids, weights, gu_q, gu_s, gu_z, gu_group, down_q, down_s, down_z, down_group, gelu):
        return x.new_empty(x.shape[0], down_q.shape[1])


def _offset(w: QWeight) -> tuple[torch.Tensor | None, int]:
    return w.offset, w.group_size or 0


def linear(x_BI: torch.Tensor, w: QWeight) -> torch.Tensor:
    return torch.ops.smoe_quant.linear(x_BI.contiguous(), w.qweight, w.scale, *_offset(w))


def experts(x_RD: torch.Tensor, counts_E: torch.Tensor, w_gate_up: QWeight, w_down: QWeight, activation: str
            ) -> torch.Tensor:
    offs = torch.zeros(counts_E.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts_E.cpu(), 0, out=offs[1:])
    return torch.ops.smoe_quant.experts(x_RD.contiguous(), offs, w_gate_up.qweight, w_gate_up.scale,
                                        *_offset(w_gate_up), w_down.qweight, w_down.scale, *_offset(w_down),
                                        activation == "gelu")


def moe(x_ND: torch.Tensor, expert_ids_A: torch.Tensor, weights_A: torch.Tensor, w_gate_up: QWeight, w_down: QWeight,
        activation: str) -> torch.Tensor:
    weights_A = weights_A.to(torch.float32).contiguous()
    return torch.ops.smoe_quant.moe(x_ND.contiguous(), expert_ids_A.contiguous(), weights_A, w_gate_up.qweight,
                                    w_gate_up.scale, *_offset(w_gate_up), w_down.qweight, w_down.scale,
                                    *_offset(w_down), activation == "gelu")


register_quantized("cpp", QuantizedKernels(linear, experts, moe, row_independent=True))
