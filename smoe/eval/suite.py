"""What a head-to-head suite is and how it lies on disk; compare (which trains it), collect and report (which read
it) all take it from here.

A suite is a list of architectures (``Arch``) matched within ``MATCH_TOLERANCE`` activated parameters, trained
under one ``CompareSettings``. Its directory holds ``suite.json`` (the definition and its fingerprint) and one run
per architecture and seed under ``runs/<arch>/seed<k>``, each with the ``metrics.jsonl`` and ``summary.json`` that
``smoe train`` writes. A two-phase suite (``upcycling``) first trains a dense trunk (``runs/trunk/seed<k>``); the
architectures marked ``from_trunk`` start from its checkpoint (upcycled into ``init/<arch>/seed<k>``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from smoe import presets
from smoe.accounting import account
from smoe.config import ModelConfig, override
from smoe.config_rules import check_types, fail, option, positive
from smoe.io.files import parse_json, read_json
from smoe.train.config import DataConfig, TrainConfig
from smoe.upcycling.spec import UpcycleSpec

# Matched parameters (embedding and head excluded) may differ by at most 2% from the suite's reference: with the
# embeddings counted, 5% let the FFNs of a small model differ by about 10%.
MATCH_TOLERANCE = 0.02


@dataclass(frozen=True)
class Arch:
    label: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    # Two-phase suites: the MoE smoe.upcycle makes of this dense architecture, and whether the run starts from the
    # suite trunk's checkpoint (upcycled by ``upcycle``, else continued as it is) or from scratch.
    upcycle: UpcycleSpec | None = None
    from_trunk: bool = False

    def config(self) -> ModelConfig:
        config = override(presets.get(self.preset), self.overrides) if self.overrides else presets.get(self.preset)
        return self.upcycle.config(config) if self.upcycle is not None else config

    def definition(self) -> dict[str, Any]:
        """Its fields, the two-phase ones only where set: suites defined before them keep their fingerprint."""
        fields_ = asdict(self)
        for name, unset in (("upcycle", None), ("from_trunk", False)):
            if fields_[name] == unset:
                del fields_[name]
        return fields_


def _fine(n_experts: int, k: int, width: int, **extra) -> dict[str, Any]:
    return {"moe.n_routed_experts": n_experts, "moe.top_k": k, "moe.expert_dim": width, **extra}


@dataclass(frozen=True)
class Suite:
    """Architectures compared, and what they are matched on: ``active`` (equal activated parameters, the first
    architecture the reference) or ``total`` (DeepSeekMoE Table 1: equal total parameters among the MoE
    architectures, activated parameters differing and shown; a dense model is the activated-size reference)."""

    archs: list[Arch]
    matching: Literal["active", "total", "none"] = "active"
    # Dense models at other widths, trained on the same tokens and seeds: with the suite's own dense models they are
    # the compute ladder each MoE's effective compute multiplier is read from (smoe.eval.ladder). Not matched.
    ladder: list[Arch] = field(default_factory=list)
    # Two-phase suites: a dense model trained first, for ``trunk_steps`` (CompareSettings); the architectures
    # marked from_trunk start from its checkpoint and train `steps` more on the data order after it, the others
    # train trunk_steps + `steps` from scratch, so every run sees the same tokens.
    trunk: Arch | None = None

    def runs(self) -> list[Arch]:
        """Every architecture trained: the compared ones, then the ladder's."""
        return [*self.archs, *self.ladder]


