"""Expert specialisation analyses of a trained checkpoint, following the papers that introduced them.

- load and dead experts per layer on held-out text, and the statistics of smoe.eval.routing_stats on the traced
  routing: consecutive-token reuse (Mixtral §5), top tokens, domain affinity and specialisation against shuffled
  sources and against the vocabulary baseline (DeepSeekMoE, OLMoE §5), co-activation (OLMoE §5), router
  saturation (OLMoE §5.1). Hash layers are traced too: their routing is the token-keyed baseline itself;
- expert knock-out: the loss rise when the most-loaded routed experts (with the fraction of experts that is), or
  the shared experts, are disabled, and when the shared experts are traded for as many more routed ones
  (DeepSeekMoE §4.5);
- redundancy: the loss when each token loses its highest-scoring routed experts (DeepSeekMoE §4.5, Fig. 4);
- for a model with a capacity limit, the loss without it (dropless evaluation): capacity applies at evaluation as in
  training (GShard, Switch), so the two together say what the drops cost at inference.

Routing is observed with forward hooks removed on exit, and the interventions patch router or shared-expert
methods (or a layer's config) for the duration of a ``with`` block: the model's code and weights are untouched.

Legend: B sequences, T positions (or tokens, in a router), N = B*T, K top_k, E routed experts, S sources.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from smoe.config import MoEConfig
from smoe.eval.findings import Analysis, Coactivation, Consecutive, LayerRouting, Redundancy, Specialisation
from smoe.eval.routing_stats import (
    coactivation,
    consecutive_rates,
    domain_affinity,
    saturation,
    saturation_chance,
    specialisation,
    top_tokens,
)
from smoe.models import Transformer
from smoe.moe.layer import MoELayer
from smoe.moe.router import Router, Routing, token_choice

# (inputs_BT, targets_BT), or with a third item: the model's keyword arguments for that batch (its packed documents'
# boundaries, as the run trained: smoe.train.loop.document_arguments)
Batch = tuple[torch.Tensor, ...]


def _forward(model: Transformer, batch: Batch):
    inputs, targets, *rest = batch
    return model(inputs, labels=targets, **(rest[0] if rest else {}))

# DeepSeekMoE Fig. 4's x axis: the share of routed experts each token loses, 0 to 4/16.
REDUNDANCY_RATIOS = (0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)


@torch.no_grad()
def trace_routing(model: Transformer, batches: list[Batch]) -> tuple[dict[int, torch.Tensor], float]:
    """Top-k expert ids per MoE layer, (B_total, T, K) in selection order (first choice first), and the mean lm
    loss over the batches. Token-choice and hash layers are traced (expert choice has no per-token top-k)."""
    model.eval()
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for idx, layer in model.moe_layers_by_index().items():
        if idx >= model.config.n_layers or layer.config.routing == "expert_choice":
            continue

        def hook(module, args, routing, idx=idx, k=layer.config.top_k):
            captured.setdefault(idx, []).append(routing.expert_ids_A.view(-1, k).cpu())

        handles.append(layer.router.register_forward_hook(hook))
    losses, counts = [], []
    try:
        for batch in batches:
            out = _forward(model, batch)
            targets = batch[1]
            losses.append(out.lm_loss.item())
            counts.append(targets.numel())
    finally:
        for h in handles:
            h.remove()
    B, T = sum(b[0].shape[0] for b in batches), batches[0][0].shape[1]
    traces = {idx: torch.cat(parts).view(B, T, -1) for idx, parts in captured.items()}
    return traces, float(np.average(losses, weights=counts))


@torch.no_grad()
def mean_loss(model: Transformer, batches: list[Batch]) -> float:
    model.eval()
    losses = [(_forward(model, b).lm_loss.item(), b[1].numel()) for b in batches]
    return float(np.average([x for x, _ in losses], weights=[n for _, n in losses]))


@contextlib.contextmanager
def knock_out(model: Transformer, routed: dict[int, list[int]] | None = None, shared: bool = False):
    """Within the block, the listed routed experts of each layer get -inf router logits (tokens go to the
    remaining experts), and with ``shared`` every shared expert's output is zero."""
    routed = routed or {}
    layers = model.moe_layers_by_index()
    saved: list[tuple[Any, str, Any]] = []
    try:
        for idx, disabled in routed.items():
            router = layers[idx].router
            saved.append((router, "forward", router.__dict__.get("forward")))
            router.forward = lambda x_TD, token_ids=None, r=router, off=disabled: r.route(r.logits(x_TD), off)
        if shared:
            for layer in layers.values():
                if layer.shared is not None:
                    saved.append((layer.shared, "forward", layer.shared.__dict__.get("forward")))
                    layer.shared.forward = torch.zeros_like
        yield
    finally:
        _restore(saved)


