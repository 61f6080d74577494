"""The training loop: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast over fp32 master weights,
MoE balance terms, the aux-free bias step, periodic evaluation, atomic checkpoints and exact resume.

Exact resume rests on three facts: the batch of step s is a pure function of (seed, s); the learning rate is a pure
function of s; and a checkpoint holds everything else that changes (weights, buffers, optimizer, RNG, counters).

Under torchrun (``mesh`` given) each rank takes its slice of the global batch, gradients, losses and expert loads are
reduced over ranks (smoe.parallel), so every step is the step a single process takes on the whole batch; rank 0
alone writes run.json, metrics and progress.
"""

from __future__ import annotations

import ctypes
import math
import platform
import random
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.distributed.device_mesh import DeviceMesh

from smoe.accounting import account
from smoe.config import ModelConfig
from smoe.device import autocast_context, resolve_device, resolve_precision
from smoe.errors import TrainingError
from smoe.hardware import profile_of
from smoe.io.checkpoint import latest_intact, load_model_state
from smoe.models import build_model, document_starts
from smoe.parallel import (
    apply_expert_parallel,
    clip_gradients,
    collective_errors,
    expert_shard_ranges,
    is_main_process,
    local_device,
    local_rows,
    sync_gradients,
)
from smoe.parallel.data_parallel import all_reduce_
from smoe.train import checkpoint as ckpt
from smoe.train.config import DataConfig, TrainConfig
from smoe.train.metrics import bits_per_byte, perplexity, router_summary
from smoe.train.optim import build_optimizer, lr_at, set_lr
from smoe.train.rundir import RunDirectory
from smoe.train.sinks import MetricsSinks, NoSinks

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs_BT, targets_BT), int64


@dataclass
class TrainData:
    """What the loop needs from a dataset; built by smoe.train.run from prepared data."""

    batch: Callable[[int], Batch]  # the batch of a step: a pure function of the step
    val: list[Batch]  # fixed validation batches: the last evaluation reads them all, periodic ones a prefix
    val_bytes: list[int]  # per batch, UTF-8 bytes of the text its targets cover (for BPB)
    fingerprint: str  # identifies data + tokenizer: a resumed run must see the same
    tokenizer_json: str | None = None
    config: DataConfig = field(default_factory=DataConfig)  # what the data was prepared from, for run.json
    eos_id: int | None = None  # the token ending each packed document (TrainConfig.document_boundaries); None: none
    # sha256 of the tokenizer.json text and of the validation tokens (validation_sha256): run.json records both,
    # so runs evaluated on the same text can be told apart from runs that were not
    hashes: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # per-step training loss of this process
    final_eval: dict[str, float] | None = None
    skipped_steps: int = 0
    checkpoint: Path | None = None


def checked_configs(model_config: ModelConfig, train_config: TrainConfig) -> TrainConfig:
    """Validate both configs once (and the checkpoint ``init_from`` names against the model config), and return
    ``train_config`` with its precision resolved for its device."""
    model_config.validate()
    if model_config.moe is not None and model_config.moe.gate_is_constant:
        raise ValueError(f"moe.top_k {model_config.moe.top_k} with moe.norm_topk_prob true: every routing weight is "
                         f"fixed at routed_scaling_factor, so the LM loss never reaches the router and only the "
                         f"balance terms would train it; set moe.norm_topk_prob=false (Switch weights its one expert "
                         f"by the router probability) or moe.top_k to 2 or more")
    train_config = with_resolved_precision(train_config.validate())
    if train_config.seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len {train_config.seq_len}: exceeds the model's max_seq_len "
                         f"({model_config.max_seq_len})")
    if train_config.init_from is not None:
        ckpt.initial_checkpoint(model_config, train_config.init_from)
    return train_config


