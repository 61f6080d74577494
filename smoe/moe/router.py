"""Routers: scores -> Routing (which expert each token-expert assignment goes to, with what weight).

Legend: T tokens, E routed experts, K top_k, A assignments (T*K for token choice, E*C for expert choice).

Token choice (every token picks K experts):
  softmax:  p = softmax(logits); top-K on p (+ bias); weights = p[top-K], renormalised if norm_topk_prob.
  sigmoid:  s = sigmoid(logits); top-K on s + b (b is the aux-free bias, used for selection only);
            weights = s[top-K] / sum (DeepSeek-V3 §2.1.2), times routed_scaling_factor.
  group-limited (DeepSeek-V2/V3): experts split into n_group groups; only the topk_group groups with the best
            group score (max, or the sum of the top 2) are eligible.
Expert choice (Zhou et al. 2022): every expert picks its C best tokens. It looks at all tokens of the batch,
including later positions of the same sequence, so it is for training studies, not autoregressive decoding.
Hash (Roller et al. 2021, "Hash Layers For Large Sparse Models"; DeepSeekMoE Table 1's "Hash Layer"): a token goes
  to the one expert a fixed random hash of its id names, with weight 1. Nothing is learned, so the router has no
  weights; it needs the token ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from smoe import kernels
from smoe.config import MoEConfig


@dataclass(frozen=True)
class Routing:
    token_ids_A: torch.Tensor  # int64; token-major (A = T*K, row t*K + j is token t's j-th choice) for token choice
    expert_ids_A: torch.Tensor  # int64
    weights_A: torch.Tensor  # combine weights, fp32
    probs_TE: torch.Tensor  # per-token distribution over experts (normalised scores), fp32, for balance terms
    logits_TE: torch.Tensor  # raw router logits, fp32, for the z-loss
    token_major: bool  # True when A == T*K in token order (token choice): combine reshapes instead of scattering


class Router(nn.Module):
    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.config = config
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, dim)) if config.routing != "hash" else None
        self.logit_bias = nn.Parameter(torch.zeros(E)) if config.router_bias else None
        if config.has_expert_bias:
            # Selection-only bias of aux-loss-free balancing. A buffer, not a parameter: the optimizer must not
            # touch it; smoe.moe.balance.update_expert_bias moves it after each optimizer step.
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        if self.config.routing == "hash":
            if token_ids_T is None:
                raise ValueError("moe.routing: hash routing needs the token ids (run the layer inside a Transformer, "
                                 "or pass token_ids)")
            return hash_routing(token_ids_T, self.config.n_routed_experts, x_TD.device)
        return self.route(self.logits(x_TD))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Routing decisions are made in fp32 whatever the activation dtype or autocast: bf16 rounding flips top-K
        # choices and saturates the balance statistics.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = x_TD.float() @ self.weight.float().t()
        if self.logit_bias is not None:
            logits_TE = logits_TE + self.logit_bias.float()
        return logits_TE

    def route(self, logits_TE: torch.Tensor, disabled: list[int] | None = None) -> Routing:
        """Routing from logits; ``disabled`` experts can never be chosen (expert knock-out analyses)."""
        bias_E = self.expert_bias
        if disabled:
            logits_TE = logits_TE.clone()
            logits_TE[:, disabled] = float("-inf")
            if bias_E is not None:
                bias_E = bias_E.clone()
                bias_E[disabled] = float("-inf")
        if self.config.routing == "expert_choice":
            return expert_choice(logits_TE, self.config)
        return token_choice(logits_TE, self.config, bias_E)


def token_choice(logits_TE: torch.Tensor, cfg: MoEConfig, expert_bias_E: torch.Tensor | None) -> Routing:
    T, E = logits_TE.shape
    K = cfg.top_k
    scores_TE = logits_TE.softmax(-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()
    choice_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E
    select = kernels.expert_selector(logits_TE.device)
    if select is not None:  # one fused kernel for bias, group limit and top-K
        expert_ids_TK = select(choice_TE, K, cfg.n_group, cfg.topk_group, cfg.group_score == "top2_sum")
    else:
        if cfg.n_group > 1:
            choice_TE = _limit_to_groups(choice_TE, cfg)
        expert_ids_TK = choice_TE.topk(K, dim=-1).indices
    weights_TK = scores_TE.gather(1, expert_ids_TK)
    if cfg.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    weights_TK = weights_TK * cfg.routed_scaling_factor
    probs_TE = scores_TE if cfg.score_func == "softmax" else scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
    token_ids = torch.arange(T, device=logits_TE.device).repeat_interleave(K)
    return Routing(token_ids, expert_ids_TK.reshape(-1), weights_TK.reshape(-1), probs_TE, logits_TE, True)


def _limit_to_groups(choice_TE: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    T, E = choice_TE.shape
    grouped_TGX = choice_TE.view(T, cfg.n_group, E // cfg.n_group)
    if cfg.group_score == "max":
        group_scores_TG = grouped_TGX.amax(-1)
    else:
        group_scores_TG = grouped_TGX.topk(2, dim=-1).values.sum(-1)
    best_TG = group_scores_TG.topk(cfg.topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    keep_TE = keep_TG.repeat_interleave(E // cfg.n_group, dim=1)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


# A fixed random hash of the token id: multiply-add modulo the Mersenne prime 2^31 - 1 (the constants are arbitrary
# odd numbers below it), then modulo E. Products stay below 2^62, so int64 never overflows.
_HASH_PRIME, _HASH_MUL, _HASH_ADD = 2**31 - 1, 1_103_515_245, 12_345


def hash_experts(token_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The expert each token id is hashed to (int64, the shape of ``token_ids``)."""
    return ((token_ids.long() % _HASH_PRIME) * _HASH_MUL + _HASH_ADD) % _HASH_PRIME % n_experts


def hash_routing(token_ids_T: torch.Tensor, n_experts: int, device: torch.device) -> Routing:
    """Top-1 by the token id's hash, weight 1. The distribution over experts is the one-hot choice and the logits
    are zero, so balance statistics describe the assignment and the z-loss is 0."""
    expert_ids_T = hash_experts(token_ids_T.reshape(-1).to(device), n_experts)
    T = expert_ids_T.shape[0]
    probs_TE = torch.nn.functional.one_hot(expert_ids_T, n_experts).float()
    return Routing(torch.arange(T, device=device), expert_ids_T, probs_TE.new_ones(T), probs_TE,
                   torch.zeros_like(probs_TE), True)


def expert_choice_capacity(n_tokens: int, cfg: MoEConfig) -> int:
    """Tokens each expert takes: capacity_factor (default 1) x the token-choice average T*K/E, at most T."""
    factor = cfg.capacity_factor if cfg.capacity_factor is not None else 1.0
    return max(1, min(n_tokens, math.ceil(factor * n_tokens * cfg.top_k / cfg.n_routed_experts)))


def expert_choice(logits_TE: torch.Tensor, cfg: MoEConfig) -> Routing:
    T, E = logits_TE.shape
    probs_TE = logits_TE.softmax(-1)
    C = expert_choice_capacity(T, cfg)
    weights_EC, token_ids_EC = probs_TE.t().topk(C, dim=-1)
    expert_ids = torch.arange(E, device=logits_TE.device).repeat_interleave(C)
    return Routing(token_ids_EC.reshape(-1), expert_ids, weights_EC.reshape(-1), probs_TE, logits_TE, False)
