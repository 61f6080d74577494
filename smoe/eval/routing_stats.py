"""Statistics of traced routing (per MoE layer, each token's top-k expert ids, B x T x K): pure functions, no model.

- consecutive-token reuse against the chance independent routing with the measured loads gives (Mixtral §5);
- top tokens per expert; domain affinity; domain specialisation against the sources shuffled and against what
  the token identity alone explains (the vocabulary baseline: a token-keyed router's, a hash layer's, score);
- co-activation: how often an expert's most frequent partner is chosen with it (OLMoE §5), against chance;
- router saturation: how many of the final top-k choices an earlier checkpoint already makes (OLMoE §5.1).

Legend: B sequences, T positions, K top_k, E routed experts, S sources, N = B*T tokens, V vocabulary.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch


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
                   token_ids_BT: torch.Tensor | None = None, permutations: int = 20, seed: int = 0
                   ) -> dict[str, float | int]:
    """One number per layer for domain specialisation: the mean over sources of the total-variation distance
    between the source's distribution of assignments over experts and the pooled one (0: every source routes
    alike; 1 - the source's share at most). Two baselines read it:

    - ``shuffled_mean`` / ``shuffled_std``: the score with the sources permuted across sequences (``permutations``
      times, ``seed``-fixed; source sizes kept). Finite samples make the score positive without any preference.
    - ``vocabulary`` (with ``token_ids_BT``): the score of a token-keyed router, each token's assignments replaced
      by its token id's average distribution over experts on this data. Sources differ in their vocabularies, so a
      router that only looks at the token specialises by source this much without knowing any source (a hash layer
      scores exactly this); ``score - vocabulary`` is what the routing adds beyond the vocabulary."""
    B = trace_BTK.shape[0]
    flat = trace_BTK.reshape(B, -1)
    counts_BE = torch.zeros(B, n_experts, dtype=torch.float64).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float64)).numpy()
    src = np.asarray(sources_B)
    rng = np.random.default_rng(seed)
    shuffled = [_mean_tv(counts_BE, rng.permutation(src), n_sources) for _ in range(permutations)]
    result = {"score": _mean_tv(counts_BE, src, n_sources), "shuffled_mean": float(np.mean(shuffled)),
              "shuffled_std": float(np.std(shuffled)), "permutations": permutations}
    if token_ids_BT is not None:
        result["vocabulary"] = _mean_tv(_token_keyed_counts(trace_BTK, token_ids_BT, n_experts), src, n_sources)
    return result


def _token_keyed_counts(trace_BTK: torch.Tensor, token_ids_BT: torch.Tensor, n_experts: int) -> np.ndarray:
    """(B, E): each sequence's assignments if every token were routed by its id's average over the data."""
    B, T, K = trace_BTK.shape
    ids_N = token_ids_BT.reshape(-1).long()
    V = int(ids_N.max()) + 1
    experts_NK = trace_BTK.reshape(-1, K)
    by_token_VE = torch.zeros(V, n_experts, dtype=torch.float64).index_put_(
        (ids_N.repeat_interleave(K), experts_NK.reshape(-1)), torch.ones(B * T * K, dtype=torch.float64),
        accumulate=True)
    by_token_VE = by_token_VE / by_token_VE.sum(1, keepdim=True).clamp(min=1)
    return (by_token_VE[ids_N].view(B, T, n_experts).sum(1) * K).numpy()


def coactivation(trace_BTK: torch.Tensor, n_experts: int, draws: int = 4, seed: int = 0) -> dict[str, float] | None:
    """OLMoE §5's co-activation: for experts i and j, the share of the tokens that choose i which also choose j.
    ``max_partner``: the mean over the used experts of the share their most frequent partner takes (1: an expert
    never works without its partner; small: no fixed groups), and ``chance``: the same when every token's K experts
    are drawn independently without replacement in proportion to the measured loads (Gumbel top-K, ``draws``
    times, ``seed``-fixed); ``top_pair``: the most co-activated (i, j, share). None below top-2."""
    K = trace_BTK.shape[-1]
    if K < 2:
        return None
    sets_NK = trace_BTK.reshape(-1, K)
    load_E = torch.bincount(sets_NK.reshape(-1), minlength=n_experts).double()
    gen = torch.Generator().manual_seed(seed)
    logits_E = load_E.clamp(min=1e-12).log()
    chance = []
    for _ in range(draws):
        gumbel_NE = -torch.log(-torch.log(torch.rand(len(sets_NK), n_experts, generator=gen, dtype=torch.float64)))
        chance.append(_max_partner(torch.topk(logits_E + gumbel_NE, K, dim=-1).indices, n_experts)[0])
    observed, (i, j, share) = _max_partner(sets_NK, n_experts)
    return {"max_partner": observed, "chance": float(np.mean(chance)), "top_pair": [i, j, share]}


def _max_partner(sets_NK: torch.Tensor, n_experts: int) -> tuple[float, tuple[int, int, float]]:
    chosen_NE = torch.zeros(len(sets_NK), n_experts, dtype=torch.float64).scatter_(1, sets_NK, 1.0)
    both_EE = chosen_NE.t() @ chosen_NE
    alone_E = both_EE.diagonal().clone()
    share_EE = (both_EE / alone_E.clamp(min=1)[:, None]).fill_diagonal_(0.0)
    best_E = share_EE.max(1)
    used = alone_E > 0
    flat = int(share_EE.argmax())
    top = (flat // n_experts, flat % n_experts, float(share_EE.view(-1)[flat]))
    return float(best_E.values[used].mean()) if used.any() else 0.0, top


def _mean_tv(counts_BE: np.ndarray, src_B: np.ndarray, n_sources: int) -> float:
    pooled = counts_BE.sum(0) / counts_BE.sum()
    tvs = []
    for s in range(n_sources):
        c = counts_BE[src_B == s].sum(0)
        if c.sum() > 0:  # a source with no sequence here has no distribution to compare
            tvs.append(0.5 * np.abs(c / c.sum() - pooled).sum())
    return float(np.mean(tvs))


