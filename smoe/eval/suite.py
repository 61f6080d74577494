"""What a head-to-head suite is: its architectures (``Arch``), what they are matched on, its pre-registered
contrasts (``Contrast``: the one to three comparisons the verdict corrects for, declared before anything runs), the
seeds its design needs, and the dense compute ladder its power check reads. ``check_design`` builds every
configuration and checks the matching, the contrasts and the ladder before any training.

The built-in suites are in smoe.eval.suites; how a suite lies on disk is smoe.eval.layout.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from smoe import presets
from smoe.accounting import account
from smoe.config import ModelConfig, override
from smoe.upcycling.spec import UpcycleSpec

# Matched parameters (embedding and head excluded) may differ by at most 2% from the suite's reference: with the
# embeddings counted, 5% let the FFNs of a small model differ by about 10%.
MATCH_TOLERANCE = 0.02
# The power check's ladder: enough dense rungs over enough compute to fit loss against compute on every seed.
MIN_RUNGS, MIN_SPAN = 4, 4.0
MAX_CONTRASTS = 3

Matching = Literal["active", "total", "tokens"]


@dataclass(frozen=True)
class Arch:
    label: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    # Two-phase suites: the MoE smoe.upcycle makes of this dense architecture, and whether the run starts from the
    # suite trunk's checkpoint (upcycled by ``upcycle``, else continued as it is) or from scratch.
    upcycle: UpcycleSpec | None = None
    from_trunk: bool = False
    # The learning rate this architecture trains at in the suite (tuned on TUNE_SEED, docs/results.md); None: the
    # suite's `lr`. --tune-lr tunes again.
    lr: float | None = None
    # Scale the routed experts' combine weights (moe.routed_scaling_factor, DeepSeek-V2/V3's published lever) so
    # that they sum to 1 at initialisation, as a renormalised router's and a shared expert's do (routed_gate_sum).
    match_gate: bool = False

    def config(self) -> ModelConfig:
        config = override(presets.get(self.preset), self.overrides) if self.overrides else presets.get(self.preset)
        config = self.upcycle.config(config) if self.upcycle is not None else config
        if self.match_gate:
            gate = routed_gate_sum(config)
            if gate is None:
                raise ValueError(f"match_gate: {self.label!r} has no routed experts with a per-token gate to match")
            scale = float(f"{config.moe.routed_scaling_factor / gate:.3g}")
            config = override(config, {"moe.routed_scaling_factor": scale})
        return config

    def definition(self) -> dict[str, Any]:
        """Its fields, those at their default left out."""
        return {k: v for k, v in asdict(self).items()
                if k in ("label", "preset", "overrides") or v != Arch.__dataclass_fields__[k].default}


@dataclass(frozen=True)
class Contrast:
    """A pre-registered comparison: the paired difference a − b of final validation loss over seeds, corrected
    (Holm) together with the suite's other contrasts and nothing else. ``matching`` is what makes the pair fair:
    equal activated or total parameters without the embedding and head (checked), or only equal training tokens.
    ``why``: the question it answers, with its source."""

    a: str
    b: str
    matching: Matching
    why: str

    @property
    def name(self) -> str:
        return f"{self.a} − {self.b}"


@dataclass(frozen=True)
class Suite:
    """Architectures compared, and what they are matched on: ``active`` (equal activated parameters, the first
    architecture the reference), ``total`` (DeepSeekMoE Table 1: equal total parameters among the MoE
    architectures, activated parameters differing and shown; a dense model is the activated-size reference) or
    ``none`` (compared by training compute: the upcycling suite)."""

    archs: list[Arch]
    contrasts: tuple[Contrast, ...] = ()
    matching: Literal["active", "total", "none"] = "active"
    # Dense models at other widths, trained on the same tokens and seeds: with the suite's own dense models they are
    # the compute ladder of the power check and of each MoE's effective compute multiplier (smoe.eval.power).
    ladder: list[Arch] = field(default_factory=list)
    # Two-phase suites: a dense model trained first, for ``trunk_steps`` (CompareSettings); the architectures
    # marked from_trunk start from its checkpoint and train `steps` more on the data order after it, the others
    # train trunk_steps + `steps` from scratch, so every run sees the same tokens.
    trunk: Arch | None = None
    # Seeds the design needs: what the contrasts' expected spread takes to detect the target gap (docs/compare.md).
    seeds: int = 12

    def runs(self) -> list[Arch]:
        """Every architecture trained: the compared ones, then the ladder's."""
        return [*self.archs, *self.ladder]

    def definition(self) -> dict[str, Any]:
        """The architectures, contrasts and ladder as suite.json records them (its fingerprint hashes this)."""
        definition: dict[str, Any] = {"archs": [a.definition() for a in self.archs],
                                      "contrasts": [asdict(c) for c in self.contrasts], "matching": self.matching}
        if self.ladder:
            definition["ladder"] = [a.definition() for a in self.ladder]
        if self.trunk is not None:
            definition["trunk"] = self.trunk.definition()
        return definition


