"""What a training run is asked to do, written once: ``TrainConfig`` (the optimisation and its bookkeeping) and
``DataConfig`` (what it reads). Each field carries its help text; the command line's flags (``smoe train``,
``smoe compare``), run.json and the run config a head-to-head hands each child are all generated from these
dataclasses. Help texts and errors name fields in backticks (`batch_size`); the command line shows them as flags.

No torch import: the command line builds its parser from this module cheaply.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Any, Literal

from smoe.config.rules import check_types, fail, non_negative, option, positive


@dataclass(frozen=True)
class TrainConfig:
    steps: int = option(200, "optimizer steps to train")
    batch_size: int = option(8, "sequences per optimizer step (global)")
    seq_len: int = option(256, "tokens per training sequence")
    grad_accum: int = option(1, "micro-batches per step (divides `batch_size`)")
    lr: float = option(2e-3, "peak learning rate (warmup then cosine)")
    min_lr_ratio: float = option(0.1, "the cosine schedule ends at lr times this")
    warmup_steps: int | None = option(None, "linear warmup steps (default: 5% of the schedule, normally `steps`)")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (norms, biases and the router bias exempt)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = option(0, "seeds the weights and the data order")
    init_from: str | None = option(
        None, "a checkpoint or run directory whose weights start this run (continued training, e.g. of what `smoe "
              "upcycle` writes): its model config must be this run's; the optimizer starts fresh (`start_step` "
              "continues a schedule), and its tokenizer.json is used unless `tokenizer` names one")
    start_step: int = option(
        0, "the step of a longer run that this run continues: its step s reads that run's batch s + `start_step` "
           "and takes its learning rate there, so a run continued (`init_from`) from step N of a run with the same "
           "seed, data and schedule passes N and sees the batches and learning rates that run had not")
    schedule_steps: int | None = option(
        None, "steps the warmup + cosine schedule spans, from the longer run's step 0 (default: `start_step` + "
              "`steps`): a run that stops before its schedule ends, as the upcycling suite's dense trunk does")
    precision: Literal["auto", "bf16", "fp32"] = option(
        "auto", "auto (default): bf16 autocast on GPUs with native bf16 and CPUs with AMX tiles, else fp32")
    compile: bool = option(False, "torch.compile the model")
    document_boundaries: Literal["all", "linear", "none"] = option(
        "all", "how packed documents (each ended by the tokenizer's EOS token) are kept apart in training and "
               "evaluation: all (default): linear-attention layers reset their state and convolution history at each "
               "document, and softmax attention is masked to its document with positions from its start, so each "
               "document is computed as alone; linear: only the linear layers reset; none: documents flow into each "
               "other, as in runs recorded before this setting")
    eval_every: int = option(50, "steps between evaluations (0: only at the end)")
    eval_batches: int = option(8, "validation batches per evaluation")
    final_eval_batches: int | None = option(
        None, "validation batches of the last evaluation, of which the periodic ones use the first `eval_batches` "
              "(default: `eval_batches`); a head-to-head sets it to cover its whole fixed validation set")
    save_every: int = option(0, "steps between checkpoints (0: only at the end and by `save_every_minutes`)")
    save_every_minutes: float = option(
        10.0, "minutes of training between checkpoints, so a crash loses little (0: off); beside `save_every`")
    save_at: tuple[int, ...] = option(
        (), "further steps to checkpoint at, e.g. early ones for the router-saturation analysis (OLMoE §5.1)")
    keep_last: int = option(3, "checkpoints to keep")
    keep_optimizer: int | None = option(
        None, "of those, how many (the newest) keep their optimizer state; older ones keep the model only: enough "
              "to evaluate and analyse, not to resume, at a third of the size under AdamW (default: all)")
    max_bad_steps: int = option(5, "consecutive non-finite steps before stopping")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    expert_backend: str = option("auto",
                                 "expert kernel: auto (default), reference, cpp, expert_loop, grouped_mm, triton")
    peak_tflops: float | None = option(None, "device peak for MFU (default: known GPUs' datasheet bf16 peak; on a "
                                             "CPU no peak is trustworthy, so no MFU unless given)")
    ep: int = option(1, "expert-parallel ranks (launch with torchrun; see docs/distributed.md)")
    dp: int | None = option(None, "data-parallel replicas of each expert shard (default: processes / `ep`)")
    dist_timeout: float = option(
        300.0, "seconds before a rank waiting on a dead or hung rank stops with an error (default 300)")

    # Fields that may change between a run and its resumption without changing the optimisation.
    RESUMABLE_CHANGES = ("steps", "eval_every", "eval_batches", "final_eval_batches", "save_every",
                         "save_every_minutes", "save_at", "keep_last", "keep_optimizer", "max_bad_steps", "device",
                         "expert_backend", "peak_tflops", "compile", "ep", "dp", "dist_timeout")

    @property
    def schedule_length(self) -> int:
        return self.schedule_steps if self.schedule_steps is not None else self.start_step + self.steps

    @property
    def last_eval_batches(self) -> int:
        return self.final_eval_batches if self.final_eval_batches is not None else self.eval_batches

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.schedule_length // 20)

    def validate(self) -> "TrainConfig":
        check_types(self, "")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last", "max_bad_steps",
                     "ep", "lr", "eps", "dist_timeout"):
            positive(name, getattr(self, name))
        for name in ("dp", "peak_tflops", "keep_optimizer", "final_eval_batches"):
            positive(name, getattr(self, name), allow_none=True)
        for name in ("eval_every", "save_every", "seed", "grad_clip", "weight_decay", "save_every_minutes",
                     "start_step"):
            non_negative(name, getattr(self, name))
        if self.warmup_steps is not None:
            non_negative("warmup_steps", self.warmup_steps)
        for step in self.save_at:
            positive("save_at", step)
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                fail(name, f"must lie in [0, 1], got {getattr(self, name)!r}")
        if self.schedule_steps is not None and self.schedule_steps < self.start_step + self.steps:
            fail("schedule_steps", f"must cover start_step + steps ({self.start_step + self.steps}), got "
                                   f"{self.schedule_steps}")
        if self.init_from is not None and not self.init_from:
            fail("init_from", "must name a checkpoint or run directory, got an empty path")
        if self.final_eval_batches is not None and self.final_eval_batches < self.eval_batches:
            fail("final_eval_batches", f"must be at least eval_batches ({self.eval_batches}), got "
                                       f"{self.final_eval_batches}")
        if self.batch_size % self.grad_accum:
            fail("grad_accum", f"must divide batch_size ({self.batch_size}), got {self.grad_accum}")
        return self


@dataclass(frozen=True)
class DataConfig:
    data: str = option("stdlib", "PATH[@WEIGHT][,PATH...] of .txt/.jsonl/.parquet files or directories, "
                                 "hf:NAME[:SPLIT], or stdlib (the built-in offline corpus; default)")
    val_data: str | None = option(None, "a separate validation spec (default: a held-out share of `data` "
                                        "documents)")
    tokenizer: str | None = option(None, "an existing tokenizer.json (default: train a byte-level BPE on `data`)")
    val_fraction: float | None = option(
        None, "share of each source's bytes held out for validation when `val_data` is not given (default 0.02, at "
              "least 128 KiB but at most a tenth of the source)")
    split_seed: int | None = option(
        None, "seeds which documents of `data` are held out for validation (default: the run's `seed`); a "
              "head-to-head fixes it, so every seed and architecture is evaluated on the same text")
    text_field: str = option("text", "field/column holding text in .jsonl/.parquet")

    def validate(self) -> "DataConfig":
        check_types(self, "")
        if not self.text_field:
            fail("text_field", "must not be empty")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            fail("val_fraction", f"must lie in (0, 1), got {self.val_fraction!r}")
        if self.split_seed is not None:
            non_negative("split_seed", self.split_seed)
        return self


def from_dict(cls, values: dict[str, Any], where: str):
    """``cls(**values)`` validated, with one error naming ``where`` and the unknown field if there is one."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected an object of {cls.__name__} fields")
    known = {f.name for f in fields(cls)}
    unknown = sorted(values.keys() - known)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field {unknown[0]!r}")
    tuples = {name for name, hint in typing.get_type_hints(cls).items() if typing.get_origin(hint) is tuple}
    values = {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()}  # JSON lists
    return cls(**values).validate()