def train(model_config: ModelConfig, train_config: TrainConfig, data: TrainData, out_dir: str | Path, *,
          resume: bool = False, progress: bool | None = None, log: Callable[[str], None] | None = None,
          mesh: DeviceMesh | None = None) -> TrainResult:
    """Train ``model_config`` on ``data``, writing checkpoints and metrics.jsonl under ``out_dir``.

    ``mesh``: the ``("dp", "ep")`` mesh of a torchrun launch (smoe.parallel.init_distributed), else None."""
    return run_training(model_config, checked_configs(model_config, train_config), data, out_dir, resume=resume,
                        progress=progress, log=log, mesh=mesh)


def run_training(model_config: ModelConfig, cfg: TrainConfig, data: TrainData, out_dir: str | Path, *,
                 resume: bool, progress: bool | None, log: Callable[[str], None] | None,
                 mesh: DeviceMesh | None) -> TrainResult:
    """``train`` for configs that ``checked_configs`` has passed: set up the run directory and the trainer, then
    step / maybe evaluate / maybe save until the last step."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    run_dir = RunDirectory(out_dir)
    main = is_main_process()
    if main:
        start = run_dir.start(model_config, cfg, data.config, data.fingerprint, resume, log, data.hashes)
    if mesh is not None:
        torch.distributed.barrier()  # rank 0 has checked and prepared the run directory
        if not main:
            start = latest_intact(run_dir.path) if resume else None  # the same files, so the same choice
    trainer = _Trainer(model_config, cfg, data, run_dir.path, mesh)
    if start is not None:
        trainer.restore(start.path)
        if main:
            log(f"resuming from {start.path} (step {trainer.step})")
    elif cfg.init_from is not None:
        path = ckpt.initial_checkpoint(model_config, cfg.init_from)
        load_model_state(path, trainer.model, trainer.shards)  # weights only: optimizer and schedule start fresh
        if main:
            log(f"starting from the weights of {path}" + (f", continuing at step {cfg.start_step}"
                                                           if cfg.start_step else ""))
    result = TrainResult(out_dir=run_dir.path, step=trainer.step)
    sinks = MetricsSinks(run_dir.metrics_file, run_dir.path / "tensorboard", progress, cfg.steps, trainer.step) \
        if main else NoSinks()
    speeds: list[float] = []
    bad_run, saved_at = 0, time.monotonic()
    with sinks, collective_errors(cfg.dist_timeout):
        while trainer.step < cfg.steps:
            row = trainer.train_step()
            sinks.write(row)
            if row["loss"] is None:
                bad_run += 1
                if bad_run >= cfg.max_bad_steps:
                    where = (f"the last good checkpoint is {trainer.last_saved}" if trainer.last_saved
                             else "no checkpoint was saved")
                    raise TrainingError(f"step {trainer.step}: non-finite loss or gradient for {bad_run} "
                                        f"consecutive steps; stopping ({where})")
                continue
            bad_run = 0
            result.losses.append(row["loss"])
            speeds.append(row["tokens_per_s"])
            sinks.progress(trainer.step, row["loss"], row["tokens_per_s"])
            final = trainer.step == cfg.steps
            if _every(trainer.step, cfg.eval_every) or final:
                result.final_eval = trainer.evaluate(cfg.last_eval_batches if final else cfg.eval_batches)
                sinks.write({"kind": "eval", "step": trainer.step, **result.final_eval})
            due = _every(trainer.step, cfg.save_every) or trainer.step in cfg.save_at or final
            if due or _minutes_due(saved_at, cfg.save_every_minutes, mesh, trainer.device):
                trainer.save()
                saved_at = time.monotonic()
    result.step, result.skipped_steps, result.checkpoint = trainer.step, trainer.skipped, trainer.last_saved
    if main:
        run_dir.write_summary({
            "step": trainer.step, "steps": cfg.steps, "skipped_steps": trainer.skipped,
            "final_eval": result.final_eval, "tokens_per_s": float(np.median(speeds)) if speeds else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_device_bytes": (torch.cuda.max_memory_allocated(trainer.device) if trainer.device.type == "cuda"
                                  else None),
            "total_params": trainer.costs.total_params, "active_params": trainer.costs.active_params,
            "train_flops_per_token": trainer.costs.train_flops_per_token, "checkpoint": str(trainer.last_saved),
        })
    return result


class _Trainer:
    """What one run changes (weights, optimizer, step and skip counters) and the three things the loop does with
    it: a step, an evaluation, a checkpoint. Under torchrun every rank holds one, over its slice of the experts."""

    def __init__(self, model_config: ModelConfig, cfg: TrainConfig, data: TrainData, out_dir: Path,
                 mesh: DeviceMesh | None):
        self.model_config, self.cfg, self.data, self.out_dir, self.mesh = model_config, cfg, data, out_dir, mesh
        self.device = local_device(resolve_device(cfg.device))
        if self.device.type == "cpu":
            reuse_freed_memory()
        _seed_everything(cfg.seed)
        self.model = build_model(model_config).to(self.device)  # the same global weights on every rank ...
        if mesh is not None:
            apply_expert_parallel(self.model, mesh)  # ... of which each EP rank keeps its experts
        self.model.set_expert_backend(cfg.expert_backend)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
        self.shards = expert_shard_ranges(self.model)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.autocast = autocast_context(self.device, cfg.precision)
        self.costs = account(model_config, seq_len=cfg.seq_len)
        self.peak = _peak_flops(self.device, cfg)
        self.step, self.skipped, self.last_saved = 0, 0, None

    def restore(self, path: Path) -> None:
        load_model_state(path, self.model, self.shards)
        state = ckpt.load_training_state(path, self.optimizer, self.model, self.shards)
        self.step, self.skipped, self.last_saved = state["step"], state["skipped_steps"], path

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the step's batch; its metrics row (``loss`` None when the step was skipped for a
        non-finite loss or gradient, and nothing was updated)."""
        cfg, mesh = self.cfg, self.mesh
        t0 = time.perf_counter()
        # A continued run (start_step) takes the longer run's batch and learning rate at the same step.
        lr = lr_at(cfg.start_step + self.step, lr=cfg.lr, warmup=cfg.warmup, total=cfg.schedule_length,
                   min_ratio=cfg.min_lr_ratio)
        set_lr(self.optimizer, lr)
        batch = self.data.batch(cfg.start_step + self.step)
        if mesh is not None:
            batch = tuple(local_rows(t, mesh, cfg.grad_accum) for t in batch)
        stats = _run_micro_batches(self.forward, batch, cfg, self.device, self.autocast, mesh, self.data.eos_id)
        if mesh is None:
            grad_norm = _clip(self.model, cfg.grad_clip)
        else:
            sync_gradients(self.model, mesh)
            grad_norm = clip_gradients(self.model, mesh, cfg.grad_clip)
        self.step += 1
        if not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            return {"kind": "train", "step": self.step, "loss": None, "skipped": True, "skipped_steps": self.skipped}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stats["loads"]:
            self.model.update_expert_biases(stats["loads"])
        tokens_per_s = cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)
        return {
            "kind": "train", "step": self.step, "loss": stats["loss"], "lm_loss": stats["lm_loss"],
            "aux_loss": stats["aux_loss"], "z_loss": stats["z_loss"], "mtp_loss": stats["mtp_loss"], "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
            "mfu": self.costs.train_flops_per_token * tokens_per_s / self.peak if self.peak else None,
            "skipped_steps": self.skipped, "router": stats["router"],
        }

    def evaluate(self, n_batches: int) -> dict[str, float]:
        """On the first ``n_batches`` validation batches (``val_tokens``: how many targets that is); beyond the
        periodic evaluations' ``eval_batches``, also on those alone (``val_loss_curve``)."""
        batches = self.data.val[:n_batches]
        n_bytes = sum(self.data.val_bytes[:n_batches])
        tokens = sum(int((targets != -100).sum()) for _, targets in batches)
        prefix = self.cfg.eval_batches if n_batches > self.cfg.eval_batches else None
        result = evaluate(self.forward, batches, n_bytes, self.device, self.autocast, self.data.eos_id,
                          self.cfg.document_boundaries, prefix)
        return {**result, "val_tokens": tokens}

    def save(self) -> Path:
        cfg, data = self.cfg, self.data
        state = {"skipped_steps": self.skipped, "data_fingerprint": data.fingerprint}
        if self.mesh is None:
            self.last_saved = ckpt.save_checkpoint(self.out_dir, self.step, self.model, self.optimizer,
                                                   self.model_config, state, data.tokenizer_json, cfg.keep_last,
                                                   cfg.keep_optimizer)
        else:
            self.last_saved = ckpt.save_sharded_checkpoint(
                self.out_dir, self.step, self.model, self.optimizer, self.model_config, state, data.tokenizer_json,
                cfg.keep_last, mesh=self.mesh, shards=self.shards, keep_optimizer=cfg.keep_optimizer)
        return self.last_saved


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _minutes_due(since: float, minutes: float, mesh: DeviceMesh | None, device: torch.device) -> bool:
    """Whether ``minutes`` of training have passed since the last checkpoint; under torchrun rank 0's clock
    decides for all, since saving is collective."""
    if minutes <= 0:
        return False
    due = time.monotonic() - since >= 60 * minutes
    if mesh is None:
        return due
    flag = torch.tensor([due], dtype=torch.int32, device=device)  # a device sync: only where ranks must agree
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _run_micro_batches(model, batch: Batch, cfg: TrainConfig, device, autocast, mesh=None, eos_id: int | None = None
                       ) -> dict[str, Any]:
    """Forward and backward over the step's micro-batches; returns step-level scalars and summed expert loads
    (with a mesh: losses averaged and loads summed over ranks, the values of the whole global batch)."""
    inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "z_loss": 0.0, "mtp_loss": 0.0}
    loads: dict[int, torch.Tensor] = {}
    dropped: dict[int, float] = {}
    entropy: dict[int, float] = {}
    has_mtp = False
    for inp, tgt in zip(inputs.chunk(cfg.grad_accum), targets.chunk(cfg.grad_accum), strict=True):
        with autocast:
            out = model(inp, labels=tgt, **document_arguments(inp, eos_id, cfg.document_boundaries))
        (out.loss / cfg.grad_accum).backward()
        sums["loss"] += out.loss.item() / cfg.grad_accum
        sums["lm_loss"] += out.lm_loss.item() / cfg.grad_accum
        sums["aux_loss"] += out.aux_loss.item() / cfg.grad_accum
        if out.mtp_loss is not None:
            has_mtp = True
            sums["mtp_loss"] += out.mtp_loss.item() / cfg.grad_accum
        for idx, s in out.router_stats.items():
            sums["z_loss"] += s.z_loss.item() / cfg.grad_accum
            loads[idx] = loads[idx] + s.load if idx in loads else s.load.clone()
            dropped[idx] = dropped.get(idx, 0.0) + s.dropped.item()
            entropy[idx] = entropy.get(idx, 0.0) + s.entropy.item() / cfg.grad_accum
    if mesh is not None:
        # Equal token counts per rank, so the mean of per-rank means is the global mean.
        names, layers = list(sums), list(loads)
        means = torch.tensor([sums[k] for k in names] + [entropy[i] for i in layers], dtype=torch.float64,
                             device=device)
        all_reduce_(means, "mean")
        sums = dict(zip(names, means[: len(names)].tolist(), strict=True))
        entropy = dict(zip(layers, means[len(names) :].tolist(), strict=True))
        if layers:
            counts = torch.stack([torch.cat([loads[i], loads[i].new_tensor([int(dropped[i])])]) for i in layers])
            all_reduce_(counts)
            loads = {i: c[:-1] for i, c in zip(layers, counts, strict=True)}
            dropped = {i: float(c[-1]) for i, c in zip(layers, counts, strict=True)}
    router = {str(i): router_summary(loads[i], dropped[i], entropy[i]) for i in loads}
    return {**sums, "mtp_loss": sums["mtp_loss"] if has_mtp else None, "loads": loads, "router": router}