def _restore(saved: list[tuple[Any, str, Any]]) -> None:
    """Undo instance-attribute patches, newest first; None: the attribute was the class's, so drop the patch."""
    for obj, name, old in reversed(saved):
        if old is None:
            del obj.__dict__[name]
        else:
            setattr(obj, name, old)


def _token_choice_layers(model: Transformer) -> dict[int, MoELayer]:
    # Hash and expert-choice layers have no per-token top-k over scores to intervene in.
    return {i: layer for i, layer in model.moe_layers_by_index().items() if layer.config.routing == "token_choice"}


def n_disabled(ratio: float, n_experts: int, top_k: int) -> int:
    """Experts a token loses at ``ratio`` of E: the nearest whole number, halves rounding up (1.5 -> 2), and at most
    E - K so that K experts remain to choose from."""
    return min(math.floor(ratio * n_experts + 0.5), n_experts - top_k)


def _route_without_top(router: Router, n_off: int, x_TD: torch.Tensor, token_ids_T=None) -> Routing:
    cfg = router.config
    logits_TE = router.logits(x_TD)
    # The scores token_choice weights by (without the selection-only bias): the router's probabilities.
    scores_TE = logits_TE.softmax(-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()
    off_TE = torch.zeros_like(scores_TE)
    if n_off:
        off_TE.scatter_(1, scores_TE.topk(n_off, dim=-1).indices, float("-inf"))
    # token_choice adds the bias to the scores for selection only, so a (T, E) mask there removes experts from
    # the group limit and the top-K while the kept experts' weights stay their unmasked scores.
    bias = off_TE if router.expert_bias is None else router.expert_bias.float() + off_TE
    routing = token_choice(logits_TE, cfg, bias)
    # A group limit can keep groups with fewer than K experts left; top-K then fills up with -inf entries:
    # disabled experts, or experts of groups the limit dropped.
    ids_TK = routing.expert_ids_A.view(len(off_TE), -1)
    groups_TG = torch.zeros(len(off_TE), cfg.n_group, dtype=torch.bool, device=ids_TK.device).scatter_(
        1, ids_TK // (cfg.n_routed_experts // cfg.n_group), True)
    if torch.isinf(off_TE.gather(1, ids_TK)).any() or (groups_TG.sum(1) > cfg.topk_group).any():
        raise ValueError(f"redundancy: with {n_off} of {cfg.n_routed_experts} experts disabled, the group limit "
                         f"(topk_group {cfg.topk_group} of n_group {cfg.n_group}) leaves some tokens fewer than "
                         f"top_k {cfg.top_k} experts; use smaller ratios")
    return routing


@contextlib.contextmanager
def disable_top_scored(model: Transformer, n_off: int):
    """Within the block, every token of every token-choice layer loses its ``n_off`` highest-scoring routed experts;
    the router then selects as it normally does among the rest (group limit, aux-free bias) and weights the kept
    experts by their scores as it normally does (DeepSeekMoE §4.5). Hash and expert-choice layers are unchanged."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for layer in _token_choice_layers(model).values():
            router = layer.router
            saved.append((router, "forward", router.__dict__.get("forward")))
            router.forward = functools.partial(_route_without_top, router, n_off)
        yield
    finally:
        _restore(saved)


@torch.no_grad()
def redundancy(model: Transformer, batches: list[Batch], ratios: tuple[float, ...] = REDUNDANCY_RATIOS,
               base_loss: float | None = None) -> dict[str, Any]:
    """Mean lm loss when each token loses its top ``ratio`` of routed experts by score (``n_disabled``), for each
    ratio: DeepSeekMoE Fig. 4's curve, where a steeper rise means less redundant experts. Layers other than token
    choice are listed in ``skipped_layers`` with their routing, and route as usual; with none left the curve is
    empty. Every MoE layer of a model shares one MoEConfig, so one count of disabled experts serves them all.
    ``base_loss``: the model's mean loss on ``batches`` when already known, used for 0 disabled experts (the
    masked routing equals the plain one there) to save a pass."""
    layers = model.moe_layers_by_index()
    skipped = {str(i): layer.config.routing for i, layer in layers.items() if layer.config.routing != "token_choice"}
    result: dict[str, Any] = {"ratios": [], "disabled_experts": [], "loss": [], "skipped_layers": skipped}
    if not _token_choice_layers(model):
        return result
    cfg = model.config.moe
    # small E rounds neighbouring ratios to the same count: run each count once
    losses: dict[int, float] = {} if base_loss is None else {0: base_loss}
    for ratio in ratios:
        n = n_disabled(ratio, cfg.n_routed_experts, cfg.top_k)
        if n not in losses:
            with disable_top_scored(model, n):
                losses[n] = mean_loss(model, batches)
        result["ratios"].append(ratio)
        result["disabled_experts"].append(n)
        result["loss"].append(losses[n])
    return result


@contextlib.contextmanager
def dropless(model: Transformer):
    """Within the block, every MoE layer runs without its capacity limit (each layer reads its config per call)."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for layer in model.moe_layers_by_index().values():
            if layer.config.capacity_factor is not None:
                saved.append((layer, "config", layer.__dict__["config"]))
                layer.config = replace(layer.config, capacity_factor=None)
        yield
    finally:
        _restore(saved)


def n_replacing_shared(cfg: MoEConfig) -> int:
    """Routed experts that stand in for the shared ones at about the same compute: the shared width over one routed
    expert's (n shared experts of a routed expert's width: n), to the nearest whole expert, at least one."""
    return max(1, round(cfg.n_shared_experts * cfg.resolved_shared_expert_dim / cfg.expert_dim))


def _tradable_layers(model: Transformer) -> dict[int, MoELayer]:
    # Token-choice layers with shared experts whose group limit leaves room for top_k + n routed experts.
    return {i: layer for i, layer in _token_choice_layers(model).items() if layer.shared is not None and
            layer.config.top_k + n_replacing_shared(layer.config)
            <= layer.config.topk_group * (layer.config.n_routed_experts // layer.config.n_group)}


@contextlib.contextmanager
def shared_to_routed(model: Transformer):
    """Within the block, every token-choice layer with shared experts runs without them and routes each token to
    ``n_replacing_shared`` more routed experts (top_k + n), chosen and weighted as its router normally does
    (DeepSeekMoE §4.5's "disable the shared expert and activate one more routed expert"). Layers whose group limit
    (or E) leaves fewer than top_k + n experts eligible are left unchanged."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for layer in _tradable_layers(model).values():
            cfg = layer.config
            wider = replace(cfg, top_k=cfg.top_k + n_replacing_shared(cfg))
            # The layer reads top_k for dispatch and balance statistics, the router for selection: both change.
            for obj in (layer, layer.router):
                saved.append((obj, "config", obj.__dict__["config"]))
                obj.config = wider
            saved.append((layer.shared, "forward", layer.shared.__dict__.get("forward")))
            layer.shared.forward = torch.zeros_like
        yield
    finally:
        _restore(saved)


def analyze(model: Transformer, batches: list[Batch], sources_B: list[int], source_names: list[str], tokenizer=None,
            earlier: list[tuple[int, Transformer]] | None = None, knockouts: tuple[int, ...] = (1, 2, 4)
            ) -> Analysis:
    """Every analysis above on one model and a fixed set of batches (smoe.eval.findings.Analysis)."""
    traces, base_loss = trace_routing(model, batches)
    token_ids = torch.cat([b[0] for b in batches])
    layers = model.moe_layers_by_index()
    routed: dict[int, LayerRouting] = {}
    for idx, trace in traces.items():
        E = layers[idx].config.n_routed_experts
        rates = consecutive_rates(trace, E)
        pairs = coactivation(trace, E)
        several = len(source_names) > 1
        spec = specialisation(trace, sources_B, len(source_names), E, token_ids) if several else None
        routed[idx] = LayerRouting(
            routing=layers[idx].config.routing,
            load=torch.bincount(trace.flatten(), minlength=E).tolist(),
            consecutive=Consecutive(**{f: rates[f] for f in Consecutive.__dataclass_fields__}),
            top_tokens=top_tokens(trace, token_ids, E, tokenizer),
            coactivation=Coactivation(pairs["max_partner"], pairs["chance"], tuple(pairs["top_pair"]))
            if pairs is not None else None,
            domain_affinity=domain_affinity(trace, sources_B, len(source_names), E).tolist() if several else None,
            specialisation=Specialisation(**spec) if spec is not None else None)
    dropless_loss = None
    if any(layer.config.capacity_factor is not None for layer in layers.values()):
        with dropless(model):
            dropless_loss = mean_loss(model, batches)

    # interventions change what a router chooses: token-choice layers only (a hash layer has no scores)
    chosen = {idx: trace for idx, trace in traces.items() if layers[idx].config.routing == "token_choice"}
    knockout, fraction = {}, {}
    for n in knockouts:
        top_by_layer = {}
        for idx, trace in chosen.items():
            cfg = layers[idx].config
            if n > cfg.n_routed_experts - cfg.top_k:
                continue
            load = torch.bincount(trace.flatten(), minlength=cfg.n_routed_experts)
            top_by_layer[idx] = load.argsort(descending=True)[:n].tolist()
        if top_by_layer:
            with knock_out(model, routed=top_by_layer):
                knockout[f"top{n}_routed"] = mean_loss(model, batches) - base_loss
            # 4 of 8 experts is not 4 of 64; layers share one MoEConfig, so the mean is every layer's share
            fraction[f"top{n}_routed"] = float(np.mean([n / layers[i].config.n_routed_experts for i in top_by_layer]))
    if any(layer.shared is not None for layer in layers.values()):
        with knock_out(model, shared=True):
            knockout["shared"] = mean_loss(model, batches) - base_loss
    traded = _tradable_layers(model)
    traded_top_k = None
    if traded:
        with shared_to_routed(model):
            knockout["shared_to_routed"] = mean_loss(model, batches) - base_loss
        cfg = next(iter(traded.values())).config
        traded_top_k = cfg.top_k + n_replacing_shared(cfg)

    saturated: dict[int, dict[int, tuple[float, float]]] = {}
    for step, other in (earlier or []) if chosen else []:
        other_traces, _ = trace_routing(other, batches)
        saturated[step] = {i: (saturation(other_traces[i], traces[i]),
                               saturation_chance(other_traces[i], traces[i], layers[i].config.n_routed_experts))
                           for i in chosen if i in other_traces}
    return Analysis(base_loss, list(source_names), routed, knockout, fraction, traded_top_k,
                    Redundancy(**redundancy(model, batches, base_loss=base_loss)), saturated, dropless_loss)
