"""The MoE FFN layer: route, dispatch to routed experts, combine, add the shared experts.

Legend: B batch, T tokens per sequence, N = B*T tokens, D model dim, E routed experts, K top_k.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from smoe import kernels
from smoe.config import MoEConfig
from smoe.moe import balance
from smoe.moe.dispatch import Routed, token_choice_capacity
from smoe.moe.experts import RoutedExperts
from smoe.moe.router import Router, Routing
from smoe.nn.init import init_weights
from smoe.nn.mlp import MLP


class RouterStatsMode(str, enum.Enum):
    """Which router statistics a forward computes (``MoELayer.forward``'s ``stats``, ``Transformer.forward``'s
    ``router_stats``)."""

    ALL = "all"  # every RouterStats field and the aux loss with its gradient (training)
    LOAD = "load"  # only ``load``, a bincount the dispatch makes anyway (serving's expert counters)
    NONE = "none"  # none (inference, where nothing reads them)

    @classmethod
    def of(cls, value: bool | str | RouterStatsMode) -> RouterStatsMode:
        """The mode an argument names: True is ALL, False is NONE, else a mode or its value."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls.ALL if value else cls.NONE
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"router_stats: True, False or one of {choices}, got {value!r}") from None


@dataclass(frozen=True)
class RouterStats:
    """What one MoE layer reports per forward: values, never globals. All but ``aux_loss`` are detached. With
    ``RouterStatsMode.LOAD`` (serving's expert counters) only ``load`` is computed and the rest are None."""

    load: torch.Tensor  # (E,) int64 assignments routed to each expert (before capacity drops)
    dropped: torch.Tensor | None = None  # () int64 assignments dropped over capacity
    aux_loss: torch.Tensor | None = None  # () weighted sum of this layer's balance and z terms, with gradient
    load_balance: torch.Tensor | None = None  # () Switch aux value E * sum f_i P_i (1.0 = uniform), any strategy
    z_loss: torch.Tensor | None = None  # () router z-loss value
    entropy: torch.Tensor | None = None  # () mean router entropy in nats


def random_second_expert(weights_A: torch.Tensor) -> torch.Tensor:
    """GShard §2.2 (Algorithm 1): which top-2 assignments to dispatch when the second expert is kept only with
    probability min(1, 2 g2), g2 = w2 / (w1 + w2). Token-major weights (T*2,) in, a bool (T*2,) keep mask out; the
    first choice is always kept. Draws from the global RNG (the training loop seeds it and checkpoints it)."""
    weights_T2 = weights_A.view(-1, 2)
    share_T = weights_T2[:, 1] / (weights_T2.sum(-1) + 1e-20)
    keep_second_T = torch.rand(share_T.shape, device=share_T.device) < 2 * share_T
    return torch.stack([torch.ones_like(keep_second_T), keep_second_T], dim=1).reshape(-1)


