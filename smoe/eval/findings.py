"""What the specialisation analyses find on one checkpoint, as types: ``Analysis`` (what
smoe.eval.analysis.analyze returns) is made of one dataclass per finding, and each finding knows its JSON and its
lines (what ``smoe analyze`` prints); how its values over seeds render in the report is its section in
smoe.eval.specialisation. Adding an analysis: its computation (smoe.eval.analysis or routing_stats), a dataclass
here, a field of ``Analysis``, and its section in ``specialisation.FINDINGS``.

Every finding is exploratory: the intervals are uncorrected 95% t-intervals over seeds.

``Runs`` below is {architecture: [its Analysis on seed 0, seed 1, ...]}.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Consecutive:
    """How often token t+1 reuses token t's experts, and what independent routing would give (Mixtral §5;
    routing_stats.consecutive_rates)."""

    first: float
    first_uniform: float
    first_load_weighted: float
    any: float
    any_uniform: float
    any_load_aware: float
    any_load_aware_std: float

    @property
    def first_vs_chance(self) -> float | None:
        return self.first / self.first_load_weighted if self.first_load_weighted > 0 else None

    @property
    def any_vs_chance(self) -> float | None:
        return self.any / self.any_load_aware if self.any_load_aware > 0 else None


@dataclass(frozen=True)
class Specialisation:
    """Domain specialisation against shuffled sources and the vocabulary baseline (routing_stats.specialisation)."""

    score: float
    shuffled_mean: float
    shuffled_std: float
    permutations: int
    vocabulary: float | None = None


@dataclass(frozen=True)
class Coactivation:
    """OLMoE §5's co-activation against independent routing (routing_stats.coactivation)."""

    max_partner: float
    chance: float
    top_pair: tuple[int, int, float]


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's traced routing on the analysis batches."""

    routing: str
    load: list[int]
    consecutive: Consecutive
    top_tokens: dict[int, list[tuple[str, float]]]
    coactivation: Coactivation | None = None
    domain_affinity: list[list[float]] | None = None
    specialisation: Specialisation | None = None

    @property
    def dead(self) -> int:
        return sum(1 for x in self.load if x == 0)


@dataclass(frozen=True)
class Redundancy:
    """DeepSeekMoE Fig. 4: the loss with each token's top-scored ``ratios`` of routed experts disabled."""

    ratios: list[float]
    disabled_experts: list[int]
    loss: list[float]
    skipped_layers: dict[str, str]

    @property
    def rise(self) -> list[float]:
        return [x - self.loss[0] for x in self.loss]


