"""Load-balancing terms as pure functions of router outputs, plus the aux-loss-free bias update.

Legend: B sequences, T tokens (per sequence where B appears), E experts, K top_k, G expert groups (devices).
Each loss is 1.0 (aux, seq_aux, device) when routing is perfectly uniform, so the coefficient alone sets its weight.

``counts_E`` arguments are assignments per expert over every token that shares the loss: this process's tokens
single-process, all ranks' tokens under data/expert parallelism (smoe.parallel all-reduces them). The mean router
probability P stays local, so the mean of the per-rank losses is the loss of the global batch, gradient included.
"""

from __future__ import annotations

import torch


def load_balance_loss(probs_TE: torch.Tensor, expert_ids: torch.Tensor,
                      counts_E: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/GShard expert-level loss: E * sum_i f_i * P_i, with f_i = count_i / (number of assignments) and P_i
    the mean router probability of expert i (Fedus et al. 2021 eq. 4; DeepSeekMoE §3.3 normalises the same way).
    ``counts_E`` defaults to the bincount of ``expert_ids``.

    Hugging Face's Mixtral multiplies this by K (its f_i counts per token, not per assignment).
    """
    T, E = probs_TE.shape
    if counts_E is None:
        counts_E = torch.bincount(expert_ids.reshape(-1), minlength=E)
    counts_E = counts_E.to(probs_TE.dtype)
    f_E = counts_E / counts_E.sum().clamp_min(1)
    return E * (f_E * probs_TE.mean(0)).sum()


def device_balance_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, n_groups: int) -> torch.Tensor:
    """DeepSeek-V2 §3.2.2 device-level loss: sum_g f'_g * P'_g over G groups of contiguous experts (the devices),
    with f'_g the mean of f_i = E * count_i / (number of assignments) over the group and P'_g the summed mean
    router probability of its experts. It balances the load across devices, not across experts within one."""
    T, E = probs_TE.shape
    counts_E = counts_E.to(probs_TE.dtype)
    f_GX = (E * counts_E / counts_E.sum().clamp_min(1)).view(n_groups, E // n_groups)
    p_GX = probs_TE.mean(0).view(n_groups, E // n_groups)
    return (f_GX.mean(1) * p_GX.sum(1)).sum()


def sequence_balance_loss(probs_BTE: torch.Tensor, expert_ids_BTK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 §2.1.2 sequence-wise loss: the expert-level loss per sequence, averaged over sequences;
    ``probs`` are the normalised affinities s / sum(s)."""
    B, T, E = probs_BTE.shape
    K = expert_ids_BTK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=probs_BTE.dtype, device=probs_BTE.device)
    counts_BE.scatter_add_(1, expert_ids_BTK.reshape(B, T * K), torch.ones_like(counts_BE[:, :1]).expand(B, T * K))
    f_BE = counts_BE * E / (K * T)
    return (f_BE * probs_BTE.mean(1)).sum(-1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE (Zoph et al. 2022 eq. 5): mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of each token's distribution over experts; log(E) is uniform, 0 is one-hot."""
    return -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3 §2.1.2; Wang et al. 2024): after the optimizer step, lower the bias
    of overloaded experts and raise it for underloaded ones by ``rate``. Returns the new bias.

    It runs outside the forward pass on purpose: the bias must reflect a whole step's load (all micro-batches,
    and all ranks once counts are all-reduced), and must not feed gradients into the router.
    """
    counts_E = counts_E.to(bias_E.dtype)
    return bias_E + rate * torch.sign(counts_E.mean() - counts_E)
