"""Expert specialisation analyses of a trained checkpoint: what no MoE framework ships.

- load and dead experts per layer on held-out text;
- top tokens per expert, and domain affinity when the text has several sources;
- consecutive-token same-expert rate per layer against its random baseline (Mixtral §5, Table 5);
- expert knock-out: the loss rise when the most-loaded routed experts, or the shared experts, are disabled
  (DeepSeekMoE §4.5);
- router saturation: how many of the final checkpoint's top-k choices an earlier checkpoint already makes
  (OLMoE §5.1).

Routing is observed with forward hooks removed on exit, and knock-outs mask router logits for the duration of a
``with`` block: the model's code and weights are untouched.

Legend: B sequences, T positions, K top_k, E routed experts, L MoE layers.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import Any

import numpy as np
import torch

from smoe.models import Transformer

Batch = tuple[torch.Tensor, torch.Tensor]


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
        for obj, name, old in reversed(saved):
            if old is None:
                del obj.__dict__[name]
            else:
                setattr(obj, name, old)


def consecutive_rates(trace_BTK: torch.Tensor, n_experts: int) -> dict[str, float]:
    """How often token t+1 reuses token t's expert: first choice == first choice, and any overlap of the top-k
    sets; each with the rate independent routing would give (uniform, and load-weighted for the first choice)."""
    first = trace_BTK[..., 0]
    same_first = (first[:, 1:] == first[:, :-1]).float().mean().item()
    k = trace_BTK.shape[-1]
    a, b = trace_BTK[:, :-1, :, None], trace_BTK[:, 1:, None, :]
    overlap = (a == b).any(-1).any(-1).float().mean().item()
    p = torch.bincount(first.flatten(), minlength=n_experts).double()
    p = p / p.sum()
    no_overlap = math.comb(n_experts - k, k) / math.comb(n_experts, k) if n_experts >= 2 * k else 0.0
    return {"first": same_first, "first_uniform": 1 / n_experts, "first_load_weighted": float((p * p).sum()),
            "any": overlap, "any_uniform": 1 - no_overlap}


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


def analyze(model: Transformer, batches: list[Batch], sources_B: list[int], source_names: list[str], tokenizer=None,
            earlier: list[tuple[int, Transformer]] | None = None, knockouts: tuple[int, ...] = (1, 2, 4)
            ) -> dict[str, Any]:
    """Every analysis above on one model and a fixed set of batches; JSON-ready."""
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
        result["layers"][str(idx)] = entry

    result["knockout"] = {}
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
    if any(layer.shared is not None for layer in layers.values()):
        with knock_out(model, shared=True):
            result["knockout"]["shared"] = mean_loss(model, batches) - base_loss

    if earlier:
        result["saturation"] = {}
        for step, other in earlier:
            other_traces, _ = trace_routing(other, batches)
            result["saturation"][str(step)] = float(np.mean([
                saturation(other_traces[i], traces[i]) for i in traces if i in other_traces]))
    return result
