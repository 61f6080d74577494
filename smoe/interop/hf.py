"""Hugging Face checkpoints <-> smoe models, through the family key maps of smoe.interop.families, streamed.

    model = load_pretrained("path/to/Mixtral-8x7B", dtype=torch.bfloat16)   # a Hugging Face model directory
    model = load_pretrained("runs/v3")                                     # or a smoe checkpoint / run directory
    save_pretrained(model, "hf_out", model_type="deepseek_v3", tokenizer_json=...)  # transformers / vLLM load it

Loading never holds a second copy of the weights: the model is built on the meta device, allocated empty, and
filled tensor by tensor from memory-mapped files whose pages are released after each copy
(``smoe.io.safetensors``). Every check that can fail (the index, files, keys, layer count, shapes, dtypes,
fp8 block scales) runs on the headers before a byte of weights is read, so a bad checkpoint raises one error naming
the file and the key and nothing is half-loaded. FP8 checkpoints (DeepSeek-V3's ``weight_scale_inv`` 128x128 block
scales) are dequantised on load.

Legend: E routed experts, F expert hidden dim, D model dim.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from smoe import kernels
from smoe.config import ModelConfig
from smoe.interop.families import FAMILIES
from smoe.interop.hf_config import (
    TRANSFORMERS_FAMILIES,
    check_exportable,
    config_from_hf,
    config_to_hf,
    load_hf_config,
)
from smoe.interop.hf_files import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    expert_parts,
    fill,
    fp8_scales,
    open_checkpoint,
    plan_load,
    read_fp8_block,
)
from smoe.interop.pieces import Piece, pieces_for
from smoe.io.checkpoint import MODEL_FILE, load_model
from smoe.io.checkpoint import stored_dtype as checkpoint_dtype
from smoe.io.files import atomic_directory, check_fresh_dir, read_json
from smoe.io.safetensors import write_safetensors
from smoe.io.tokenizer import EOS, read_tokenizer_json  # noqa: F401  (read_tokenizer_json: public here)
from smoe.models import Transformer, build_model, empty_model
from smoe.offload import experts as offloaded
from smoe.offload.budget import OffloadConfig
from smoe.offload.store import ExpertFiles

DEFAULT_SHARD_BYTES = 5 * 2**30


# --- reading -----------------------------------------------------------------------------------------------------


def _hf_dtype(hf: dict, ckpt: Checkpoint) -> torch.dtype:
    """The dtype the checkpoint was published in: config.json's, else its weights'; FP8 loads as bf16."""
    named = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        dtype = getattr(torch, named)
    else:
        dtype = next((ckpt.dtype(n) for n in ckpt.where if ckpt.dtype(n).is_floating_point), torch.float32)
    return torch.bfloat16 if dtype.itemsize == 1 else dtype


# The dtypes `--dtype` names (smoe generate, serve, convert).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                    *, max_expert_memory: int | str | None = None, offload: OffloadConfig | None = None
                    ) -> Transformer:
    """A Hugging Face model directory (config.json + safetensors, single or sharded) of a supported family, or a
    smoe checkpoint or run directory, as a ``Transformer`` in eval mode. ``dtype`` defaults to the one config.json
    names, else the stored one (FP8 becomes bf16), in fp32 where that is a low precision this CPU has no native
    GEMMs for (``kernels.load_dtype``: the compute copy is made once, here); ``device`` to the CPU.

    ``max_expert_memory`` (bytes, or a size such as ``"4GB"``): the routed experts stay in the checkpoint's files
    and are read on demand into a cache of at most that many bytes; ``offload`` sets the cache's other settings
    (smoe.offload, docs/offload.md). Tokens are the in-memory model's, bit for bit."""
    path = Path(path)
    device = torch.device(device or "cpu")
    if max_expert_memory is not None:
        offload = replace(offload or OffloadConfig(), max_expert_memory=max_expert_memory)
    if offload is not None:
        offload = offload.validate() if offload.enabled else None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    hf = read_json(path / "config.json") if (path / "config.json").is_file() else None
    if hf is None or "model_type" not in hf:
        return load_model(path, dtype, device, offload)[0]
    config = config_from_hf(hf, str(path / "config.json"))  # raises on an unsupported model_type, listing them
    key_map = FAMILIES[hf["model_type"]].key_map
    ckpt = open_checkpoint(path).aliased(key_map.aliases)
    config = _with_present_mtp(config, hf["model_type"], ckpt)
    _check_layer_count(config, hf["model_type"], ckpt, str(path / "config.json"))
    fp8 = any(ckpt.dtype(n).itemsize == 1 and ckpt.dtype(n).is_floating_point for n in ckpt.where)
    fp8_block = read_fp8_block(hf, str(path / "config.json")) if fp8 else None
    with torch.device("meta"):
        state = build_model(config).state_dict()
    plan = plan_load(ckpt, pieces_for(config, key_map, state), state, key_map, fp8_block)
    model = empty_model(config, dtype or kernels.load_dtype(_hf_dtype(hf, ckpt), device), device,
                        None if offload is None else offloaded.offload_experts)
    scales = fp8_scales(ckpt, fp8_block)
    if offload is None:
        fill(model, ckpt, plan, fp8_block, scales)
        return model.eval()
    offloaded.check(model, offload, device)  # before the weights are read
    prefixes = offloaded.prefixes(model)
    routed = {name: [p.ours.startswith(tuple(prefixes)) for p in group] for name, group in plan.items()}
    experts = {name: [p for p, r in zip(group, routed[name], strict=True) if r] for name, group in plan.items()}
    rest = {name: [p for p, r in zip(group, routed[name], strict=True) if not r] for name, group in plan.items()}
    fill(model, ckpt, rest, fp8_block, scales)
    offloaded.attach(model, ExpertFiles(expert_parts(ckpt, experts, prefixes, fp8_block, scales)), offload)
    return model.eval()


