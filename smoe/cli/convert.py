"""``smoe convert``: Hugging Face model directory <-> smoe checkpoint, quantised checkpoints, an expert-parallel
checkpoint as one file, and a GGUF file for llama.cpp (smoe.interop.hf, smoe.io.checkpoint.consolidate,
smoe.interop.gguf; docs/interop.md, docs/offload.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from smoe.cli.flags import add_group_size_argument, check_quantize_flags, dtype_of


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face model directory <-> smoe checkpoint (logit parity both ways); "
                                       "an expert-parallel checkpoint -> one file; a GGUF file for llama.cpp")
    p.add_argument("path", help="a Hugging Face model directory, or a smoe checkpoint / run directory (an "
                                "expert-parallel one becomes a single-file training checkpoint with --to smoe)")
    p.add_argument("--to", choices=["smoe", "hf", "gguf"], default="smoe",
                   help="smoe: a smoe model checkpoint (default); hf: a directory transformers and vLLM load; gguf: "
                        "one file llama.cpp runs (Mixtral-style, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3; docs/offload.md)"
                        ", written a layer of experts at a time")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty), or with --to gguf "
                                                "the file (must not exist)")
    p.add_argument("--model-type", help="with --to hf or gguf: the transformers family, e.g. mixtral, deepseek_v3 "
                                        "(default: the one the model came from, else the first that fits)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: as stored; FP8 "
                                                                     "checkpoints become bf16)")
    p.add_argument("--quantize", choices=["int8", "int4", "q8_0", "q4_0"],
                   help="with --to smoe: smoe's weight-only int8 (a scale per output channel) or int4 (a scale and "
                        "offset per group of inputs; docs/quantization.md); with --to gguf: llama.cpp's q8_0 or q4_0 "
                        "blocks of 32 for the matrices (norms, biases and routers stay F32)")
    add_group_size_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.interop import hf
    from smoe.interop.gguf import QUANTIZATIONS
    from smoe.io.checkpoint import consolidate, sharded_checkpoint
    from smoe.models import quantize

    if args.model_type and args.to == "smoe":
        raise ValueError("--model-type: only with --to hf or --to gguf")
    if args.quantize and args.to == "hf":
        raise ValueError("--quantize: only with --to smoe (transformers does not read smoe's int8/int4 format)")
    if args.to == "gguf":
        if args.quantize not in (None, *QUANTIZATIONS):
            raise ValueError(f"--quantize: a GGUF file is quantised as {' or '.join(QUANTIZATIONS)}, not "
                             f"{args.quantize}")
        return _convert_to_gguf(args)
    if args.quantize in QUANTIZATIONS:
        raise ValueError(f"--quantize: {args.quantize} is a GGUF type (with --to gguf); smoe's are int8 and int4")
    check_quantize_flags(args)
    sharded = sharded_checkpoint(args.path)
    if sharded is not None and args.to == "smoe" and args.dtype is None and not args.quantize:
        # An expert-parallel run's per-rank files become one resumable single-file checkpoint, optimizer included.
        out = consolidate(sharded, args.out)
        print(f"{sharded} -> {out}: single-file smoe training checkpoint")
        return
    model = hf.load_pretrained(args.path, dtype=dtype_of(args.dtype) or hf.stored_dtype(args.path))
    n_params = sum(p.numel() for p in model.parameters())
    if args.quantize:
        quantize(model, args.quantize, args.group_size)
    tokenizer_json = hf.read_tokenizer_json(args.path)
    if args.to == "hf":
        model_type = args.model_type or hf.infer_model_type(model.config)
        out = hf.save_pretrained(model, args.out, model_type=model_type, tokenizer_json=tokenizer_json)
        kind = f"Hugging Face {model_type}"
    else:
        out = hf.save_model_checkpoint(model, args.out, tokenizer_json=tokenizer_json)
        kind = "smoe" + (f" {args.quantize}" if args.quantize else "")
    print(f"{args.path} -> {out}: {kind} format, {n_params / 1e6:.1f}M parameters"
          + ("" if tokenizer_json else " (no tokenizer.json: token ids only)"))


def _convert_to_gguf(args: argparse.Namespace) -> None:
    """The model with its routed experts left on disk (read a layer at a time as they are written), so a model
    larger than memory converts."""
    from smoe.interop import hf
    from smoe.interop.gguf import write_gguf
    from smoe.offload.budget import OffloadConfig

    if args.group_size is not None:
        raise ValueError("--group-size: only with --quantize int4 (GGUF's q4_0 has blocks of 32)")
    out = Path(args.out)
    if out.exists():
        raise ValueError(f"--out {out}: exists; give a new file name")
    model = hf.load_pretrained(args.path, dtype=dtype_of(args.dtype) or hf.stored_dtype(args.path),
                               offload=OffloadConfig(max_expert_memory="min", expert_prefetch="off"))
    tokenizer_json = hf.read_tokenizer_json(args.path)
    write_gguf(model, out, model_type=args.model_type, quantize=args.quantize, tokenizer_json=tokenizer_json)
    print(f"{args.path} -> {out}: GGUF, {args.quantize or 'float'} weights, {out.stat().st_size / 1e9:.2f} GB"
          + ("" if tokenizer_json else " (no tokenizer.json: a placeholder vocabulary, token ids only)"))
