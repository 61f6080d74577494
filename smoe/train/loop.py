"""The training loop: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast over fp32 master weights,
MoE balance terms, the aux-free bias step, periodic evaluation, atomic checkpoints and exact resume.

Exact resume rests on three facts: the batch of step s is a pure function of (seed, s); the learning rate is a pure
function of s; and a checkpoint holds everything else that changes (weights, buffers, optimizer, RNG, counters).

Under torchrun (``mesh`` given) each rank takes its slice of the global batch, gradients, losses and expert loads are
reduced over ranks (smoe.parallel), so every step is the step a single process takes on the whole batch; rank 0
alone writes run.json, metrics and progress.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch.distributed.device_mesh import DeviceMesh

from smoe import kernels
from smoe.accounting import account
from smoe.config import ModelConfig
from smoe.errors import TrainingError
from smoe.train.metrics import bits_per_byte, perplexity, router_summary
from smoe.models import build_model
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
from smoe.train.optim import build_optimizer, lr_at, set_lr

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs_BT, targets_BT), int64


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 8  # sequences per optimizer step, split into grad_accum micro-batches
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: 5% of the steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: resolve_precision
    compile: bool = False
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end
    keep_last: int = 3
    max_bad_steps: int = 5  # stop after this many consecutive non-finite steps
    device: str = "auto"
    expert_backend: str = "auto"
    peak_tflops: float | None = None  # for MFU; None: the vendor peak on known GPUs, else a measured matmul peak
    ep: int = 1  # expert-parallel ranks (torchrun processes sharing one copy of the experts)
    dp: int | None = None  # data-parallel replicas of each expert shard; None: processes / ep
    dist_timeout: float = 300.0  # seconds before a collective waiting on a dead or hung rank fails

    # Fields that may change between a run and its resumption without changing the optimisation.
    RESUMABLE_CHANGES = ("steps", "eval_every", "eval_batches", "save_every", "keep_last", "max_bad_steps",
                         "device", "expert_backend", "peak_tflops", "compile", "ep", "dp", "dist_timeout")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def validate(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last", "max_bad_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum: must divide batch_size ({self.batch_size}), got {self.grad_accum}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must lie in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay: must be >= 0")
        if not (self.dist_timeout > 0 and math.isfinite(self.dist_timeout)):
            raise ValueError(f"dist_timeout: must be a positive number of seconds, got {self.dist_timeout}")
        return self


@dataclass
class TrainData:
    """What the loop needs from a dataset; built by smoe.train.run from prepared data."""

    batch: Callable[[int], Batch]  # the batch of a step: a pure function of the step
    val: list[Batch]  # fixed validation batches
    val_bytes: int  # UTF-8 bytes of the text the validation batches' targets cover (for BPB)
    fingerprint: str  # identifies data + tokenizer: a resumed run must see the same
    tokenizer_json: str | None = None


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # per-step training loss of this process
    final_eval: dict[str, float] | None = None
    skipped_steps: int = 0
    checkpoint: Path | None = None


RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"  # written when a run reaches its last step


def prepare_out_dir(out_dir: Path, model_config: ModelConfig, train_config: TrainConfig, fingerprint: str | None,
                    resume: bool, check_only: bool = False) -> ckpt.Checkpoint | None:
    """Check the output directory before any heavy work; returns the checkpoint to resume from, if any.

    ``check_only`` runs the checks that need no data (before data preparation) and writes nothing."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {out_dir}: not writable ({err.strerror or err})") from None
    run_file = out_dir / RUN_FILE
    latest = ckpt.latest_checkpoint(out_dir)
    if run_file.exists():
        try:
            saved = json.loads(run_file.read_text())
            saved_config = ModelConfig.from_dict(saved["model_config"])
        except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{run_file}: unreadable ({err}); move it away or choose another --out") from None
        if saved_config != model_config:
            raise ValueError(f"--out {out_dir}: holds a run of a different model config; choose another --out "
                             "(nothing there was changed)")
        if resume:
            old = TrainConfig(**saved["train_config"])
            for f in fields(TrainConfig):
                if f.name not in TrainConfig.RESUMABLE_CHANGES and getattr(old, f.name) != getattr(train_config,
                                                                                                 f.name):
                    raise ValueError(f"--resume: {f.name} was {getattr(old, f.name)!r} in {out_dir}, now "
                                     f"{getattr(train_config, f.name)!r}; an exact resume needs the same value")
            if fingerprint is not None and saved.get("data_fingerprint") != fingerprint:
                raise ValueError(f"--resume: the data or tokenizer differ from the run in {out_dir}")
        elif latest is not None:
            raise ValueError(f"--out {out_dir}: holds a run at step {latest.step}; pass --resume to continue it "
                             "or choose another --out")
    elif resume and latest is not None:
        raise ValueError(f"--out {out_dir}: checkpoints without {RUN_FILE}; cannot verify the run to resume")
    if check_only:
        return latest if resume else None
    ckpt.remove_incomplete(out_dir)
    _atomic_write(run_file, json.dumps({"model_config": model_config.to_dict(),
                                        "train_config": asdict(train_config),
                                        "data_fingerprint": fingerprint}, indent=2))
    return latest if resume else None