# The active-matched suites hold the activated FFN width at the dense model's 1024 hidden units
# (smoe/presets/ablation.py).
SUITES: dict[str, Suite] = {
    "seeds-debate": Suite([Arch(n, n) for n in
                           ("dense", "switch", "gshard", "mixtral-style", "deepseekmoe", "deepseek-v3-style")],
                          ladder=[Arch("dense-512", "dense", {"ffn_dim": 512}),
                                  Arch("dense-2048", "dense", {"ffn_dim": 2048})]),
    # DeepSeekMoE Table 1 at this size: every MoE holds 16 FFN-equivalents (16 x 1024 hidden units) in total; Hash
    # and Switch activate one, GShard and DeepSeekMoE two (1 shared + 7 of 63 routed quarter-width experts).
    "table-1": Suite([
        Arch("dense", "dense"),
        Arch("hash", "switch", {"moe.routing": "hash", "moe.balance": "none"}),
        Arch("switch", "switch"),
        Arch("gshard", "gshard", {"moe.expert_dim": 1024}),
        Arch("deepseekmoe", "deepseekmoe", _fine(63, 7, 256, **{"moe.n_shared_experts": 1})),
    ], matching="total"),
    # The seeds-debate's architectures at table-1's total-parameter budget (16 x 1024 hidden units of experts):
    # Mixtral's 8 experts are each twice the dense FFN, so it activates 4 FFN-equivalents; the fine-grained ones
    # activate 2 of 256-wide experts (V3-style has 64 routed, not 63, so its 8 routing groups are equal: +1.6%).
    "seeds-debate-total": Suite([
        Arch("dense", "dense"),
        Arch("switch", "switch"),
        Arch("gshard", "gshard", {"moe.expert_dim": 1024}),
        Arch("mixtral-style", "mixtral-style", {"moe.expert_dim": 2048}),
        Arch("deepseekmoe", "deepseekmoe", _fine(63, 7, 256, **{"moe.n_shared_experts": 1})),
        Arch("deepseek-v3-style", "deepseek-v3-style", _fine(64, 7, 256)),
    ], matching="total", ladder=[Arch("dense-512", "dense", {"ffn_dim": 512}),
                                 Arch("dense-2048", "dense", {"ffn_dim": 2048})]),
    "granularity": Suite([
        # Top-1 renormalised would fix every gate at 1 and cut the router off the LM loss: weight by p, as Switch.
        Arch("E8-k1", "mixtral-style", _fine(8, 1, 1024, **{"moe.norm_topk_prob": False})),
        Arch("E16-k2", "mixtral-style", _fine(16, 2, 512)),
        Arch("E32-k4", "mixtral-style", _fine(32, 4, 256)),
        Arch("E64-k8", "mixtral-style", _fine(64, 8, 128)),
    ]),
    "shared": Suite([
        Arch("shared-0", "deepseekmoe", _fine(64, 8, 128, **{"moe.n_shared_experts": 0})),
        Arch("shared-1", "deepseekmoe", _fine(64, 7, 128, **{"moe.n_shared_experts": 1})),
        Arch("shared-2", "deepseekmoe", _fine(64, 6, 128, **{"moe.n_shared_experts": 2})),
        Arch("shared-4", "deepseekmoe", _fine(64, 4, 128, **{"moe.n_shared_experts": 4})),
    ]),
    "balance": Suite([
        Arch("aux-0.01", "deepseek-v3-style", {"moe.balance": "aux", "moe.aux_loss_coef": 0.01}),
        Arch("seq-aux", "deepseek-v3-style", {"moe.balance": "seq_aux", "moe.seq_aux_loss_coef": 1e-3}),
        Arch("aux-free", "deepseek-v3-style", {"moe.balance": "aux_free", "moe.seq_aux_loss_coef": 0.0}),
        Arch("none", "deepseek-v3-style", {"moe.balance": "none"}),
    ]),
    "capacity": Suite([
        Arch("cf-1.0", "gshard", {"moe.capacity_factor": 1.0, "moe.capacity_priority": "choice"}),
        Arch("cf-1.25", "gshard", {"moe.capacity_factor": 1.25, "moe.capacity_priority": "choice"}),
        Arch("dropless", "gshard", {"moe.capacity_factor": None}),
    ]),
    # Komatsuzaki et al. 2023's question at this size: after a dense trunk, is upcycling (copy: 8 copies of the FFN,
    # top-2; split: LLaMA-MoE's 16 groups of its hidden units, top-4) better than training the dense model on, for
    # the same extra compute? And than the same MoEs trained from scratch on the same tokens? Not matched on
    # parameters: the report compares by training compute.
    "upcycling": Suite([
        Arch("dense", "dense", from_trunk=True),
        Arch("upcycled-copy", "dense", upcycle=UpcycleSpec("copy", 8, 2), from_trunk=True),
        Arch("upcycled-split", "dense", upcycle=UpcycleSpec("split", 16, 4), from_trunk=True),
        Arch("scratch-copy", "dense", upcycle=UpcycleSpec("copy", 8, 2)),
        Arch("scratch-split", "dense", upcycle=UpcycleSpec("split", 16, 4)),
    ], matching="none", trunk=Arch("trunk", "dense")),
    # Issue 15: full attention against Qwen3-Next's 3:1 and MiniMax-01's 7:1 hybrids of Gated DeltaNet, on
    # mixtral-style at 8 layers (smoe/presets/ablation.py). A Gated DeltaNet layer holds 1.6% more parameters than
    # the attention layer it replaces and, at 128 tokens, 7% more forward FLOPs (its recurrence costs more than
    # attention scores over 64 positions on average): the models match within 0.4% on activated parameters and
    # within 1.3% on training FLOPs per token. At long context they part ways, which the report's long-context
    # section (smoe.eval.long_context) measures.
    "hybrid": Suite([
        Arch("full-attention", "mixtral-style", {"n_layers": 8}),
        Arch("hybrid-3to1", "hybrid-3to1"),
        Arch("hybrid-7to1", "hybrid-7to1"),
    ]),
}


