"""Data parallelism over the ``("dp", "ep")`` mesh: each rank's slice of the global batch, gradient averaging
after backward, the global gradient norm, and step statistics reduced over ranks.

Gradients are averaged by an explicit all-reduce once per optimizer step, after all micro-batches, rather than by
DDP or FSDP2: expert tensors need a different group than the rest (their shard's DP replicas, not the world), which
DDP cannot express for part of a module without hiding those parameters from it, and FSDP2's CPU/gloo path would
shard what is small enough to replicate. One flat all-reduce per group is exact and easy to test; it gives up
overlapping communication with the backward pass, which is what DDP/FSDP2 would buy on a GPU cluster.

Legend: B global batch rows, T sequence, G micro-batches (grad_accum), W ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from smoe.parallel.expert_parallel import ExpertParallelExperts


def local_rows(x_BT: torch.Tensor, mesh: DeviceMesh, grad_accum: int) -> torch.Tensor:
    """This rank's rows of a global batch: its 1/W share of every micro-batch, so micro-batch j of every rank
    together is exactly micro-batch j of a single process (same tokens in each balance statistic)."""
    B, W = x_BT.shape[0], mesh.size()
    x_GWXT = x_BT.view(grad_accum, W, B // (grad_accum * W), *x_BT.shape[1:])
    return x_GWXT[:, dist.get_rank()].reshape(-1, *x_BT.shape[1:])


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated, expert-sharded) trainable parameters."""
    sharded = {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in sharded], [p for p in params if id(p) in sharded]


def sync_gradients(model: nn.Module, mesh: DeviceMesh) -> None:
    """Make every gradient the gradient of the mean loss over all ranks' tokens.

    Replicated parameters: the sum over all W ranks, divided by W. Expert shards: each already holds the gradient
    of every EP peer's tokens (the all-to-all's backward brought it), so it is summed over its DP replicas only and
    divided by the same W."""
    replicated, sharded = _split_parameters(model)
    for params, group in ((replicated, None), (sharded, mesh["dp"].get_group())):
        if not params:
            continue
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= mesh.size()
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p)


def clip_gradients(model: nn.Module, mesh: DeviceMesh, max_norm: float) -> float:
    """Clip by the norm of the whole model's gradient (expert shards summed over the EP group); returns that norm,
    the same on every rank. ``max_norm`` 0 only measures."""
    replicated, sharded = _split_parameters(model)
    norm_sq = torch.nn.utils.get_total_norm([p.grad for p in replicated]).double() ** 2
    sharded_sq = torch.nn.utils.get_total_norm([p.grad for p in sharded]).double() ** 2 if sharded else None
    if sharded_sq is not None:
        dist.all_reduce(sharded_sq, group=mesh["ep"].get_group())
        norm_sq = norm_sq + sharded_sq
    total = norm_sq.sqrt().float()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(replicated + sharded, max_norm, total)
    return float(total)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum or mean over every rank; returns the tensor."""
    dist.all_reduce(tensor)
    if op == "mean":
        tensor /= dist.get_world_size()
    return tensor