def stored_dtype(path: str | Path) -> torch.dtype:
    """The dtype ``load_pretrained`` reads ``path``'s weights as before any cast: config.json's (FP8: bf16) for a
    Hugging Face directory, else the smoe checkpoint's. What a conversion keeps by default."""
    path = Path(path)
    hf = read_json(path / "config.json") if (path / "config.json").is_file() else None
    if hf is None or "model_type" not in hf:
        return checkpoint_dtype(path)
    return _hf_dtype(hf, open_checkpoint(path))


def _with_present_mtp(config: ModelConfig, model_type: str, ckpt: Checkpoint) -> ModelConfig:
    """Keep the MTP layers the checkpoint holds: transformers saves none even when config.json announces them."""
    if not config.layout.n_mtp_modules:
        return config
    prefix = FAMILIES[model_type].key_map.layer
    present = 0
    while present < config.layout.n_mtp_modules and \
            prefix.format(i=config.n_layers + present) + "eh_proj.weight" in ckpt.where:
        present += 1
    return replace(config, layout=replace(config.layout, n_mtp_modules=present))


def _check_layer_count(config: ModelConfig, model_type: str, ckpt: Checkpoint, source: str) -> None:
    """config.json's layer count against the checkpoint's (its highest layer index), before a model of the claimed
    size is built: a small file may claim far more layers than the weights hold."""
    before, _, after = FAMILIES[model_type].key_map.layer.partition("{i}")
    pattern = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))
    held = 1 + max((int(m.group(1)) for name in ckpt.where if (m := pattern.match(name))), default=-1)
    mtp = config.layout.n_mtp_modules
    if held != config.n_layers + mtp:
        extra = f" + {mtp} multi-token prediction" if mtp else ""
        raise ValueError(f"{source}: describes {config.n_layers}{extra} layers, but {ckpt.listing} holds {held} "
                         f"({before}<i>{after}* keys)")


# --- writing -----------------------------------------------------------------------------------------------------


def infer_model_type(config: ModelConfig) -> str:
    """The transformers family that expresses ``config``: the one it was imported from, else the first that fits
    (raises listing why each family does not)."""
    check_exportable(config)
    if config.name in TRANSFORMERS_FAMILIES:
        return config.name
    reasons = []
    for model_type in TRANSFORMERS_FAMILIES:
        try:
            config_to_hf(config, model_type)
            return model_type
        except ValueError as err:
            reasons.append(f"{model_type}: {str(err).split('(', 1)[-1].rstrip(')')}")
    raise ValueError("no transformers family expresses this model (" + "; ".join(reasons) + ")")