# The TrainConfig fields `smoe compare` takes as flags, and the defaults a head-to-head gives them where they differ
# from a single run's (longer runs, denser validation curves).
COMPARE_FIELDS = ("steps", "batch_size", "seq_len", "lr", "eval_every", "eval_batches", "precision", "device")
COMPARE_DEFAULTS = {"steps": 300, "eval_every": 25}
# The CompareSettings fields `smoe compare` takes as flags.
COMPARE_OWN = ("seeds", "checkpoints", "tune_lr", "trunk_steps", "long_context")
# Fractions of training at which every run also saves a checkpoint: OLMoE §5.1 reads router saturation from 1% of
# training on, where most of the change happens.
EARLY_CHECKPOINTS = (0.01, 0.1)


@dataclass(frozen=True)
class CompareSettings:
    """What every run of a suite shares: the training settings (each run gets its own seed), the data, and how
    many seeds and intermediate checkpoints."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(**COMPARE_DEFAULTS))
    data: DataConfig = field(default_factory=DataConfig)
    seeds: int = option(1, "seeds per architecture (3+ separates seed noise)")
    checkpoints: int = option(4, "evenly spaced checkpoints of each run, besides early ones at 1% and 10% of "
                                 "training, for the router-saturation analysis (each holds the whole model)")
    tune_lr: tuple[float, ...] = option(
        (), "learning rates to try per architecture, e.g. 1e-3,2e-3,4e-3: each is trained once (seed 0) and the "
            "one with the lowest validation loss trains every seed, so one shared rate does not decide the ranking")
    trunk_steps: int | None = option(
        None, "two-phase suites (upcycling): steps the dense trunk trains before the runs that start from it train "
              "`steps` more (default: as many as `steps`)")
    long_context: int = option(
        8192, "suites whose architectures differ in layer_types (hybrid): the context, in tokens, at which the "
              "report measures decode speed and cache memory (fresh weights, max_seq_len raised for it alone)")

    def validate(self) -> "CompareSettings":
        self.train.validate()
        self.data.validate()
        check_types(self, "")
        positive("seeds", self.seeds)
        positive("checkpoints", self.checkpoints)
        if self.tune_lr and (len(self.tune_lr) < 2 or len(set(self.tune_lr)) != len(self.tune_lr)):
            fail("tune_lr", f"must be two or more different learning rates, got {self.tune_lr}")
        for lr in self.tune_lr:
            positive("tune_lr", lr)
        positive("trunk_steps", self.trunk_steps, allow_none=True)
        positive("long_context", self.long_context)
        return self

    @property
    def trunk_length(self) -> int:
        """Steps of a two-phase suite's trunk, the data-order step its branches start at."""
        return self.trunk_steps if self.trunk_steps is not None else self.train.steps

    def run_config(self, seed: int, lr: float | None = None, steps: int | None = None) -> TrainConfig:
        """The TrainConfig of one run: the suite's, with the seed (and the architecture's tuned learning rate, and
        its own length in a two-phase suite), ``checkpoints`` evenly spaced checkpoints and early ones
        (EARLY_CHECKPOINTS); no time-based ones, so every architecture is analysed at the same steps. Only the
        newest keeps its optimizer state (to resume): the analyses read the others' models."""
        steps = self.train.steps if steps is None else steps
        every = max(1, steps // self.checkpoints)
        regular = set(range(every, steps + 1, every))
        early = tuple(sorted({max(1, round(f * steps)) for f in EARLY_CHECKPOINTS} - regular))
        return replace(self.train, seed=seed, lr=self.train.lr if lr is None else lr, steps=steps, save_every=every,
                       save_at=early, keep_last=self.checkpoints + len(early) + 1, keep_optimizer=1,
                       save_every_minutes=0.0)

    def definition(self) -> dict[str, Any]:
        """What makes runs comparable, flat: the compare flags' fields, the data and the checkpoints, plus any other
        field set away from its default. The seeds are left out on purpose: rerunning with more seeds reuses the
        finished ones; so is ``long_context``, which no run depends on (the report remeasures when it changes)."""
        base = TrainConfig(**COMPARE_DEFAULTS)
        kept = {name: getattr(self.train, name) for name in COMPARE_FIELDS}
        kept.update({f.name: getattr(self.train, f.name) for f in fields(TrainConfig)
                     if f.name not in COMPARE_FIELDS and f.name != "seed"
                     and getattr(self.train, f.name) != getattr(base, f.name)})
        kept.update(data=self.data.data, val_data=self.data.val_data, checkpoints=self.checkpoints)
        kept.update({f.name: getattr(self.data, f.name) for f in fields(DataConfig)
                     if f.name not in kept and getattr(self.data, f.name) != f.default})
        if self.tune_lr:
            kept["tune_lr"] = list(self.tune_lr)
        if self.trunk_steps is not None:
            kept["trunk_steps"] = self.trunk_steps
        return kept


def resolve_suite(suite: str | None, preset_list: str | None) -> tuple[str, Suite]:
    if (suite is None) == (preset_list is None):
        raise ValueError("compare: give `suite` NAME or `presets` a,b,c (exactly one)")
    if suite is not None:
        if suite not in SUITES:
            raise ValueError(f"suite: unknown suite {suite!r}; known: {', '.join(SUITES)}")
        return suite, SUITES[suite]
    names = [n.strip() for n in preset_list.split(",") if n.strip()]
    if len(names) < 2:
        raise ValueError("presets: name at least two presets to compare")
    return "custom", Suite([Arch(n, n) for n in names])


def check_matched(archs: list[Arch], seq_len: int, matching: str = "active") -> dict[str, dict[str, Any]]:
    """Parameters and FLOPs per token of each architecture; raises if the matched parameters (without embedding and
    head) of any is more than MATCH_TOLERANCE off the reference's, or if the LM loss cannot reach a router.
    Building every config here also rejects unknown presets and bad overrides before any training.

    ``active``: the reference is the first architecture and every one is matched. ``total``: the reference is the
    first MoE architecture and the MoE ones are matched on total parameters; dense ones are shown, not matched."""
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
                             "flops_per_token": acc.forward_flops_per_token, "moe": config.moe is not None}
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