def train(model_config: ModelConfig, train_config: TrainConfig, data: TrainData, out_dir: str | Path, *,
          resume: bool = False, progress: bool | None = None, log: Callable[[str], None] | None = None,
          mesh: DeviceMesh | None = None) -> TrainResult:
    """Train ``model_config`` on ``data``, writing checkpoints and metrics.jsonl under ``out_dir``.

    ``mesh``: the ``("dp", "ep")`` mesh of a torchrun launch (smoe.parallel.init_distributed), else None."""
    model_config.validate()
    train_config = with_resolved_precision(train_config.validate())
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if train_config.seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq-len {train_config.seq_len}: exceeds the model's max_seq_len "
                         f"({model_config.max_seq_len})")
    out_dir = Path(out_dir)
    main = is_main_process()
    if main:
        start = prepare_out_dir(out_dir, model_config, train_config, data.fingerprint, resume)
    if mesh is not None:
        torch.distributed.barrier()  # rank 0 has checked and prepared out_dir
        start = ckpt.latest_checkpoint(out_dir) if resume else None
    device = local_device(resolve_device(train_config.device))
    _seed_everything(train_config.seed)
    model = build_model(model_config).to(device)  # the same global weights on every rank (same seed) ...
    if mesh is not None:
        apply_expert_parallel(model, mesh)  # ... of which each EP rank keeps its experts
    model.set_expert_backend(train_config.expert_backend)
    optimizer = build_optimizer(model, train_config.lr, train_config.weight_decay,
                                (train_config.beta1, train_config.beta2), train_config.eps)
    shards = expert_shard_ranges(model)
    step, skipped, bad_run = 0, 0, 0
    if start is not None:
        ckpt.load_model_state(start.path, model, shards)
        state = ckpt.load_training_state(start.path, optimizer, model, shards)
        step, skipped = state["step"], state["skipped_steps"]
        if main:
            log(f"resuming from {start.path} (step {step})")
    if main:
        _truncate_metrics(out_dir / METRICS_FILE, step)
    forward = torch.compile(model) if train_config.compile else model

    tokens_per_step = train_config.batch_size * train_config.seq_len
    flops_per_token = account(model_config, seq_len=train_config.seq_len).train_flops_per_token
    peak = _peak_flops(device, train_config)
    result = TrainResult(out_dir=out_dir, step=step, skipped_steps=skipped)
    writer = _tensorboard(out_dir) if main else None
    autocast = autocast_context(device, train_config.precision)
    last_saved: Path | None = start.path if start is not None else None
    speeds: list[float] = []

    def save(at: int) -> Path:
        state = {"skipped_steps": skipped, "data_fingerprint": data.fingerprint}
        if mesh is None:
            return ckpt.save_checkpoint(out_dir, at, model, optimizer, model_config, state, data.tokenizer_json,
                                        train_config.keep_last)
        return ckpt.save_sharded_checkpoint(out_dir, at, model, optimizer, model_config, state, data.tokenizer_json,
                                            train_config.keep_last, mesh=mesh, shards=shards)

    metrics_file = open(out_dir / METRICS_FILE, "a") if main else contextlib.nullcontext()
    with _progress(progress if main else False, train_config.steps, step) as bar, metrics_file as metrics, \
            collective_errors(train_config.dist_timeout):
        def emit(row: dict[str, Any]) -> None:
            if not main:
                return
            metrics.write(json.dumps(row, allow_nan=False) + "\n")
            metrics.flush()
            if writer is not None:
                for key, value in _flat_scalars(row):
                    writer.add_scalar(key, value, row["step"])

        while step < train_config.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, lr=train_config.lr, warmup=train_config.warmup, total=train_config.steps,
                       min_ratio=train_config.min_lr_ratio)
            set_lr(optimizer, lr)
            batch = data.batch(step)
            if mesh is not None:
                batch = tuple(local_rows(t, mesh, train_config.grad_accum) for t in batch)
            stats = _run_micro_batches(forward, batch, train_config, device, autocast, mesh)
            if mesh is None:
                grad_norm = _clip(model, train_config.grad_clip)
            else:
                sync_gradients(model, mesh)
                grad_norm = clip_gradients(model, mesh, train_config.grad_clip)
            step += 1
            if not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                skipped, bad_run = skipped + 1, bad_run + 1
                emit({"kind": "train", "step": step, "loss": None, "skipped": True, "skipped_steps": skipped})
                if bad_run >= train_config.max_bad_steps:
                    where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved"
                    raise TrainingError(f"step {step}: non-finite loss or gradient for {bad_run} consecutive steps; "
                                        f"stopping ({where})")
                continue
            bad_run = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if stats["loads"]:
                model.update_expert_biases(stats["loads"])
            dt = time.perf_counter() - t0
            row = {
                "kind": "train", "step": step, "loss": stats["loss"], "lm_loss": stats["lm_loss"],
                "aux_loss": stats["aux_loss"], "z_loss": stats["z_loss"], "mtp_loss": stats["mtp_loss"], "lr": lr,
                "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                "mfu": flops_per_token * tokens_per_step / dt / peak if peak else None,
                "skipped_steps": skipped, "router": stats["router"],
            }
            emit(row)
            result.losses.append(stats["loss"])
            speeds.append(tokens_per_step / dt)
            bar(step, stats["loss"], tokens_per_step / dt)
            final = step == train_config.steps
            if (train_config.eval_every and step % train_config.eval_every == 0) or final:
                result.final_eval = evaluate(forward, data.val, data.val_bytes, device, autocast)
                emit({"kind": "eval", "step": step, **result.final_eval})
            if (train_config.save_every and step % train_config.save_every == 0) or final:
                last_saved = save(step)
    if writer is not None:
        writer.close()
    result.step, result.skipped_steps, result.checkpoint = step, skipped, last_saved
    if not main:
        return result
    acc = account(model_config, seq_len=train_config.seq_len)
    _atomic_write(out_dir / SUMMARY_FILE, json.dumps({
        "step": step, "steps": train_config.steps, "skipped_steps": skipped, "final_eval": result.final_eval,
        "tokens_per_s": float(np.median(speeds)) if speeds else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "total_params": acc.total_params, "active_params": acc.active_params,
        "train_flops_per_token": acc.train_flops_per_token, "checkpoint": str(last_saved),
    }, indent=2))
    return result


