"""The Python API behind ``smoe train`` and ``smoe eval``: resolve a config, prepare data, call the loop.

    from smoe.train import train_model, evaluate_checkpoint
    result = train_model("deepseek-v3-tiny", data="stdlib", steps=200, batch_size=16, seq_len=256, out="runs/v3")
    evaluate_checkpoint("runs/v3", data="held_out.txt")
"""

from __future__ import annotations

import hashlib
import typing
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from smoe import presets
from smoe.config import ModelConfig, override
from smoe.config.rules import one_of
from smoe.device import autocast_context, resolve_device, resolve_precision
from smoe.io.checkpoint import load_config, load_model, resolve_checkpoint
from smoe.io.tokenizer import EOS, load_tokenizer
from smoe.parallel import check_layout, collective_errors, init_distributed, is_main_process
from smoe.parallel.launch import world_size_from_env
from smoe.train.checkpoint import initial_tokenizer
from smoe.train.config import DataConfig, TrainConfig
from smoe.train.data import (
    DEFAULT_VAL_FRACTION,
    BatchSampler,
    prepare_data,
    token_byte_lengths,
    tokenize_documents,
    val_batches,
)
from smoe.train.loop import TrainData, TrainResult, checked_configs, evaluate, run_training
from smoe.train.rundir import RunDirectory


def resolve_model_config(model: str | ModelConfig, overrides: dict[str, Any] | None = None) -> ModelConfig:
    config = presets.get(model) if isinstance(model, str) else model
    return override(config, overrides) if overrides else config  # checked_configs validates it


def train_model(
    model: str | ModelConfig,
    *,
    out: str | Path,
    data: str = "stdlib",
    val_data: str | None = None,
    overrides: dict[str, Any] | None = None,
    tokenizer: str | Path | None = None,
    text_field: str = "text",
    val_fraction: float | None = None,
    split_seed: int | None = None,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    log=None,
    **train_options: Any,
) -> TrainResult:
    """Train a preset name or a ModelConfig; ``train_options`` are TrainConfig fields (steps, batch_size, ...).

    Every check that can fail on user input runs before data preparation and training. Launched by torchrun, every
    process calls this; ``ep``/``dp`` lay the processes out (smoe.parallel) and rank 0 prepares the data first, so
    the others read it from the cache.
    """
    config = resolve_model_config(model, overrides)
    data_config = DataConfig(data=data, val_data=val_data, tokenizer=None if tokenizer is None else str(tokenizer),
                             text_field=text_field, val_fraction=val_fraction, split_seed=split_seed).validate()
    train_config = TrainConfig(**train_options).validate()
    if tokenizer is None and train_config.init_from is not None:  # continued training keeps the model's token ids
        tokenizer = initial_tokenizer(train_config.init_from)
    if tokenizer is not None:
        vocab = load_tokenizer(tokenizer).get_vocab_size()
        if vocab > config.vocab_size:  # the tokenizer decides: the embedding must cover its ids
            config = override(config, {"vocab_size": vocab})
    train_config = checked_configs(config, train_config)
    out = Path(out)
    dp = check_layout(config, train_config.ep, train_config.dp, world_size_from_env(), train_config.batch_size,
                      train_config.grad_accum)
    if is_main_process():
        RunDirectory(out).check(config, train_config, resume)
    owns_group = not dist.is_initialized()
    mesh = init_distributed(train_config.ep, dp, train_config.dist_timeout, resolve_device(train_config.device))
    try:
        with collective_errors(train_config.dist_timeout):
            main = is_main_process()
            if not main:
                dist.barrier()  # rank 0 fills the data cache first; the others then read it (bounded by the timeout)
            prepared = prepare_data(data, val_spec=val_data, tokenizer=tokenizer, vocab_size=config.vocab_size,
                                    seed=train_config.seed if split_seed is None else split_seed,
                                    val_fraction=val_fraction or DEFAULT_VAL_FRACTION, cache_dir=cache_dir,
                                    text_field=text_field, log=log if main else None)
            if main and mesh is not None:
                dist.barrier()
        sampler = BatchSampler(prepared.train, prepared.sources, train_config.seq_len, train_config.batch_size,
                               train_config.seed)
        val = val_batches(prepared.val, train_config.seq_len, train_config.batch_size,
                          train_config.last_eval_batches)
        token_bytes = torch.from_numpy(token_byte_lengths(prepared.tokenizer))
        train_data = TrainData(
            batch=lambda step: sampler.batch(step)[:2],
            val=val,
            val_bytes=[int(token_bytes[targets].sum()) for _, targets in val],
            fingerprint=prepared.fingerprint,
            tokenizer_json=prepared.tokenizer.to_str(),
            config=data_config,
            hashes=data_hashes(prepared.tokenizer.to_str(), val),
            eos_id=prepared.tokenizer.token_to_id(EOS),
        )
        return run_training(config, train_config, train_data, out, resume=resume, progress=progress, log=log,
                            mesh=mesh)
    finally:
        if mesh is not None and owns_group:
            dist.destroy_process_group()


def data_hashes(tokenizer_json: str, val: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, str]:
    """``tokenizer_sha256``: of the tokenizer.json text; ``validation_sha256``: of the validation sequences, each
    its inputs and its last target (seq_len + 1 token ids), as little-endian int64 rows in evaluation order. Two
    runs with equal hashes were evaluated on the same token ids."""
    rows = torch.cat([torch.cat([inputs, targets[:, -1:]], dim=1) for inputs, targets in val])
    return {"tokenizer_sha256": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
            "validation_sha256": hashlib.sha256(rows.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()}


def evaluate_checkpoint(
    path: str | Path,
    *,
    data: str,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int = 50,
    text_field: str = "text",
    precision: str = "auto",
    device: str = "auto",
    document_boundaries: str = "all",
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of a checkpoint (or a run directory's latest) on all of ``data``, its
    documents kept apart as ``document_boundaries`` says (``TrainConfig.document_boundaries``)."""
    one_of("document_boundaries", document_boundaries,
           typing.get_args(typing.get_type_hints(TrainConfig)["document_boundaries"]))
    path = resolve_checkpoint(path)
    max_len = load_config(path).max_seq_len
    seq_len = seq_len or min(max_len, 256)
    if seq_len > max_len:
        raise ValueError(f"seq_len {seq_len}: exceeds the model's max_seq_len ({max_len})")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path}: has no tokenizer.json, so text cannot be tokenized for it")
    tokenizer = load_tokenizer(path / "tokenizer.json")
    split = tokenize_documents(data, tokenizer, text_field)
    batches = val_batches(split, seq_len, batch_size, max_batches)
    dev = resolve_device(device)
    model, path = load_model(path, dtype=torch.float32, device=dev)
    lengths = torch.from_numpy(token_byte_lengths(tokenizer))
    n_bytes = int(sum(lengths[targets].sum() for _, targets in batches))
    result = evaluate(model, batches, n_bytes, dev, autocast_context(dev, resolve_precision(precision, dev)),
                      tokenizer.token_to_id(EOS), document_boundaries)
    n_tokens = sum(int(t.numel()) for _, t in batches)
    return {**result, "tokens": n_tokens, "checkpoint": str(path)}
