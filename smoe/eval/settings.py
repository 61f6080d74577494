"""What every run of a head-to-head shares: ``CompareSettings`` (the training settings, the data, the seeds, the
fixed validation set, the checkpoints) and the TrainConfig each run is given from them. No torch import: the command
line builds its flags from this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from smoe.config_rules import check_types, fail, option, positive
from smoe.train.config import DataConfig, TrainConfig

# The TrainConfig fields `smoe compare` takes as flags, and the defaults a head-to-head gives them where they differ
# from a single run's: 400 steps of 16 x 128 tokens (819,200 tokens per run) reach the regime where the dense
# ladder of the built-in suites separates on a CPU (docs/results.md), with a validation curve every 50 steps.
COMPARE_FIELDS = ("steps", "batch_size", "seq_len", "lr", "eval_every", "eval_batches", "precision", "device")
COMPARE_DEFAULTS = {"steps": 400, "batch_size": 16, "seq_len": 128, "eval_every": 50}
# The CompareSettings fields `smoe compare` takes as flags.
COMPARE_OWN = ("seeds", "checkpoints", "tune_lr", "val_tokens", "target_gap", "trunk_steps", "long_context")
# Fractions of training at which every MoE run also saves a checkpoint: OLMoE §5.1 reads router saturation from 1%
# of training on, where most of the change happens.
EARLY_CHECKPOINTS = (0.01, 0.1)
# Which documents are held out for validation: the same for every run of a suite, whatever its seed.
SPLIT_SEED = 0
# The seed --tune-lr trains at: no contrast uses it, so the rate is not chosen on the runs it is judged on.
TUNE_SEED = 10_000
# Share of each source held out (without `val_data`): enough for `val_tokens` from every source of the built-in
# corpora (the 2% of a single run holds about 50,000 tokens of the standard library).
VAL_FRACTION = 0.05


@dataclass(frozen=True)
class CompareSettings:
    """What every run of a suite shares: the training settings (each run gets its own seed), the data, the seeds,
    the fixed validation set and the checkpoints kept."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(**COMPARE_DEFAULTS))
    data: DataConfig = field(default_factory=DataConfig)
    seeds: int | None = option(
        None, "seeds per architecture (default: the suite's design, what its pre-registered contrasts need; "
              "seeds can be added later, finished runs are reused)")
    checkpoints: int = option(2, "evenly spaced checkpoints of each run (the last is the final model), besides "
                                 "early ones of the MoE runs at 1% and 10% of training for the router-saturation "
                                 "analysis; each holds the whole model")
    tune_lr: tuple[float, ...] = option(
        (), "learning rates to try per architecture, e.g. 1e-3,2e-3,4e-3: each is trained once on a seed no "
            "contrast uses, and the one with the lowest validation loss trains every seed")
    val_tokens: int = option(
        65536, "validation tokens every run is finally evaluated on: one fixed set drawn from every source, the "
               "same for every seed and architecture (the periodic evaluations read its first `eval_batches`)")
    target_gap: float = option(
        0.03, "the gap (nats) the design aims to detect: the report gives how many seeds each contrast's measured "
              "spread needs for it, and the steps the dense ladder needs to separate by 5 times it")
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
        positive("seeds", self.seeds, allow_none=True)
        positive("checkpoints", self.checkpoints)
        if self.tune_lr and (len(self.tune_lr) < 2 or len(set(self.tune_lr)) != len(self.tune_lr)):
            fail("tune_lr", f"must be two or more different learning rates, got {self.tune_lr}")
        for lr in self.tune_lr:
            positive("tune_lr", lr)
        positive("val_tokens", self.val_tokens)
        positive("target_gap", self.target_gap)
        positive("trunk_steps", self.trunk_steps, allow_none=True)
        positive("long_context", self.long_context)
        if self.data.split_seed is not None:
            fail("split_seed", "is the suite's to fix (every run is evaluated on the same held-out documents)")
        return self

    @property
    def trunk_length(self) -> int:
        """Steps of a two-phase suite's trunk, the data-order step its branches start at."""
        return self.trunk_steps if self.trunk_steps is not None else self.train.steps

    @property
    def val_batches(self) -> int:
        """Batches of the final evaluation: the fewest that hold ``val_tokens``."""
        return math.ceil(self.val_tokens / (self.train.batch_size * self.train.seq_len))

    def run_config(self, seed: int, lr: float | None = None, steps: int | None = None, moe: bool = True
                   ) -> TrainConfig:
        """The TrainConfig of one run: the suite's, with the seed (and the architecture's learning rate, and its
        own length in a two-phase suite), the final evaluation over the fixed validation set, ``checkpoints``
        evenly spaced checkpoints and, for an MoE (``moe``), early ones (EARLY_CHECKPOINTS); no time-based ones,
        so every architecture is analysed at the same steps. Only the newest keeps its optimizer state (to
        resume), and not once the run has finished (smoe.eval.compare drops it): the analyses read models only."""
        steps = self.train.steps if steps is None else steps
        every = max(1, steps // self.checkpoints)
        regular = set(range(every, steps + 1, every))
        early = tuple(sorted({max(1, round(f * steps)) for f in EARLY_CHECKPOINTS} - regular)) if moe else ()
        final = max(self.val_batches, self.train.eval_batches)
        return replace(self.train, seed=seed, lr=self.train.lr if lr is None else lr, steps=steps, save_every=every,
                       save_at=early, keep_last=self.checkpoints + len(early) + 1, keep_optimizer=1,
                       save_every_minutes=0.0, final_eval_batches=final)

    def run_data(self, tokenizer: str | None) -> DataConfig:
        """The DataConfig of every run: the suite's data, its one tokenizer and its fixed validation split."""
        return replace(self.data, tokenizer=tokenizer, split_seed=SPLIT_SEED,
                       val_fraction=self.data.val_fraction or VAL_FRACTION)

    def definition(self) -> dict[str, Any]:
        """What makes runs comparable, flat: the compare flags' fields, the data, the validation set and the
        checkpoints, plus any other field set away from its default. The seeds are left out on purpose: rerunning
        with more seeds reuses the finished ones; so are ``long_context`` and ``target_gap``, which no run
        depends on (the report recomputes what they change)."""
        base = TrainConfig(**COMPARE_DEFAULTS)
        kept = {name: getattr(self.train, name) for name in COMPARE_FIELDS}
        kept.update({f.name: getattr(self.train, f.name) for f in fields(TrainConfig)
                     if f.name not in COMPARE_FIELDS and f.name != "seed"
                     and getattr(self.train, f.name) != getattr(base, f.name)})
        kept.update(data=self.data.data, val_data=self.data.val_data, checkpoints=self.checkpoints,
                    val_tokens=self.val_tokens)
        kept.update({f.name: getattr(self.data, f.name) for f in fields(DataConfig)
                     if f.name not in kept and getattr(self.data, f.name) != f.default})
        if self.tune_lr:
            kept["tune_lr"] = list(self.tune_lr)
        if self.trunk_steps is not None:
            kept["trunk_steps"] = self.trunk_steps
        return kept