@dataclass(frozen=True)
class Analysis:
    """Every finding on one checkpoint (analysis.analyze). ``saturation``: {step: {layer: (overlap, chance)}}."""

    loss: float
    sources: list[str]
    layers: dict[int, LayerRouting]
    knockout: dict[str, float] = field(default_factory=dict)
    knockout_fraction: dict[str, float] = field(default_factory=dict)
    shared_to_routed_top_k: int | None = None
    redundancy: Redundancy = field(default_factory=lambda: Redundancy([], [], [], {}))
    saturation: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)
    dropless_loss: float | None = None

    def to_json(self) -> dict[str, Any]:
        """analysis.json's keys: ``loss``, ``sources``, ``layers`` {layer: load, dead, consecutive, ...},
        ``knockout``, ``knockout_fraction``, ``redundancy``, ``saturation`` {step: mean over layers},
        ``saturation_by_layer`` {step: {layer: {overlap, chance}}}, and where present ``dropless_loss`` and
        ``shared_to_routed_top_k``."""
        layers = {}
        for idx, layer in self.layers.items():
            entry = {"routing": layer.routing, "load": layer.load, "dead": layer.dead,
                     "consecutive": {**asdict(layer.consecutive), "first_vs_chance": layer.consecutive.first_vs_chance,
                                     "any_vs_chance": layer.consecutive.any_vs_chance},
                     "top_tokens": {str(e): [list(t) for t in v] for e, v in layer.top_tokens.items()}}
            for name in ("coactivation", "domain_affinity", "specialisation"):
                value = getattr(layer, name)
                if value is not None:
                    entry[name] = asdict(value) if name != "domain_affinity" else value
            layers[str(idx)] = entry
        result = {"loss": self.loss, "sources": self.sources, "layers": layers, "knockout": self.knockout,
                  "knockout_fraction": self.knockout_fraction, "redundancy": asdict(self.redundancy)}
        if self.saturation:
            result["saturation"] = {str(s): float(np.mean([o for o, _ in v.values()]))
                                    for s, v in self.saturation.items()}
            result["saturation_by_layer"] = {str(s): {str(i): {"overlap": o, "chance": c} for i, (o, c) in v.items()}
                                             for s, v in self.saturation.items()}
        if self.dropless_loss is not None:
            result["dropless_loss"] = self.dropless_loss
        if self.shared_to_routed_top_k is not None:
            result["shared_to_routed_top_k"] = self.shared_to_routed_top_k
        return result

    def lines(self) -> list[str]:
        """What ``smoe analyze`` prints: one finding a line."""
        out = []
        for idx, layer in self.layers.items():
            c = layer.consecutive
            out.append(f"layer {idx}: same first expert {c.first:.3f} (random {c.first_uniform:.3f}, load-weighted "
                       f"{c.first_load_weighted:.3f}), top-k overlap {c.any:.3f} (random {c.any_uniform:.3f}, "
                       f"load-aware {c.any_load_aware:.3f}), dead {layer.dead}")
            if layer.coactivation is not None:
                co = layer.coactivation
                out.append(f"  co-activation: most frequent partner {co.max_partner:.3f} (chance {co.chance:.3f})")
            if layer.specialisation is not None:
                sp = layer.specialisation
                vocabulary = "" if sp.vocabulary is None else f", vocabulary baseline {sp.vocabulary:.3f}"
                out.append(f"  specialisation {sp.score:.3f} (sources shuffled: {sp.shuffled_mean:.3f} ± "
                           f"{sp.shuffled_std:.3f}{vocabulary})")
        for name, rise in self.knockout.items():
            share = self.knockout_fraction.get(name)
            out.append(f"knock-out {name}: loss {rise:+.4f}" + (f" ({share:.1%} of routed experts)" if share else ""))
        red = self.redundancy
        if red.loss:
            out.append("redundancy, loss when each token loses its top-scored experts: " + ", ".join(
                f"{r * 16:g}/16 ({n}) {rise:+.4f}"
                for r, n, rise in zip(red.ratios, red.disabled_experts, red.rise, strict=True)))
        if self.dropless_loss is not None:
            out.append(f"dropless evaluation: loss {self.dropless_loss:.4f} ({self.dropless_loss - self.loss:+.4f})")
        for step, by_layer in self.saturation.items():
            out.append(f"saturation at step {step}: {np.mean([o for o, _ in by_layer.values()]):.3f} (chance "
                       f"{np.mean([c for _, c in by_layer.values()]):.3f})")
        return out

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Analysis":
        layers = {}
        for idx, v in d["layers"].items():
            c = v["consecutive"]
            layers[int(idx)] = LayerRouting(
                v.get("routing", "token_choice"), v["load"],
                Consecutive(**{f: c[f] for f in Consecutive.__dataclass_fields__}),
                {int(e): [tuple(t) for t in tokens] for e, tokens in v["top_tokens"].items()},
                Coactivation(**{**v["coactivation"], "top_pair": tuple(v["coactivation"]["top_pair"])})
                if "coactivation" in v else None,
                v.get("domain_affinity"), Specialisation(**v["specialisation"]) if "specialisation" in v else None)
        saturation = {int(s): {int(i): (x["overlap"], x["chance"]) for i, x in by_layer.items()}
                      for s, by_layer in d.get("saturation_by_layer", {}).items()}
        return Analysis(d["loss"], d["sources"], layers, d.get("knockout", {}), d.get("knockout_fraction", {}),
                        d.get("shared_to_routed_top_k"), Redundancy(**d["redundancy"]) if "redundancy" in d
                        else Redundancy([], [], [], {}), saturation, d.get("dropless_loss"))


Runs = dict[str, list[Analysis]]
