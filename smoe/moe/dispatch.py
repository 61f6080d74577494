"""Sort-based dispatch: group token-expert assignments by expert, drop those over capacity, and combine back.

Legend: N tokens, D model dim, E experts, K assignments per token, A assignments, R kept assignments (rows the
experts compute).

``Routed`` is what the layer hands its experts (``Experts.run``): the routing, the dispatch's settings, and the sort,
made on first use. ``gather`` and ``combine`` are what the experts' seam calls. For token-choice routing (assignments in
token-major order, A = N*K) they are autograd functions whose backward reuses the forward's permutation: each token's K
rows are found through ``row_A`` (the inverse permutation), so both directions are an ``index_select`` plus a sum over
K, with no ``index_add``/``index_put`` accumulation and no (tokens x experts) mask. ``gather_reference`` and
``combine_reference`` are the plain-autograd spec they are tested against, and serve expert choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from smoe.config import CapacityPriority
from smoe.kernels import Assignments, Kernels
from smoe.moe.router import Routing


@dataclass(frozen=True)
class Dispatch:
    order_R: torch.Tensor  # assignment index of each expert row, rows sorted by expert
    row_A: torch.Tensor  # inverse of order_R: the row of each assignment, R for a dropped one
    counts_E: torch.Tensor  # int64 rows per expert, after capacity: what the experts compute
    load_E: torch.Tensor  # int64 assignments routed to each expert, before capacity: the expert's demand
    n_dropped: torch.Tensor  # assignments dropped over capacity (0-dim int64)


def token_choice_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """GShard/Switch expert capacity: capacity_factor x the balanced share T*K/E, rounded up."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def permute(expert_ids_A: torch.Tensor, n_experts: int, capacity: int | None, top_k: int = 1,
            priority: CapacityPriority = "choice", keep_A: torch.Tensor | None = None) -> Dispatch:
    """Stable sort by expert, so within an expert the rows are in token order.

    With a ``capacity``, an expert keeps its first ``capacity`` assignments in ``priority`` order (MoEConfig's
    capacity_priority): "choice" ranks every token's first choice before any second choice, "token" ranks by token.
    Token-choice assignments are token-major with ``top_k`` per token (row t*K + j); at top_k 1 both agree.
    ``keep_A`` (bool) leaves out the assignments of padding tokens: no row, no load, no capacity taken.
    """
    A = expert_ids_A.numel()
    if keep_A is not None:
        # Padding goes to a bucket past the last expert, which sorts last and is never computed.
        expert_ids_A = expert_ids_A.masked_fill(~keep_A, n_experts)
    order_A = torch.argsort(expert_ids_A, stable=True)
    # A scatter-add, not bincount: Inductor compiles it into the graph (bincount would be an opaque call).
    counts_E = expert_ids_A.new_zeros(n_experts + 1).scatter_add_(0, expert_ids_A, torch.ones_like(expert_ids_A))
    counts_E = counts_E[:n_experts]
    if capacity is None:
        order_R = order_A if keep_A is None else order_A[: int(counts_E.sum())]
        return Dispatch(order_R, _inverse(order_R, A), counts_E, counts_E, counts_E.new_zeros(()))
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    by_expert_A = order_A  # assignments by expert, in the order they claim a slot
    if priority == "choice" and top_k > 1:
        choice_major_A = torch.arange(A, device=expert_ids_A.device).view(-1, top_k).t().reshape(-1)
        by_expert_A = choice_major_A[torch.argsort(expert_ids_A[choice_major_A], stable=True)]
    by_expert_ids = expert_ids_A[by_expert_A]
    real = by_expert_ids < n_experts
    rank_A = torch.arange(A, device=expert_ids_A.device) - starts_E[by_expert_ids.clamp(max=n_experts - 1)]
    kept_A = torch.empty(A, dtype=torch.bool, device=expert_ids_A.device).scatter_(0, by_expert_A,
                                                                                  (rank_A < capacity) & real)
    order_R = order_A[kept_A[order_A]]  # the kept rows, still in token order within each expert
    kept_counts_E = counts_E.clamp(max=capacity)
    return Dispatch(order_R, _inverse(order_R, A), kept_counts_E, counts_E, counts_E.sum() - kept_counts_E.sum())