def default_contrasts(archs: list[Arch]) -> tuple[Contrast, ...]:
    """A custom comparison's contrasts: each architecture against the first (at most MAX_CONTRASTS of them)."""
    if len(archs) - 1 > MAX_CONTRASTS:
        raise ValueError(f"contrasts: {len(archs)} presets give {len(archs) - 1} comparisons with the first; name "
                         f"at most {MAX_CONTRASTS} as A:B pairs, so the correction is over what the design is for")
    return tuple(Contrast(a.label, archs[0].label, "active", "against the first preset") for a in archs[1:])


def parse_contrasts(text: str, archs: list[Arch]) -> tuple[Contrast, ...]:
    """``a:b,c:d`` -> the contrasts a − b and c − d at active matching."""
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    result = []
    for pair in pairs:
        a, sep, b = pair.partition(":")
        if not sep or not a or not b:
            raise ValueError(f"contrasts {pair!r}: expected A:B (the difference A − B), e.g. deepseekmoe:dense")
        result.append(Contrast(a.strip(), b.strip(), "active", "named on the command line"))
    return tuple(result)


def check_design(spec: Suite, seq_len: int) -> dict[str, dict[str, Any]]:
    """Parameters and FLOPs per token of every architecture (the ladder's too); raises if any config is invalid,
    if the matched parameters of any is more than MATCH_TOLERANCE off the reference's, if the LM loss cannot reach
    a router, if a contrast names an architecture the suite lacks or pairs two that are not matched as it says, or
    if a ladder has too few rungs or too little span. Nothing is trained before this passes."""
    table = _matched(spec.archs, seq_len, spec.matching)
    for arch in [*spec.ladder, *([spec.trunk] if spec.trunk else [])]:
        table[arch.label] = {**_matched([arch], seq_len, "none")[arch.label], "matched": False, "ladder": True}
    if not 1 <= len(spec.contrasts) <= MAX_CONTRASTS:
        raise ValueError(f"contrasts: a suite pre-registers 1 to {MAX_CONTRASTS}, got {len(spec.contrasts)}")
    labels = [a.label for a in spec.archs]
    for c in spec.contrasts:
        for label in (c.a, c.b):
            if label not in labels:
                raise ValueError(f"contrast {c.name}: no architecture {label!r} in the suite ({', '.join(labels)})")
        if c.matching in ("active", "total"):
            key = f"{c.matching}_non_embedding"
            gap = table[c.a][key] / table[c.b][key] - 1
            if abs(gap) > MATCH_TOLERANCE:
                raise ValueError(f"contrast {c.name}: matched on {c.matching} parameters, but {c.a!r} has "
                                 f"{gap:+.1%} of {c.b!r}'s ({c.matching} non-embedding); they must match within "
                                 f"{MATCH_TOLERANCE:.0%}")
    if spec.ladder:
        check_ladder([row for label, row in table.items() if not row["moe"] and label not in
                      ([spec.trunk.label] if spec.trunk else [])])
    if len(set(labels)) != len(labels) or len({a.label for a in spec.runs()}) != len(spec.runs()):
        raise ValueError("suite: two architectures share a label")
    return table