def _run_micro_batches(model, batch: Batch, cfg: TrainConfig, device, autocast, mesh=None) -> dict[str, Any]:
    """Forward and backward over the step's micro-batches; returns step-level scalars and summed expert loads
    (with a mesh: losses averaged and loads summed over ranks, the values of the whole global batch)."""
    inputs, targets = (t.to(device, non_blocking=True) for t in batch)
    sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "z_loss": 0.0, "mtp_loss": 0.0}
    loads: dict[int, torch.Tensor] = {}
    dropped: dict[int, float] = {}
    entropy: dict[int, float] = {}
    has_mtp = False
    for inp, tgt in zip(inputs.chunk(cfg.grad_accum), targets.chunk(cfg.grad_accum)):
        with autocast:
            out = model(inp, labels=tgt)
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
        sums = dict(zip(names, means[: len(names)].tolist()))
        entropy = dict(zip(layers, means[len(names) :].tolist()))
        if layers:
            counts = torch.stack([torch.cat([loads[i], loads[i].new_tensor([int(dropped[i])])]) for i in layers])
            all_reduce_(counts)
            loads = {i: c[:-1] for i, c in zip(layers, counts)}
            dropped = {i: float(c[-1]) for i, c in zip(layers, counts)}
    router = {str(i): router_summary(loads[i], dropped[i], entropy[i]) for i in loads}
    return {**sums, "mtp_loss": sums["mtp_loss"] if has_mtp else None, "loads": loads, "router": router}