def save_pretrained(model: Transformer, out: str | Path, *, model_type: str | None = None,
                    tokenizer_json: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``model`` as a Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained`` (and vLLM)
    loads with the same logits. ``out`` must not exist or be empty; it appears only once complete."""
    config = model.config
    model_type = model_type or infer_model_type(config)
    hf_config = config_to_hf(config, model_type)  # raises naming the field the family cannot express
    out = check_fresh_dir(out)  # before the export work; atomic_directory checks again when it starts
    family = FAMILIES[model_type]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if "routed_scaling_factor" not in hf_config:
        state = _fold_routed_scale(config, state)
    tensors = _export_tensors(pieces_for(config, family.key_map, state), state)
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    hf_config.update(architectures=[family.architecture], dtype=str(dtype).removeprefix("torch."))
    eos = _special_ids(tokenizer_json)
    hf_config.update(eos)
    with atomic_directory(out) as tmp:  # plain writes inside: the directory fsyncs every file before it appears
        _write_shards(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"_from_model_config": True, **eos}, indent=2))
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
            (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tokenizer_json), indent=2))
    return out


def _fold_routed_scale(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` for a family whose config.json has no routed_scaling_factor (all but DeepSeek-V2/V3): the factor
    multiplied into the routed experts' down projections, which gives the same outputs (an expert's output is linear
    in its down projection). The scaled tensors are new; the model's own are untouched."""
    scale = config.moe.routed_scaling_factor if config.moe is not None else 1.0
    if scale == 1.0:
        return state
    return {k: v * scale if k.endswith("ffn.experts.w_down") else v for k, v in state.items()}


def _export_tensors(pieces: list[Piece], state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Hugging Face tensors from ours: plain pieces are views (no copy); fused ones are assembled."""
    by_name: dict[str, list[Piece]] = defaultdict(list)
    for p in pieces:
        by_name[p.hf].append(p)
    out = []
    for name, group in by_name.items():
        if len(group) == 1 and group[0].view is None and not group[0].offset:
            p = group[0]
            out.append((name, state[p.ours][p.index]))
            continue
        first = group[0]  # a view's source has its own shape; a shifted tensor (KeyMap.shifted) is ours'
        t = torch.empty(first.shape or state[first.ours][first.index].shape, dtype=state[first.ours].dtype)
        for p in group:
            p.source(t).copy_(state[p.ours][p.index] - p.offset if p.offset else state[p.ours][p.index])
        out.append((name, t))
    return out


def _write_shards(root: Path, tensors: list[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(root / SINGLE_FILE, shards[0], meta)
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(root / file, shard, meta)
        weight_map.update({name: file for name, _ in shard})
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2))


def _special_ids(tokenizer_json: str | None) -> dict[str, int]:
    """bos/eos ids from our tokenizer's EOS token (it both separates and ends documents)."""
    if tokenizer_json is None:
        return {}
    for token in json.loads(tokenizer_json).get("added_tokens", []):
        if token.get("content") == EOS:
            return {"bos_token_id": token["id"], "eos_token_id": token["id"]}
    return {}


def _tokenizer_config(tokenizer_json: str) -> dict:
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if _special_ids(tokenizer_json):
        config.update(bos_token=EOS, eos_token=EOS)
    return config


# --- smoe checkpoints --------------------------------------------------------------------------------------------


def save_model_checkpoint(model: Transformer, out: str | Path, tokenizer_json: str | None = None) -> Path:
    """Write ``model`` as a smoe model checkpoint (``model.safetensors`` under our names + ``config.json``), which
    ``smoe eval``, ``analyze`` and ``generate`` read. Streams, and appears only once complete."""
    with atomic_directory(out) as tmp:
        state = [(k, v.detach()) for k, v in model.state_dict().items()]
        write_safetensors(tmp / MODEL_FILE, state, {"format": "pt"})
        (tmp / "config.json").write_text(model.config.to_json())
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json)
    return Path(out)


__all__ = ["DTYPES", "infer_model_type", "load_hf_config", "load_pretrained", "save_model_checkpoint",
           "save_pretrained"]