class MoELayer(nn.Module):
    """``forward(x)`` takes (B, T, D) or (T, D) and returns ``(y, stats)`` with y shaped like x.

    ``backend`` names the expert kernel, or asks for one (a ``kernels.BackendRequest``; see smoe.kernels); it is not
    part of the checkpoint. ``load_reduction``
    maps this layer's per-expert load to the load over every token that shares the balance losses: None (this
    process's tokens are all of them) unless data or expert parallelism sets it (smoe.parallel), so the layer itself
    never reads a world size.
    """

    load_reduction: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Linears smoe.quant leaves in full precision: the shared-expert gate is a single output row.
    keep_full_precision = ("shared_gate",)

    def __init__(self, dim: int, config: MoEConfig, activation: str = "silu", init_std: float = 0.02,
                 backend: str | kernels.BackendRequest = "auto"):
        super().__init__()
        config.validate()
        self.config = config
        self.backend = backend
        self.router = Router(dim, config)
        self.experts = RoutedExperts(config.n_routed_experts, dim, config.expert_dim, activation)
        n_shared = config.n_shared_experts
        # Shared experts are always active, so n of them are exactly one MLP n times as wide.
        self.shared = MLP(dim, n_shared * config.resolved_shared_expert_dim, activation) if n_shared else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if config.shared_expert_gate else None
        init_weights(self, init_std)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None,
                stats: RouterStatsMode | bool | str = RouterStatsMode.ALL, keep: torch.Tensor | None = None,
                backend: str | kernels.BackendRequest | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        """``token_ids`` (the shape of ``x`` without D): what hash routing routes by; other routers ignore them.
        ``stats`` (a ``RouterStatsMode``, or True / False / its value): NONE skips the router statistics and returns
        None; LOAD returns only ``load``. ``keep`` (the shape of ``token_ids``, bool): tokens to route; the others
        (padding) reach no expert. ``backend`` (a name or a ``kernels.BackendRequest``) overrides ``self.backend``
        for this call. The experts get the unsorted tokens (``Experts.run``); the sort by expert is made only where
        something needs it (statistics, capacity, the experts' kernel)."""
        x_BTD = x if x.dim() == 3 else x.unsqueeze(0)
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        cfg = self.config
        backend = backend or self.backend
        stats = RouterStatsMode.of(stats)
        routing = self.router(x_ND, token_ids)
        capacity = None
        if cfg.capacity_factor is not None and cfg.routing != "expert_choice":
            capacity = token_choice_capacity(B * T, cfg.top_k, cfg.n_routed_experts, cfg.capacity_factor)
        keep_A = None
        if keep is not None and routing.token_major:
            keep_A = keep.reshape(-1).repeat_interleave(routing.expert_ids_A.numel() // (B * T))
        if cfg.second_expert == "random" and self.training:
            second_A = random_second_expert(routing.weights_A)
            keep_A = second_A if keep_A is None else keep_A & second_A
        routed = Routed(routing, B * T, cfg.n_routed_experts, cfg.top_k, capacity, cfg.capacity_priority, keep_A,
                        stats=stats is RouterStatsMode.ALL)
        y_ND = self.experts.run(x_ND, routed, backend)
        if self.shared is not None:
            shared_ND = self.shared(x_ND)
            if self.shared_gate is not None:
                shared_ND = torch.sigmoid(self.shared_gate(x_ND)) * shared_ND
            y_ND = y_ND + shared_ND
        if stats is RouterStatsMode.NONE:
            return y_ND.view(x.shape), None
        if stats is RouterStatsMode.LOAD:
            return y_ND.view(x.shape), RouterStats(load=routed.load())
        dispatch = routed.dispatch()
        return y_ND.view(x.shape), self._stats(routing, dispatch.load_E, dispatch.n_dropped, B, T)

    def _stats(self, routing: Routing, load_E, dropped, B: int, T: int) -> RouterStats:
        cfg = self.config
        counts_E = load_E if self.load_reduction is None else self.load_reduction(load_E)
        aux = routing.logits_TE.new_zeros(())
        if cfg.balance == "aux" and cfg.aux_loss_coef > 0:
            aux = aux + cfg.aux_loss_coef * balance.load_balance_loss(routing.probs_TE, routing.expert_ids_A, counts_E)
        if cfg.device_balance_loss_coef > 0:
            aux = aux + cfg.device_balance_loss_coef * balance.device_balance_loss(routing.probs_TE, counts_E,
                                                                                   cfg.n_group)
        seq_aux = cfg.balance == "seq_aux" or (cfg.balance == "aux_free" and cfg.seq_aux_loss_coef > 0)
        if seq_aux and cfg.seq_aux_loss_coef > 0:
            probs_BTE = routing.probs_TE.view(B, T, -1)
            ids_BTK = routing.expert_ids_A.view(B, T, cfg.top_k)
            aux = aux + cfg.seq_aux_loss_coef * balance.sequence_balance_loss(probs_BTE, ids_BTK)
        z = balance.router_z_loss(routing.logits_TE) if cfg.z_loss_coef > 0 else None
        if z is not None:
            aux = aux + cfg.z_loss_coef * z
        with torch.no_grad():
            probs = routing.probs_TE.detach()
            return RouterStats(
                load=load_E.detach(),
                dropped=dropped.detach(),
                aux_loss=aux,
                load_balance=balance.load_balance_loss(probs, routing.expert_ids_A, counts_E),
                z_loss=z.detach() if z is not None else balance.router_z_loss(routing.logits_TE.detach()),
                entropy=balance.router_entropy(probs),
            )
