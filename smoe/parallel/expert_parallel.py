"""Expert parallelism: routed experts sharded along the expert dimension over an EP group, rows moved by all-to-all.

``apply_expert_parallel(model, mesh)`` swaps each MoE layer's ``RoutedExperts`` for an ``ExpertParallelExperts`` holding
this rank's contiguous slice of experts. Its ``run`` is the seam (``Experts.run``): it calls ``experts(x_RD, counts_E,
backend)`` on the rows sorted by global expert id, so routing, dispatch and combine are untouched and the model stays
single-device code. Forward: the per-expert counts go to their owners (all-to-all), then the rows (all-to-all with
uneven splits), the received rows are regrouped by local expert, the same expert backend runs on the shard, and the
outputs travel back by the reverse exchange. Autograd runs the same exchanges in reverse.

Legend: E routed experts, P EP ranks, L = E / P local experts, R rows this rank routed (sorted by global expert),
S rows this rank's experts receive, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from smoe.config import MoEConfig
from smoe.moe.experts import Experts, RoutedExperts
from smoe.moe.layer import MoELayer


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; its gradient is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Send ``x``'s rows ``in_splits[p]`` to rank p, receive ``out_splits[p]`` rows from rank p; differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(RoutedExperts):
    """This rank's experts ``[expert_start, expert_start + L)`` of ``n_experts``; the forward has the interface
    of ``RoutedExperts`` (all ``n_experts`` counts, rows sorted by global expert) and returns this rank's rows."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, activation: str, group):
        P, rank = dist.get_world_size(group), dist.get_rank(group)
        if n_experts % P:
            raise ValueError(f"ep {P}: must divide moe.n_routed_experts ({n_experts})")
        super().__init__(n_experts // P, dim, hidden_dim, activation)
        self.n_experts, self.group, self.ep_size = n_experts, group, P
        self.expert_start = rank * (n_experts // P)

    @classmethod
    def from_experts(cls, experts: RoutedExperts, group) -> "ExpertParallelExperts":
        E, twoF, D = experts.w_gate_up.shape
        with torch.device("meta"):
            shard = cls(E, D, twoF // 2, experts.activation, group)
        rows = slice(shard.expert_start, shard.expert_start + E // shard.ep_size)
        shard.w_gate_up = nn.Parameter(experts.w_gate_up.detach()[rows].clone())
        shard.w_down = nn.Parameter(experts.w_down.detach()[rows].clone())
        return shard

    # The seam only, never a kernel from the unsorted tokens: the rows must be sorted and sent to their experts'
    # ranks first.
    run = Experts.run

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        P, L = self.ep_size, self.w_gate_up.shape[0]
        device_type = x_RD.device.type
        if torch.is_autocast_enabled(device_type):
            x_RD = x_RD.to(torch.get_autocast_dtype(device_type))  # the low dtype is what travels
        send_PL = counts_E.view(P, L).contiguous()
        recv_PL = torch.empty_like(send_PL)
        dist.all_to_all_single(recv_PL, send_PL, group=self.group)
        send, recv = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()  # one host sync: split sizes are host ints
        x_SD = all_to_all(x_RD, recv, send, self.group)
        # Rows arrive grouped by source rank, then local expert; the backend wants them grouped by local expert.
        local_ids_S = torch.arange(L, device=x_SD.device).repeat(P).repeat_interleave(recv_PL.flatten())
        order_S = torch.argsort(local_ids_S, stable=True)
        y_sorted_SD = super().forward(x_SD.index_select(0, order_S), recv_PL.sum(0), backend)
        y_SD = y_sorted_SD.new_zeros(y_sorted_SD.shape).index_copy(0, order_S, y_sorted_SD)
        return all_to_all(y_SD, send, recv, self.group)


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard the routed experts of every MoELayer in ``model`` (a Transformer, or a layer) over the mesh's ``ep``
    dimension (the whole mesh if it is 1-D), and make the balance statistics count the tokens of every rank in the
    mesh, since each rank routes different tokens. The mesh must span the default process group. Modifies ``model``
    in place and returns it; build it identically on every rank (same seed) first, so each rank slices the same
    global weights."""
    if mesh.size() != dist.get_world_size():
        raise ValueError(f"mesh: must span all {dist.get_world_size()} ranks, got {mesh.size()}")
    ep_mesh = mesh["ep"] if mesh.ndim > 1 else mesh
    ep_group = ep_mesh.get_group()
    for layer in [m for m in model.modules() if isinstance(m, MoELayer)]:
        if mesh.size() > 1:
            layer.load_reduction = _sum_over_world
        if ep_mesh.size() > 1:
            layer.experts = ExpertParallelExperts.from_experts(layer.experts, ep_group)
    return model


def _sum_over_world(load_E: torch.Tensor) -> torch.Tensor:
    total_E = load_E.clone()
    dist.all_reduce(total_E)
    return total_E


def expert_shard_ranges(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """State-dict names of the expert tensors this rank holds a slice of, with the slice's (start, stop, total)
    rows: what a sharded checkpoint records so that it reassembles at any EP size. Empty for a model without EP."""
    ranges = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            rows = (module.expert_start, module.expert_start + module.w_gate_up.shape[0], module.n_experts)
            for param in ("w_gate_up", "w_down"):
                ranges[f"{name}.{param}"] = rows
    return ranges


def max_ranks_per_token(moe: MoEConfig, ep: int) -> int:
    """The most EP ranks one token's routed experts can live on: group-limited routing maps its groups (devices or
    nodes) onto the contiguous expert shards, so a token reaches only the ranks of its ``topk_group`` groups."""
    E, G = moe.n_routed_experts, moe.n_group
    if E % ep:
        raise ValueError(f"ep {ep}: must divide moe.n_routed_experts ({E})")
    per_rank, per_group = E // ep, E // G
    ranks_per_group = sorted(len({e // per_rank for e in range(g * per_group, (g + 1) * per_group)})
                             for g in range(G))
    return min(moe.top_k, ep, sum(ranks_per_group[-moe.topk_group:]))
