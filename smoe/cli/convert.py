"""``smoe convert``: Hugging Face model directory <-> smoe checkpoint, quantised checkpoints, and an expert-parallel
checkpoint as one file (smoe.interop.hf, smoe.io.checkpoint.consolidate; docs/interop.md)."""

from __future__ import annotations

import argparse

from smoe.cli.flags import add_quantize_arguments, check_quantize_flags, dtype_of


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face model directory <-> smoe checkpoint (logit parity both ways); "
                                       "an expert-parallel checkpoint -> one file")
    p.add_argument("path", help="a Hugging Face model directory, or a smoe checkpoint / run directory (an "
                                "expert-parallel one becomes a single-file training checkpoint with --to smoe)")
    p.add_argument("--to", choices=["smoe", "hf"], default="smoe",
                   help="smoe: a smoe model checkpoint (default); hf: a directory transformers and vLLM load")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--model-type", help="with --to hf: the transformers family, e.g. mixtral, deepseek_v3 "
                                        "(default: the one the model came from, else the first that fits)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: as stored; FP8 "
                                                                     "checkpoints become bf16)")
    add_quantize_arguments(p, "write a smoe checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from smoe.interop import hf
    from smoe.io.checkpoint import consolidate, sharded_checkpoint
    from smoe.models import quantize

    if args.model_type and args.to != "hf":
        raise ValueError("--model-type: only with --to hf")
    if args.quantize and args.to == "hf":
        raise ValueError("--quantize: only with --to smoe (transformers does not read smoe's int8/int4 format)")
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
