"""Hardware for the cost model (smoe.cost): vendor datasheet profiles, and this machine as measured.

Peaks are dense: NVIDIA's datasheets print tensor-core FLOPs with 2:4 sparsity (footnoted), which are halved here;
AMD's MI300X data sheet prints both. Interconnects are the per-device figure of the datasheet, which counts both
directions; ``link_bandwidth`` is half of it: what one device sends while it receives as much, as an all-to-all
does. Capacities are the datasheets' decimal GB.

torch is imported only inside the measurements, so the table and the cost model stay free of it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

MEASURED_CPU = "cpu-measured"


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bandwidth: float  # bytes/s
    # dense FLOP/s of a matmul in each dtype the hardware multiplies natively (this CPU as smoe.quant.measure
    # profiles it: also smoe's int8 / int4 kernels, which widen int8 weights to fp32 and multiply int4 ones by
    # int8 activations)
    peak_flops: dict[str, float]
    base_dtype: str  # activations, and matmuls of weight formats without a peak of their own
    memory_bytes: float
    link_bandwidth: float | None  # bytes/s one device sends to the others (one direction); None: a single device
    source: str


def _hopper(name: str, bandwidth: float, memory: float, source: str) -> Hardware:
    # H100 SXM and H200 share the compute: bf16 1,979, fp8 and int8 3,958, all with sparsity; fp32 67 TF/s.
    # NVLink 4: 900 GB/s per GPU.
    return Hardware(name, bandwidth, {"fp32": 67e12, "bf16": 989.5e12, "fp8": 1979e12, "int8": 1979e12}, "bf16",
                    memory, 450e9, source)


HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    _hopper("h100-sxm", 3.35e12, 80e9, "NVIDIA H100 Tensor Core GPU datasheet, SXM column: 3.35 TB/s HBM3, 80 GB"),
    _hopper("h200", 4.8e12, 141e9, "NVIDIA H200 Tensor Core GPU datasheet, SXM column: 4.8 TB/s HBM3e, 141 GB"),
    Hardware("a100-80gb", 2.039e12, {"fp32": 19.5e12, "bf16": 312e12, "int8": 624e12}, "bf16", 80e9, 300e9,
             "NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: 2,039 GB/s HBM2e, bf16 312 (624 sparse), "
             "int8 624 (1,248 sparse), fp32 19.5 TF/s, NVLink 600 GB/s; no fp8"),
    Hardware("b200", 7.7e12, {"fp32": 75e12, "bf16": 2.25e15, "fp8": 4.5e15, "int8": 4.5e15}, "bf16", 180e9, 900e9,
             "NVIDIA HGX B200 datasheet, per GPU: 180 GB HBM3e at 7.7 TB/s, bf16 4.5 PF/s, fp8 and int8 9 "
             "(sparse), fp32 75 TF/s, NVLink 5 1.8 TB/s"),
    Hardware("mi300x", 5.3e12, {"fp32": 163.4e12, "bf16": 1307.4e12, "fp8": 2614.9e12, "int8": 2614.9e12}, "bf16",
             192e9, 448e9, "AMD Instinct MI300X data sheet: 192 GB HBM3 at 5.3 TB/s, dense bf16 1,307.4, fp8 and "
             "int8 2,614.9, fp32 matrix 163.4 TF/s, Infinity Fabric 7 links x 128 GB/s = 896 GB/s"),
    Hardware("l4", 300e9, {"fp32": 30.3e12, "bf16": 121e12, "fp8": 242e12, "int8": 242e12}, "bf16", 24e9, None,
             "NVIDIA L4 Tensor Core GPU datasheet: 24 GB GDDR6 at 300 GB/s, bf16 242, fp8 and int8 485 TF/s with "
             "sparsity, fp32 30.3 TF/s; PCIe"),
    Hardware("rtx-4090", 1008e9, {"fp32": 82.6e12, "bf16": 165.2e12, "fp8": 330.3e12, "int8": 330.3e12}, "bf16",
             24e9, None, "NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 24 GB GDDR6X at 1,008 GB/s, "
                         "bf16 with fp32 accumulate 165.2 TF/s dense, fp8 and int8 330.3 dense, fp32 82.6; PCIe"),
    Hardware("desktop-ddr5", 89.6e9, {"fp32": 2.304e12}, "fp32", 64e9, None,
             "a typical desktop: JEDEC DDR5-5600 in 2 channels of 8 bytes = 89.6 GB/s, 64 GB; AMD Ryzen 9 7950X "
             "product page (16 cores, 4.5 GHz base) x 32 fp32 FLOP/cycle (Zen 4: two 256-bit FMA pipes)"),
)}


def hardware_names() -> list[str]:
    return [*HARDWARE, MEASURED_CPU]


# What torch.cuda.get_device_name() contains, for each profile a GPU can be recognised by.
_DEVICE_NAMES = {"H100": "h100-sxm", "H200": "h200", "A100": "a100-80gb", "B200": "b200", "MI300X": "mi300x",
                 "L4": "l4", "4090": "rtx-4090"}


def profile_of(device_name: str) -> Hardware | None:
    """The datasheet profile of a GPU by its device name (``torch.cuda.get_device_name()``), or None."""
    return next((HARDWARE[profile] for key, profile in _DEVICE_NAMES.items() if key in device_name), None)


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Bytes/s of a large fp32 tensor copy on this CPU, counting the read and the write (best of ``repeats``)."""
    import torch

    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * n_bytes / _best_seconds(lambda: dst.copy_(src), repeats)


def matmul_flops(dtype: str = "fp32", size: int = 512, seconds: float = 0.1, windows: int = 5) -> float:
    """FLOP/s of a square ``size`` matmul in ``dtype`` (fp32 or bf16) on this CPU: the best of ``windows`` equal
    windows of ``seconds`` in all, after one warm-up window. Other tenants and frequency ramps only ever slow a
    window, so the best is the steadiest estimate of the peak (a single window varied 2x between the runs of a
    suite trained two at a time)."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(size, size, dtype=torch_dtype), torch.randn(size, size, dtype=torch_dtype)
    return best_rate(lambda: a @ b, 2 * size**3, seconds, windows)


def best_rate(fn: Callable[[], object], work: float, seconds: float, windows: int) -> float:
    """``work`` per call of ``fn`` over the time a call takes, in the best of ``windows`` equal windows of
    ``seconds`` in all, after one warm-up window."""
    best = 0.0
    for window in range(windows + 1):
        reps, start = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - start < seconds / windows:
            fn()
            reps += 1
        if window:  # the first window warms up
            best = max(best, work * reps / (time.perf_counter() - start))
    return best


def measure_cpu() -> Hardware:
    """This machine as measured (about a second): copy bandwidth, an fp32 matmul peak at torch's thread count, the
    physical memory. fp32 is its base dtype: other formats are priced at the fp32 peak (smoe.quant.measure adds
    the rates of smoe's quantised kernels)."""
    import torch

    bandwidth, flops = copy_bandwidth(), matmul_flops("fp32", size=1024, seconds=0.3)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(MEASURED_CPU, bandwidth, {"fp32": flops}, "fp32", memory, None,
                    f"measured: 256 MiB tensor copy (read + write) and a 1024^3 fp32 matmul, "
                    f"{torch.get_num_threads()} threads")