@torch.no_grad()
def evaluate(model, batches: list[Batch], n_bytes: int, device, autocast, eos_id: int | None = None,
             document_boundaries: str = "all", prefix: int | None = None) -> dict[str, float]:
    """Token-weighted validation loss, perplexity and bits per byte (lm loss only, no balance terms); documents
    ended by ``eos_id`` kept apart as ``document_boundaries`` says (``TrainConfig.document_boundaries``). With
    ``prefix``, also ``val_loss_curve``: the loss over the first ``prefix`` batches alone, the set the periodic
    evaluations read, so a validation curve ends on the same text it ran on."""
    was_training = model.training
    model.eval()
    total, n_tokens, curve = 0.0, 0, None
    for i, (inputs, targets) in enumerate(batches):
        if i == prefix:
            curve = total / max(n_tokens, 1)
        with autocast:
            inputs = inputs.to(device)
            out = model(inputs, labels=targets.to(device), **document_arguments(inputs, eos_id, document_boundaries))
        count = int((targets != -100).sum())
        total += out.lm_loss.float().item() * count
        n_tokens += count
    model.train(was_training)
    loss = total / max(n_tokens, 1)
    result = {"val_loss": loss, "val_ppl": perplexity(loss), "val_bpb": bits_per_byte(loss, n_tokens, n_bytes)}
    if prefix is not None:
        result["val_loss_curve"] = loss if curve is None else curve
    return result


