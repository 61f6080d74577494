"""Process groups and the device mesh from torchrun's environment, the layout checks that run before any work,
and the translation of a failed or timed-out collective into one clear error.

The mesh is ``("dp", "ep")`` with shape ``(dp, ep)``: rank ``r`` is EP rank ``r % ep`` of DP replica ``r // ep``.
Every rank routes different tokens (EP ranks are data-parallel for everything but the experts), so the global batch
is split over all ``dp * ep`` ranks.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from smoe.config import ModelConfig
from smoe.errors import TrainingError


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(config: ModelConfig, ep: int, dp: int | None, world: int, batch_size: int, grad_accum: int) -> int:
    """Refuse a layout that cannot run, naming the flag and the rule; returns the resolved ``dp``."""
    for name, value in (("--ep", ep), ("--dp", dp)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if dp is None:
        dp = max(1, world // ep)
    if ep * dp != world:
        hint = f"; launch with torchrun --nproc-per-node {ep * dp} -m smoe train ..." if world == 1 else ""
        raise ValueError(f"ep {ep} x `dp` {dp}: needs {ep * dp} processes, got {world}{hint}")
    if ep > 1 and config.moe is None:
        raise ValueError(f"ep {ep}: the model has no routed experts to shard")
    if config.moe is not None and config.moe.n_routed_experts % ep:
        raise ValueError(f"ep {ep}: must divide moe.n_routed_experts ({config.moe.n_routed_experts})")
    if batch_size % (grad_accum * world):
        raise ValueError(f"batch_size {batch_size}: must be divisible by `grad_accum` x processes "
                         f"({grad_accum} x {world} = {grad_accum * world}); it is the global batch")
    return dp


def init_distributed(ep: int, dp: int, timeout_s: float, device: torch.device) -> DeviceMesh | None:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) and build the ``("dp", "ep")`` mesh; None for a
    single process. Every collective, initialisation included, fails after ``timeout_s`` seconds instead of
    waiting forever for a rank that died or hung."""
    if ep * dp == 1:
        return None
    if not dist.is_available():
        raise ValueError("ep: this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a bare ``cuda`` means this process's GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def is_main_process() -> bool:
    """Rank 0, or a single process: the one that writes run.json, metrics and progress (torchrun's RANK once the
    process group is gone)."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


@contextlib.contextmanager
def collective_errors(timeout_s: float):
    """Turn a collective that failed (a peer's connection closed) or timed out into one TrainingError."""
    try:
        yield
    except TrainingError:
        raise
    except RuntimeError as err:
        if not dist.is_initialized():
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"rank {dist.get_rank()}: a collective with the other ranks failed or did not finish "
                            f"within `dist_timeout` {timeout_s:g} s; another rank has died or hung ({first})"
                            ) from err
