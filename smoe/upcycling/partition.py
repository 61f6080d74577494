"""How a dense FFN's hidden units are grouped into experts: LLaMA-MoE's neuron-independent constructions (Zhu et al.
2024, arXiv 2406.16554, §2.2), each group of equal size and every unit in exactly one group.

    random      a seeded random permutation of the units cut into equal groups (LLaMA-MoE's Independent_Random,
                the construction that did best in its comparison).
    clustering  balanced k-means on the L2-normalised rows of the gate projection (Independent_Clustering; the
                LLaMA-MoE scripts cluster the gate projection's rows by default, or the up projection's, with
                the size-constrained k-means of the k-means-constrained package). Here each assignment step is
                greedy instead of an exact min-cost flow: every (unit, centre) pair in order of distance, a unit
                taking the first centre that still has room. Units whose input directions are alike, and so
                tend to fire together, share an expert.

Legend: F hidden units, D model dim, G groups, W = F / G units per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KMEANS_ITERATIONS = 30  # an upper bound: the loop stops when an assignment repeats


def random_groups(n_units: int, n_groups: int, generator: torch.Generator) -> torch.Tensor:
    """(G, W) int64 unit indices, each row ascending."""
    return torch.randperm(n_units, generator=generator).view(n_groups, -1).sort(dim=1).values


def balanced_clusters(rows_FD: torch.Tensor, n_groups: int, generator: torch.Generator) -> torch.Tensor:
    """(G, W) int64 unit indices, each row ascending: balanced k-means of the rows' directions, started from
    ``n_groups`` distinct rows drawn at random."""
    x_FD = F.normalize(rows_FD.float(), dim=1)
    n_units = x_FD.shape[0]
    centres_GD = x_FD[torch.randperm(n_units, generator=generator)[:n_groups]]
    assign_F = None
    for _ in range(KMEANS_ITERATIONS):
        new_F = _balanced_assignment(torch.cdist(x_FD, centres_GD), n_units // n_groups)
        if assign_F is not None and torch.equal(new_F, assign_F):
            break
        assign_F = new_F
        centres_GD = torch.stack([x_FD[assign_F == g].mean(0) for g in range(n_groups)])
    return torch.stack([torch.nonzero(assign_F == g).squeeze(1) for g in range(n_groups)])


def _balanced_assignment(dist_FG: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each unit's group (int64, F): pairs taken in order of distance while the unit is free and the group has
    room. Every unit ends in a group, since the groups hold exactly F units between them."""
    n_units, n_groups = dist_FG.shape
    assign, room, left = [-1] * n_units, [capacity] * n_groups, n_units
    for pair in torch.argsort(dist_FG.flatten(), stable=True).tolist():
        unit, group = divmod(pair, n_groups)
        if assign[unit] < 0 and room[group]:
            assign[unit], room[group], left = group, room[group] - 1, left - 1
            if not left:
                break
    return torch.tensor(assign, dtype=torch.int64)
