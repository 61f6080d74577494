"""``smoe generate``: continue prompts with a model, greedy or sampled, streamed (smoe.generation,
docs/generation.md); with --max-expert-memory the routed experts stay on disk behind a budget (smoe.offload,
docs/offload.md)."""

from __future__ import annotations

import argparse
import sys

from smoe.cli.flags import add_config_arguments, add_quantize_arguments, check_quantize_flags, dtype_of, given
from smoe.offload.budget import OffloadConfig


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue prompts with a trained model (greedy or sampled, streamed)",
                       description="Continue prompts with a model: greedy by default, sampled with --temperature. "
                                   "One text prompt streams its continuation; several are batched (left-padded). "
                                   "Generation stops at the model's end-of-sequence token or --max-new-tokens.")
    p.add_argument("path", help="a Hugging Face model directory, a smoe checkpoint, or a run directory (its latest "
                                "checkpoint)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="text to continue (repeatable: one batch); needs the model's tokenizer.json")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="token ids to continue, e.g. 1,2,3 (repeatable); prints the new ids")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample among the smallest set of tokens with this probability")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="compute dtype (default: as stored, but fp32 for bf16/fp16 weights on a CPU without native "
                        "GEMMs for them)")
    add_quantize_arguments(p, "generate")
    p.add_argument("--compile", action="store_true",
                   help="run each decode step as one torch.compile graph: faster decoding after tens of seconds "
                        "of compiling, so it pays off for long generations (the speed-ups: docs/generation.md)")
    add_config_arguments(p, OffloadConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import smoe
    from smoe.device import resolve_device
    from smoe.generation import TextStream, check_sampling, default_stop_tokens, generate_stream
    from smoe.io.checkpoint import model_directory
    from smoe.io.tokenizer import find_tokenizer

    if bool(args.prompt) == bool(args.prompt_ids):
        raise ValueError("generate: give --prompt TEXT or --prompt-ids IDS (either, repeatable; not both)")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    prompt_ids = [_parse_ids(p) for p in args.prompt_ids]
    directory = model_directory(args.path)
    tokenizer = find_tokenizer(directory)
    if args.prompt and tokenizer is None:
        raise ValueError(f"{directory / 'tokenizer.json'}: not found, so --prompt text cannot be tokenized; "
                         "pass token ids with --prompt-ids 1,2,3")
    if args.prompt:
        prompt_ids = [tokenizer.encode(text).ids for text in args.prompt]
    check_quantize_flags(args)
    offload = OffloadConfig(**given(args, OffloadConfig)).validate()
    model = smoe.load_pretrained(directory, dtype=dtype_of(args.dtype), device=resolve_device(args.device),
                                 offload=offload)
    if args.quantize:
        smoe.quantize(model, args.quantize, args.group_size)
    stop = default_stop_tokens(directory, tokenizer)
    steps = generate_stream(model, prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stop, compile=args.compile)
    if args.prompt and len(prompt_ids) == 1:
        # One prompt: stream its continuation as it comes.
        stream = TextStream(tokenizer)
        print(args.prompt[0], end="", flush=True)
        for ids_B in steps:
            print(stream.push(ids_B.tolist()), end="", flush=True)
        print(stream.flush())
    else:
        rows: list[list[int]] = [[] for _ in prompt_ids]
        for ids_B in steps:
            for row, token in zip(rows, ids_B.tolist(), strict=True):
                if not (row and row[-1] in stop):
                    row.append(token)
        for i, row in enumerate(rows):
            text = args.prompt[i] + tokenizer.decode(row) if args.prompt else ",".join(map(str, row))
            print(text if len(rows) == 1 else f"[{i}] {text}")
    if offload.enabled:
        from smoe.offload.experts import cache_of

        print(cache_of(model).stats.summary(), file=sys.stderr)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated token ids, e.g. 1,2,3") from None
    return ids