def _inverse(order_R: torch.Tensor, n_assignments: int) -> torch.Tensor:
    R = order_R.numel()
    row_A = order_R.new_full((n_assignments,), R)
    return row_A.scatter_(0, order_R, torch.arange(R, device=order_R.device))


def _rows_by_assignment(v_R: torch.Tensor, row_A: torch.Tensor) -> torch.Tensor:
    """v_R's rows in assignment order; a dropped assignment (row R) reads zeros."""
    if row_A.numel() > v_R.shape[0]:  # capacity may have dropped some: give row R a home (shape test, no sync)
        v_R = torch.cat([v_R, v_R.new_zeros(1, *v_R.shape[1:])])
    return v_R.index_select(0, row_A)


class _GatherTokenMajor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, token_ids_R, row_A, top_k):
        ctx.save_for_backward(row_A)
        ctx.top_k = top_k
        return x_ND.index_select(0, token_ids_R)

    @staticmethod
    def backward(ctx, dx_RD):
        (row_A,) = ctx.saved_tensors
        dx_AD = _rows_by_assignment(dx_RD, row_A)
        return dx_AD.view(-1, ctx.top_k, dx_AD.shape[-1]).sum(1), None, None, None


class _CombineTokenMajor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, weights_A, token_ids_R, order_R, row_A, top_k):
        weights_R = weights_A.index_select(0, order_R)
        y_NKD = _rows_by_assignment(y_RD * weights_R[:, None].to(y_RD.dtype), row_A).view(-1, top_k, y_RD.shape[-1])
        ctx.save_for_backward(y_RD, weights_R, token_ids_R, row_A)
        return y_NKD.sum(1)

    @staticmethod
    def backward(ctx, dy_ND):
        y_RD, weights_R, token_ids_R, row_A = ctx.saved_tensors
        dy_RD = dy_ND.index_select(0, token_ids_R)  # each row's token gradient, in expert order
        d_weights_A = None
        if ctx.needs_input_grad[1]:
            d_weights_R = (dy_RD.float() * y_RD.float()).sum(-1)
            d_weights_A = _rows_by_assignment(d_weights_R, row_A)
        return dy_RD * weights_R[:, None].to(dy_RD.dtype), d_weights_A, None, None, None, None


def gather(x_ND: torch.Tensor, routing: Routing, dispatch: Dispatch) -> torch.Tensor:
    """The experts' input rows: each row's token, in expert order."""
    if not routing.token_major:
        return gather_reference(x_ND, routing, dispatch)
    token_ids_R = routing.token_ids_A.index_select(0, dispatch.order_R)
    return _GatherTokenMajor.apply(x_ND, token_ids_R, dispatch.row_A, _top_k(routing, x_ND.shape[0]))


