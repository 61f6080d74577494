"""Expert specialisation analyses of a trained checkpoint, following the papers that introduced them.

- load and dead experts per layer on held-out text;
- top tokens per expert; with several sources, domain affinity and a per-layer specialisation score read against
  the same score with the sources shuffled across sequences (DeepSeekMoE, OLMoE §5);
- consecutive-token reuse per layer, of the first-choice expert and of any top-k expert, against the chance that
  independent routing with the measured loads gives (Mixtral §5, Table 5);
- expert knock-out: the loss rise when the most-loaded routed experts (with the fraction of experts that is), or
  the shared experts, are disabled, and when the shared experts are traded for as many more routed ones
  (DeepSeekMoE §4.5);
- redundancy: the loss when each token loses its highest-scoring routed experts (DeepSeekMoE §4.5, Fig. 4);
- router saturation: how many of the final checkpoint's top-k choices an earlier checkpoint already makes, per
  layer and against chance (OLMoE §5.1).

Routing is observed with forward hooks removed on exit, and the interventions patch router or shared-expert
methods for the duration of a ``with`` block: the model's code and weights are untouched.

Legend: B sequences, T positions (or tokens, in a router), N = B*T, K top_k, E routed experts, S sources.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from smoe.config import MoEConfig
from smoe.models import Transformer
from smoe.moe.layer import MoELayer
from smoe.moe.router import Router, Routing, token_choice

Batch = tuple[torch.Tensor, torch.Tensor]

# DeepSeekMoE Fig. 4's x axis: the share of routed experts each token loses, 0 to 4/16.
REDUNDANCY_RATIOS = (0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)


@torch.no_grad()
def trace_routing(model: Transformer, batches: list[Batch]) -> tuple[dict[int, torch.Tensor], float]:
    """Top-k expert ids per MoE layer, (B_total, T, K) in selection order (first choice first), and the mean lm
    loss over the batches. Only token-choice layers are traced (expert choice has no per-token top-k)."""
    model.eval()
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for idx, layer in model.moe_layers_by_index().items():
        if idx >= model.config.n_layers or layer.config.routing != "token_choice":
            continue

        def hook(module, args, routing, idx=idx, k=layer.config.top_k):
            captured.setdefault(idx, []).append(routing.expert_ids_A.view(-1, k).cpu())

        handles.append(layer.router.register_forward_hook(hook))
    losses, counts = [], []
    try:
        for inputs, targets in batches:
            out = model(inputs, labels=targets)
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
    losses = [(model(i, labels=t).lm_loss.item(), t.numel()) for i, t in batches]
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


def consecutive_rates(trace_BTK: torch.Tensor, n_experts: int, permutations: int = 4, seed: int = 0
                      ) -> dict[str, float | None]:
    """How often token t+1 reuses token t's expert: first choice == first choice (``first``), and any overlap of
    the top-k sets (``any``), each against what independent routing would give (Mixtral §5):

    - ``first_uniform`` 1/E; ``first_load_weighted`` sum_e p_e^2 with p the measured first-choice loads (exact);
    - ``any_uniform`` 1 - C(E-k,k)/C(E,k); ``any_load_aware``: Monte Carlo, each token's top-k set against the set
      of a random other token (a permutation of all N tokens, ``permutations`` times, ``seed``-fixed), so the
      chance keeps the measured load and co-selection of experts; ``any_load_aware_std`` its spread over the
      permutations (each averages N pairs);
    - ``first_vs_chance`` = first / first_load_weighted and ``any_vs_chance`` = any / any_load_aware: 1 = no more
      reuse than chance (None where the chance is 0)."""
    first = trace_BTK[..., 0]
    same_first = (first[:, 1:] == first[:, :-1]).float().mean().item()
    k = trace_BTK.shape[-1]
    overlap = _overlap(trace_BTK[:, :-1], trace_BTK[:, 1:])
    p = torch.bincount(first.flatten(), minlength=n_experts).double()
    p = p / p.sum()
    load_weighted = float((p * p).sum())
    no_overlap = math.comb(n_experts - k, k) / math.comb(n_experts, k) if n_experts >= 2 * k else 0.0
    sets_NK = trace_BTK.reshape(-1, k)
    gen = torch.Generator().manual_seed(seed)
    shuffled = [_overlap(sets_NK, sets_NK[torch.randperm(len(sets_NK), generator=gen)]) for _ in range(permutations)]
    chance = float(np.mean(shuffled))
    return {"first": same_first, "first_uniform": 1 / n_experts, "first_load_weighted": load_weighted,
            "any": overlap, "any_uniform": 1 - no_overlap,
            "any_load_aware": chance, "any_load_aware_std": float(np.std(shuffled)),
            "first_vs_chance": same_first / load_weighted if load_weighted > 0 else None,
            "any_vs_chance": overlap / chance if chance > 0 else None}


def _overlap(a_XK: torch.Tensor, b_XK: torch.Tensor) -> float:
    """Share of rows whose two top-k sets share at least one expert."""
    return (a_XK[..., :, None] == b_XK[..., None, :]).any(-1).any(-1).float().mean().item()


def top_tokens(trace_BTK: torch.Tensor, token_ids_BT: torch.Tensor, n_experts: int, tokenizer, top: int = 8
               ) -> dict[int, list[tuple[str, float]]]:
    """Per expert, the tokens it processes most, with each token's share of that expert's load."""
    result = {}
    flat_ids = token_ids_BT.flatten()
    flat_trace = trace_BTK.reshape(-1, trace_BTK.shape[-1])
    for e in range(n_experts):
        rows = (flat_trace == e).any(-1)
        count = Counter(flat_ids[rows].tolist())
        total = max(1, int(rows.sum()))
        result[e] = [(_token_text(tokenizer, t), c / total) for t, c in count.most_common(top)]
    return result


def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    return tokenizer.decode([token_id]).replace("\n", "\\n") or f"<{token_id}>"


def domain_affinity(trace_BTK: torch.Tensor, sources_B: list[int], n_sources: int, n_experts: int) -> np.ndarray:
    """(S, E): each source's share of assignments per expert, divided by the source's share of all tokens
    (1.0 = no preference, above = the expert prefers that source)."""
    counts = np.zeros((n_sources, n_experts))
    src = np.asarray(sources_B)
    for s in range(n_sources):
        ids = trace_BTK[torch.from_numpy(src == s)].flatten()
        counts[s] = np.bincount(ids.numpy(), minlength=n_experts)
    per_expert = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    source_share = counts.sum(1, keepdims=True) / max(counts.sum(), 1)
    return per_expert / np.maximum(source_share, 1e-12)


def saturation(earlier_BTK: torch.Tensor, final_BTK: torch.Tensor) -> float:
    """Mean fraction of the final top-k set that the earlier checkpoint also selects, per token (OLMoE §5.1)."""
    a, b = earlier_BTK[..., :, None], final_BTK[..., None, :]
    return (a == b).any(-2).float().mean().item()


def saturation_chance(earlier_BTK: torch.Tensor, final_BTK: torch.Tensor, n_experts: int) -> float:
    """The saturation two independent routings with the measured loads would show: (1/K) sum_e f_e q_e, where f_e
    and q_e are the shares of tokens whose final and earlier top-k sets hold expert e (exact: the expected share of
    a final set the earlier one holds, when the two sets are drawn independently). Uniform loads give K/E."""
    n_tokens = final_BTK.shape[0] * final_BTK.shape[1]
    f = torch.bincount(final_BTK.flatten(), minlength=n_experts).double() / n_tokens
    q = torch.bincount(earlier_BTK.flatten(), minlength=n_experts).double() / n_tokens
    return float((f * q).sum() / final_BTK.shape[-1])


def specialisation(trace_BTK: torch.Tensor, sources_B: list[int], n_sources: int, n_experts: int,
                   permutations: int = 20, seed: int = 0) -> dict[str, float | int]:
    """One number per layer for domain specialisation: the mean over sources of the total-variation distance
    between the source's distribution of assignments over experts and the pooled one (0: every source routes
    alike; 1 - the source's share at most). Finite samples make it positive even without any preference, so
    ``shuffled_mean`` / ``shuffled_std`` give it with the sources permuted across sequences (``permutations``
    times, ``seed``-fixed; source sizes kept): a score within a few spreads of the shuffled one is chance, not
    specialisation."""
    B = trace_BTK.shape[0]
    flat = trace_BTK.reshape(B, -1)
    counts_BE = torch.zeros(B, n_experts, dtype=torch.float64).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float64)).numpy()
    src = np.asarray(sources_B)
    rng = np.random.default_rng(seed)
    shuffled = [_mean_tv(counts_BE, rng.permutation(src), n_sources) for _ in range(permutations)]
    return {"score": _mean_tv(counts_BE, src, n_sources), "shuffled_mean": float(np.mean(shuffled)),
            "shuffled_std": float(np.std(shuffled)), "permutations": permutations}


def _mean_tv(counts_BE: np.ndarray, src_B: np.ndarray, n_sources: int) -> float:
    pooled = counts_BE.sum(0) / counts_BE.sum()
    tvs = []
    for s in range(n_sources):
        c = counts_BE[src_B == s].sum(0)
        if c.sum() > 0:  # a source with no sequence here has no distribution to compare
            tvs.append(0.5 * np.abs(c / c.sum() - pooled).sum())
    return float(np.mean(tvs))


def analyze(model: Transformer, batches: list[Batch], sources_B: list[int], source_names: list[str], tokenizer=None,
            earlier: list[tuple[int, Transformer]] | None = None, knockouts: tuple[int, ...] = (1, 2, 4)
            ) -> dict[str, Any]:
    """Every analysis above on one model and a fixed set of batches; JSON-ready.

    Keys: ``loss``; ``sources``; ``layers`` {layer: load, dead, consecutive (consecutive_rates), top_tokens, and
    with several sources domain_affinity and specialisation}; ``knockout`` {name: loss rise} for ``top{n}_routed``,
    ``shared``, ``shared_to_routed``, with ``knockout_fraction`` {top{n}_routed: share of each layer's routed
    experts disabled} and ``shared_to_routed_top_k``; ``redundancy`` (redundancy()); with earlier checkpoints
    ``saturation`` {step: mean over layers} and ``saturation_by_layer`` {step: {layer: {overlap, chance}}}."""
    traces, base_loss = trace_routing(model, batches)
    token_ids = torch.cat([b[0] for b in batches])
    layers = model.moe_layers_by_index()
    result: dict[str, Any] = {"loss": base_loss, "layers": {}, "sources": source_names}
    for idx, trace in traces.items():
        E = layers[idx].config.n_routed_experts
        load = torch.bincount(trace.flatten(), minlength=E)
        entry = {
            "load": load.tolist(),
            "dead": int((load == 0).sum()),
            "consecutive": consecutive_rates(trace, E),
            "top_tokens": {str(e): v for e, v in top_tokens(trace, token_ids, E, tokenizer).items()},
        }
        if len(source_names) > 1:
            entry["domain_affinity"] = domain_affinity(trace, sources_B, len(source_names), E).tolist()
            entry["specialisation"] = specialisation(trace, sources_B, len(source_names), E)
        result["layers"][str(idx)] = entry

    result["knockout"], result["knockout_fraction"] = {}, {}
    for n in knockouts:
        top_by_layer = {}
        for idx, trace in traces.items():
            cfg = layers[idx].config
            if n > cfg.n_routed_experts - cfg.top_k:
                continue
            load = torch.bincount(trace.flatten(), minlength=cfg.n_routed_experts)
            top_by_layer[idx] = load.argsort(descending=True)[:n].tolist()
        if top_by_layer:
            with knock_out(model, routed=top_by_layer):
                result["knockout"][f"top{n}_routed"] = mean_loss(model, batches) - base_loss
            # 4 of 8 experts is not 4 of 64; layers share one MoEConfig, so the mean is every layer's share
            result["knockout_fraction"][f"top{n}_routed"] = float(np.mean(
                [n / layers[i].config.n_routed_experts for i in top_by_layer]))
    if any(layer.shared is not None for layer in layers.values()):
        with knock_out(model, shared=True):
            result["knockout"]["shared"] = mean_loss(model, batches) - base_loss
    traded = _tradable_layers(model)
    if traded:
        with shared_to_routed(model):
            result["knockout"]["shared_to_routed"] = mean_loss(model, batches) - base_loss
        cfg = next(iter(traded.values())).config
        result["shared_to_routed_top_k"] = cfg.top_k + n_replacing_shared(cfg)

    result["redundancy"] = redundancy(model, batches, base_loss=base_loss)

    if earlier:
        result["saturation"], result["saturation_by_layer"] = {}, {}
        for step, other in earlier:
            other_traces, _ = trace_routing(other, batches)
            common = [i for i in traces if i in other_traces]
            per_layer = {str(i): {"overlap": saturation(other_traces[i], traces[i]),
                                  "chance": saturation_chance(other_traces[i], traces[i],
                                                              layers[i].config.n_routed_experts)} for i in common}
            result["saturation"][str(step)] = float(np.mean([v["overlap"] for v in per_layer.values()]))
            result["saturation_by_layer"][str(step)] = per_layer
    return result