def check_ladder(rungs: list[dict[str, Any]]) -> None:
    """At least MIN_RUNGS dense rungs spanning at least MIN_SPAN times the training FLOPs of the smallest."""
    flops = sorted(r["flops_per_token"] for r in rungs)
    if len(flops) < MIN_RUNGS or flops[-1] / flops[0] < MIN_SPAN:
        raise ValueError(f"ladder: {len(flops)} dense rungs spanning {flops[-1] / flops[0]:.2f}x the FLOPs per "
                         f"token; the power check needs at least {MIN_RUNGS} spanning {MIN_SPAN:g}x")


def _matched(archs: list[Arch], seq_len: int, matching: str) -> dict[str, dict[str, Any]]:
    table = {}
    for arch in archs:
        try:
            config = arch.config()
            acc = account(config, seq_len=seq_len)
        except ValueError as err:
            raise ValueError(f"suite architecture {arch.label!r}: {err}") from None
        if config.moe is not None and config.moe.gate_is_constant:
            raise ValueError(f"suite architecture {arch.label!r}: moe.top_k=1 with moe.norm_topk_prob=true fixes "
                             "every routing weight, so the LM loss never reaches the router; set "
                             "moe.norm_topk_prob=false (Switch weights the expert by its probability)")
        embedding = acc.params_by_component.get("embedding", 0) + acc.params_by_component.get("head", 0)
        table[arch.label] = {"active_params": acc.active_params, "total_params": acc.total_params,
                             "active_non_embedding": acc.active_params - embedding,
                             "total_non_embedding": acc.total_params - embedding,
                             "flops_per_token": acc.forward_flops_per_token,
                             "train_flops_per_token": acc.train_flops_per_token, "moe": config.moe is not None}
    if matching == "none":  # compared by training compute instead (the upcycling suite)
        first = table[archs[0].label]["active_params"]
        for row in table.values():
            row.update(matched=False, active_vs_first=row["active_params"] / first - 1)
        return table
    key = {"active": "active_non_embedding", "total": "total_non_embedding"}[matching]
    matched = [label for label, row in table.items() if matching == "active" or row["moe"]]
    if not matched:
        raise ValueError("suite: total matching needs at least one MoE architecture")
    ref_label = matched[0]
    ref = table[ref_label][key]
    for label, row in table.items():
        row["active_vs_first"] = row["active_params"] / table[archs[0].label]["active_params"] - 1
        row["matched"] = label in matched
        row["matched_vs_reference"] = row[key] / ref - 1
        if row["matched"] and abs(row["matched_vs_reference"]) > MATCH_TOLERANCE:
            raise ValueError(f"suite architecture {label!r}: {row[key]:,} {matching} non-embedding parameters, "
                             f"{row['matched_vs_reference']:+.1%} from {ref_label!r} ({ref:,}); they must match "
                             f"within {MATCH_TOLERANCE:.0%}")
    return table


@functools.cache
def routed_gate_sum(config: ModelConfig, tokens: int = 4096, draws: int = 4) -> float | None:
    """The mean over tokens of the routed experts' combine weights summed, at initialisation (None without routed
    experts, or for expert choice, which has no per-token set). Renormalised routers give routed_scaling_factor;
    unnormalised softmax top-k over E near-uniform scores about k/E, so its routed experts start with a tenth of the
    weight a shared expert (weight 1) has: a confound for shared-vs-routed and knock-out comparisons, which
    ``moe.routed_scaling_factor`` (DeepSeek-V2/V3's lever) can match. Measured on the router at its initial scale
    (``init_std``) over unit-RMS inputs, as the MoE layer's RMSNorm gives them."""
    moe = config.moe
    if moe is None or moe.routing == "expert_choice":
        return None
    if moe.routing == "hash":
        return 1.0
    import torch

    from smoe.moe.router import token_choice

    gen = torch.Generator().manual_seed(0)
    sums = []
    for _ in range(draws):
        w_ED = torch.randn(moe.n_routed_experts, config.dim, generator=gen) * config.init_std
        x_TD = torch.randn(tokens, config.dim, generator=gen)
        bias = torch.zeros(moe.n_routed_experts) if moe.has_expert_bias else None
        routing = token_choice(x_TD @ w_ED.t(), moe, bias)
        sums.append(routing.weights_A.view(tokens, -1).sum(-1).mean().item())
    return sum(sums) / len(sums)