def combine(y_RD: torch.Tensor, routing: Routing, dispatch: Dispatch, n_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs; dropped assignments contribute nothing."""
    if not routing.token_major:
        return combine_reference(y_RD, routing, dispatch, n_tokens)
    token_ids_R = routing.token_ids_A.index_select(0, dispatch.order_R)
    return _CombineTokenMajor.apply(y_RD, routing.weights_A, token_ids_R, dispatch.order_R, dispatch.row_A,
                                    _top_k(routing, n_tokens))


def _top_k(routing: Routing, n_tokens: int) -> int:
    return routing.expert_ids_A.numel() // max(n_tokens, 1)


def gather_reference(x_ND: torch.Tensor, routing: Routing, dispatch: Dispatch) -> torch.Tensor:
    """Each expert row's token, in expert order (backward: an index_add over tokens)."""
    return x_ND.index_select(0, routing.token_ids_A[dispatch.order_R])


def combine_reference(y_RD: torch.Tensor, routing: Routing, dispatch: Dispatch, n_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs with plain autograd: index_copy (token choice) or index_add."""
    A, D = routing.expert_ids_A.numel(), y_RD.shape[-1]
    weights_R = routing.weights_A[dispatch.order_R].to(y_RD.dtype)
    weighted_RD = y_RD * weights_R[:, None]
    if routing.token_major:
        # Un-permute into token-major order and sum each token's K rows: a gather-free reshape, no atomics.
        out_AD = weighted_RD.new_zeros(A, D).index_copy(0, dispatch.order_R, weighted_RD)
        return out_AD.view(n_tokens, A // n_tokens, D).sum(1)
    token_ids_R = routing.token_ids_A[dispatch.order_R]
    return weighted_RD.new_zeros(n_tokens, D).index_add(0, token_ids_R, weighted_RD)


@dataclass(eq=False)
class Routed:
    """One call's routing as the experts compute it: the router's ``Routing`` and the dispatch's settings. The sort
    by expert (``dispatch()``) is made once, on first use, so that experts whose kernel groups the tokens itself
    skip it where nothing else needs it."""

    routing: Routing
    n_tokens: int
    n_experts: int
    top_k: int
    capacity: int | None = None
    priority: CapacityPriority = "choice"
    keep_A: torch.Tensor | None = None  # bool: the assignments of real tokens (None: every token is real)
    stats: bool = True  # the caller reads the sort's statistics (drops, balance) whatever the experts do
    _dispatch: Dispatch | None = field(default=None, init=False, repr=False)

    def dispatch(self) -> Dispatch:
        if self._dispatch is None:
            self._dispatch = permute(self.routing.expert_ids_A, self.n_experts, self.capacity, self.top_k,
                                     self.priority, self.keep_A)
        return self._dispatch

    def load(self) -> torch.Tensor:
        """Assignments routed to each expert (padding left out, before capacity drops): the sort's ``load_E``, or,
        where nothing sorted, the same count in a static shape (a compiled decode step returns it)."""
        if self._dispatch is not None:
            return self._dispatch.load_E
        ids_A = self.routing.expert_ids_A
        real_A = torch.ones_like(ids_A) if self.keep_A is None else self.keep_A.long()
        return ids_A.new_zeros(self.n_experts).scatter_add_(0, ids_A, real_A)

    def gather(self, x_ND: torch.Tensor) -> torch.Tensor:
        return gather(x_ND, self.routing, self.dispatch())

    def combine(self, y_RD: torch.Tensor) -> torch.Tensor:
        return combine(y_RD, self.routing, self.dispatch(), self.n_tokens)

    def hands_over(self, kernels: Kernels) -> bool:
        """Whether ``kernels``' ``tokens`` entry computes this call from the unsorted tokens: token-choice routing
        only, and a kernel that groups the tokens itself only where nothing else sorts them (no statistics, no
        capacity), so that they are never sorted twice."""
        if kernels.tokens is None or not self.routing.token_major:
            return False
        return not kernels.sorts_tokens or not (self.stats or self.capacity is not None)

    def assignments(self, kernels: Kernels) -> Assignments:
        """What ``kernels``' ``tokens`` entry is told of the routing: padding and assignments dropped over capacity
        route nowhere (id -1), and a kernel that does not sort gets the sort."""
        ids_A = self.routing.expert_ids_A
        sort = self.dispatch() if not kernels.sorts_tokens or self.capacity is not None else None
        if sort is not None and (self.keep_A is not None or self.capacity is not None):
            ids_A = ids_A.masked_fill(sort.row_A == sort.order_R.numel(), -1)
        elif self.keep_A is not None:
            ids_A = ids_A.masked_fill(~self.keep_A, -1)
        if sort is None:
            return Assignments(ids_A, self.routing.weights_A)
        return Assignments(ids_A, self.routing.weights_A, sort.order_R, sort.counts_E)