def document_arguments(inputs_BT: torch.Tensor, eos_id: int | None, boundaries: str) -> dict[str, Any]:
    """The model's packed-document arguments for a batch whose documents end with ``eos_id``, as
    ``TrainConfig.document_boundaries`` names them (none without an ``eos_id``)."""
    if eos_id is None or boundaries == "none":
        return {}
    return {"document_starts": document_starts(inputs_BT, eos_id), "document_mask": boundaries == "all"}


# --- plumbing ----------------------------------------------------------------------------------------------------


def _clip(model: torch.nn.Module, max_norm: float) -> float:
    """The gradient's global norm, clipped to ``max_norm`` (0: only measured). Gradients are scaled only when the
    norm exceeds it: clip_grad_norm_ would multiply every one by 1.0 otherwise, a pass over all parameters."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm > 0 and float(total) + 1e-6 > max_norm:  # clip_grad_norm_'s coefficient max_norm/(norm + 1e-6) < 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def reuse_freed_memory() -> None:
    """Keep freed memory in the process for reuse (Linux glibc only). By default glibc maps every block over
    32 MiB fresh and returns freed memory to the OS, so each training step page-faults its large gradients and
    activations in again: a visible share of a small model's step on CPU (docs/benchmarks.md).
    Raising the mmap and trim thresholds keeps them; the resident size stays at its peak, which every step
    reaches anyway."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


def with_resolved_precision(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``auto`` precision resolved for its device: what run.json records, so that a resume on a
    machine that would resolve differently is refused rather than silently changing the numerics."""
    return replace(cfg, precision=resolve_precision(cfg.precision, resolve_device(cfg.device)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _peak_flops(device: torch.device, cfg: TrainConfig) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        profile = profile_of(torch.cuda.get_device_name(device))  # the datasheet's dense bf16 peak
        return profile.peak_flops["bf16"] if profile is not None else None
    # No CPU peak is trustworthy: a GEMM timed at the start of a run beside other runs sharing the cores read below
    # what the runs then reached (MFU above 100%), and a CPU's clock moves with its load. MFU is left out there.
    return None