def suite_definition(suite: str, spec: Suite, settings: CompareSettings) -> dict[str, Any]:
    """What makes runs comparable (CompareSettings.definition); suite.json records its fingerprint. The matching
    is named only when it is not the default, so suites defined before it existed keep their fingerprint."""
    definition = {"suite": suite, "archs": [a.definition() for a in spec.archs], "settings": settings.definition()}
    if spec.matching != "active":
        definition["matching"] = spec.matching
    if spec.ladder:
        definition["ladder"] = [a.definition() for a in spec.ladder]
    if spec.trunk is not None:
        definition["trunk"] = spec.trunk.definition()
    return definition


def fingerprint(definition: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(out: Path, arch: Arch, seed: int) -> Path:
    return out / "runs" / arch.label / f"seed{seed}"


def init_dir(out: Path, arch: Arch, seed: int) -> Path:
    """Where a two-phase suite writes the upcycled trunk checkpoint that ``arch``'s run of ``seed`` starts from."""
    return out / "init" / arch.label / f"seed{seed}"


def tune_dir(out: Path, arch: Arch, lr: float) -> Path:
    """Where ``--tune-lr`` trains ``arch`` at ``lr`` (seed 0)."""
    return out / "tune" / arch.label / f"lr{lr:g}"


LR_FILE = "lr.json"  # per architecture: the validation loss at each tried learning rate, and the one chosen


def read_learning_rates(out: Path) -> dict[str, dict[str, Any]] | None:
    """``lr.json`` of a suite that tuned its learning rates: {label: {"tried": {lr: val_loss}, "chosen": lr}}."""
    return read_json(out / LR_FILE) if (out / LR_FILE).is_file() else None


def read_summary(run: Path) -> dict[str, Any]:
    return read_json(run / "summary.json")


def finished(run: Path, steps: int) -> bool:
    return (run / "summary.json").is_file() and read_summary(run).get("step") == steps


def read_rows(run: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl. A last line without its newline is a row a killed run was still
    writing, and is skipped when it does not parse; any other bad line raises, naming ``file:line``."""
    path = run / "metrics.jsonl"
    lines = path.read_bytes().split(b"\n")  # the last item is b"" when the file ends with its newline
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(parse_json(line, f"{path}:{number}"))
        except ValueError:
            if number == len(lines):
                break
            raise
    return rows