@torch.no_grad()
def evaluate(model, batches: list[Batch], n_bytes: int, device, autocast) -> dict[str, float]:
    """Token-weighted validation loss, perplexity and bits per byte (lm loss only, no balance terms)."""
    was_training = model.training
    model.eval()
    total, n_tokens = 0.0, 0
    for inputs, targets in batches:
        with autocast:
            out = model(inputs.to(device), labels=targets.to(device))
        count = int((targets != -100).sum())
        total += out.lm_loss.float().item() * count
        n_tokens += count
    model.train(was_training)
    loss = total / max(n_tokens, 1)
    return {"val_loss": loss, "val_ppl": perplexity(loss), "val_bpb": bits_per_byte(loss, n_tokens, n_bytes)}


# --- plumbing ----------------------------------------------------------------------------------------------------


def _clip(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA device is available")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast where the device multiplies bf16 natively (a CUDA GPU with bf16, a CPU with
    AVX512-BF16 or AMX), else fp32. Emulated bf16 GEMMs are many times slower than fp32: deepseek-v3-tiny trains
    at 63 tokens/s in bf16 against 1,539 in fp32 on an AVX2-only CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and kernels.native_low_precision(torch.bfloat16) else "fp32"


def with_resolved_precision(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``auto`` precision resolved for its device: what run.json records, so that a resume on a
    machine that would resolve differently is refused rather than silently changing the numerics."""
    return replace(cfg, precision=resolve_precision(cfg.precision, resolve_device(cfg.device)))


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_VENDOR_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def _peak_flops(device: torch.device, cfg: TrainConfig) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in _VENDOR_PEAK_BF16.items() if k in name), None)
    return _measured_matmul_flops(cfg.precision)


def _measured_matmul_flops(precision: str) -> float:
    """A quick dense-matmul peak of this CPU, so MFU means 'fraction of what a plain GEMM reaches here'."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.1:
        a @ b
        reps += 1
    return 2 * 512**3 * reps / (time.perf_counter() - start)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows past the checkpoint so the history reads as one uninterrupted run."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line torn by a kill
    _atomic_write(path, "".join(line + "\n" for line in kept))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flat_scalars(row: dict[str, Any], prefix: str = ""):
    for key, value in row.items():
        if isinstance(value, dict):
            yield from _flat_scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield f"{prefix}{key}", value


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


@contextlib.contextmanager
def _progress(enabled: bool | None, total: int, start: int):
    """A rich progress bar with loss, tokens/s and ETA on a terminal; silent otherwise."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda *args: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("train", total=total, completed=start, info="")

        def update(step: int, loss: float, tokens_per_s: float) -> None:
            progress.update(task, completed=step, info=f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s")

        yield update
