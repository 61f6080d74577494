"""The ``smoe`` command line: parse arguments, call library functions, print.

User errors (bad preset, field, file) print one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from smoe.cli import compare, serve, upcycle
from smoe.cli.flags import add_config_arguments, add_quantize_arguments, check_quantize_flags, given, user_message
from smoe.config import DEFAULT_INT4_GROUP, INT4_GROUP_SIZES
from smoe.cost import CostSettings
from smoe.errors import TrainingError
from smoe.offload.budget import OffloadConfig
from smoe.train.config import DataConfig, TrainConfig


def _cmd_presets(args: argparse.Namespace) -> None:
    from smoe import presets
    from smoe.accounting import account, human

    rows = [(name, account(presets.get(name))) for name in presets.names()]
    width = max(len(name) for name, _ in rows)
    print(f"{'preset':<{width}}  {'total':>9}  {'active':>9}  {'layers':>6}  {'experts':>11}  attention")
    for name, acc in rows:
        cfg = presets.get(name)
        experts = "dense" if cfg.moe is None else f"{cfg.moe.n_routed_experts}x top-{cfg.moe.top_k}"
        if cfg.moe is not None and cfg.moe.n_shared_experts:
            experts += f" +{cfg.moe.n_shared_experts}"
        attn = cfg.attention.kind
        print(f"{name:<{width}}  {human(acc.total_params):>9}  {human(acc.active_params):>9}  "
              f"{cfg.n_layers:>6}  {experts:>11}  {attn}")


def _model_config(args: argparse.Namespace):
    """The model a command names: a preset NAME, --hf-config PATH or --config FILE (exactly one)."""
    from smoe import presets

    if sum(source is not None for source in (args.name, args.hf_config, args.config)) != 1:
        raise ValueError(f"{args.command}: give a preset NAME, --hf-config PATH or --config FILE (exactly one)")
    if args.hf_config is not None:
        from smoe.interop.hf_config import load_hf_config

        return load_hf_config(args.hf_config)
    if args.config is not None:
        from smoe.train.rundir import read_run_config

        return read_run_config(args.config)[0]
    return presets.get(args.name)


def _cmd_inspect(args: argparse.Namespace) -> None:
    from smoe.accounting import account, format_accounting
    from smoe.offload.budget import plan

    config = _model_config(args)
    if args.hit_rate is not None and args.max_expert_memory is None:
        raise ValueError("--hit-rate: only with --max-expert-memory")
    acc = account(config, seq_len=args.seq_len)
    plans = [] if args.max_expert_memory is None else [
        plan(config, args.max_expert_memory, fmt, args.hit_rate) for fmt in ("fp32", "bf16", "int8", "int4")]
    if args.json:
        print(json.dumps({**acc.to_dict(), **({"expert_budget": [p.to_dict() for p in plans]} if plans else {})},
                         indent=2))
        return
    print(format_accounting(acc))
    if plans:
        print(f"  experts on disk behind {args.max_expert_memory} (smoe generate/serve --max-expert-memory; a token "
              f"reads its misses whole):")
        print("\n".join(f"    {p.describe()}" for p in plans))


def _cmd_cost(args: argparse.Namespace) -> None:
    from smoe.cost import CostSettings, check_model, estimate, format_cost
    from smoe.hardware import HARDWARE, MEASURED_CPU
    from smoe.quant.measure import cpu_profile

    settings = CostSettings(**given(args, CostSettings)).validate()
    config = _model_config(args)
    check_model(config, settings)  # before measuring anything
    hardware = [cpu_profile() if name == MEASURED_CPU else HARDWARE[name] for name in settings.hardware]
    reports = [estimate(config, hw, settings) for hw in hardware]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print("\n\n".join(format_cost(r) for r in reports))


def _cmd_smoke(args: argparse.Namespace) -> None:
    import torch

    from smoe import presets
    from smoe.models import build_model

    names = args.presets.split(",") if args.presets else [n for n in presets.names() if n.endswith("-tiny")]
    configs = [presets.get(n) for n in names]  # resolve every name before any work
    torch.manual_seed(0)
    print(f"{'preset':<18}  {'params':>8}  {'loss':>7}  {'fwd+bwd ms':>10}")
    for name, config in zip(names, configs):
        model = build_model(config)
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
        start = time.perf_counter()
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        ms = (time.perf_counter() - start) * 1e3
        if not torch.isfinite(out.loss):
            raise RuntimeError(f"{name}: non-finite loss {out.loss.item()}")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<18}  {n_params / 1e6:>7.2f}M  {out.loss.item():>7.3f}  {ms:>10.1f}")


def parse_assignments(items: list[str]) -> dict:
    """``--set moe.top_k=4 --set moe.capacity_factor=null`` -> {"moe.top_k": 4, "moe.capacity_factor": None}.
    Values are JSON when they parse as JSON (numbers, true/false/null, lists), else strings."""
    result = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. moe.top_k=4")
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
        except RecursionError:
            raise ValueError(f"--set {key}: the value is nested too deep") from None
    return result


def _cmd_train(args: argparse.Namespace) -> None:
    from smoe.parallel import is_main_process
    from smoe.train import train_model
    from smoe.train.checkpoint import initial_config
    from smoe.train.rundir import read_run_config

    given_model = [m for m in (args.preset, args.config) if m is not None]
    if len(given_model) > 1 or not given_model and args.init_from is None:
        raise ValueError("train: give --preset NAME or --config FILE (exactly one), or --init-from DIR alone to "
                         "continue training its model")
    if args.config is not None:
        model, train_config, data_config = read_run_config(args.config)
    else:  # a preset, or the model of the checkpoint --init-from names
        model = args.preset if args.preset is not None else initial_config(args.init_from)
        train_config, data_config = TrainConfig(), DataConfig()
    name = model if isinstance(model, str) else model.name
    data = {**vars(data_config), **given(args, DataConfig)}
    train = {**vars(train_config), **given(args, TrainConfig)}
    result = train_model(
        model, out=args.out or f"runs/{name}", overrides=parse_assignments(args.set), resume=args.resume,
        progress=False if args.quiet else None, log=lambda m: print(m, file=sys.stderr), **data, **train,
    )
    final = result.final_eval or {}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    if is_main_process():
        print(f"trained {result.step} steps ({result.skipped_steps} skipped); {summary}")
        print(f"checkpoint: {result.checkpoint}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from smoe.train import evaluate_checkpoint

    documents = {} if args.document_boundaries is None else {"document_boundaries": args.document_boundaries}
    result = evaluate_checkpoint(args.checkpoint, data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_batches=args.max_batches, text_field=args.text_field, **documents)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['checkpoint']}: loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}, "
              f"bits/byte {result['val_bpb']:.4f} over {result['tokens']:,} tokens")


def _cmd_analyze(args: argparse.Namespace) -> None:
    from smoe.eval.analysis import analyze
    from smoe.io.checkpoint import list_checkpoints, load_model
    from smoe.io.files import write_json
    from smoe.io.tokenizer import load_tokenizer
    from smoe.train.data import tokenize_documents, val_sequences

    model, path = load_model(args.checkpoint)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path}: has no tokenizer.json, so text cannot be tokenized for it")
    tokenizer = load_tokenizer(path / "tokenizer.json")
    split = tokenize_documents(args.data, tokenizer, args.text_field)
    seqs, sources = val_sequences(split, args.seq_len, args.sequences)
    batches = [(t[:, :-1], t[:, 1:]) for t in seqs.split(8)]
    # earlier checkpoints of the same run, for router saturation
    earlier = [(c.step, load_model(c.path)[0]) for c in list_checkpoints(path.parent.parent, resumable=False)
               if c.path != path and c.path.name < path.name]
    result = analyze(model, batches, sources, list(split.tokens), tokenizer, earlier)
    out = Path(args.out) if args.out else path / "analysis.json"
    write_json(out, result, indent=1)
    print(f"{path}: loss {result['loss']:.4f} on {seqs.shape[0]} sequences of {args.seq_len}")
    for layer, v in result["layers"].items():
        c = v["consecutive"]
        print(f"  layer {layer}: same first expert {c['first']:.3f} (random {c['first_uniform']:.3f}, "
              f"load-weighted {c['first_load_weighted']:.3f}), top-k overlap {c['any']:.3f} (random "
              f"{c['any_uniform']:.3f}, load-aware {c['any_load_aware']:.3f}), dead {v['dead']}")
        if "specialisation" in v:
            sp = v["specialisation"]
            print(f"    specialisation {sp['score']:.3f} (sources shuffled: {sp['shuffled_mean']:.3f} ± "
                  f"{sp['shuffled_std']:.3f})")
    for name, rise in result["knockout"].items():
        share = result["knockout_fraction"].get(name)
        print(f"  knock-out {name}: loss {rise:+.4f}" + (f" ({share:.1%} of routed experts)" if share else ""))
    red = result["redundancy"]
    if red["loss"]:
        print("  redundancy, loss when each token loses its top-scored experts: " + ", ".join(
            f"{r * 16:g}/16 ({n}) {loss - result['loss']:+.4f}"
            for r, n, loss in zip(red["ratios"], red["disabled_experts"], red["loss"])))
    for step, value in result.get("saturation", {}).items():
        chances = [v["chance"] for v in result["saturation_by_layer"][step].values()]
        chance = sum(chances) / len(chances)
        print(f"  saturation at step {step}: {value:.3f} (chance {chance:.3f})")
    print(f"written: {out}")


def _cmd_generate(args: argparse.Namespace) -> None:
    import smoe
    from smoe.generation import TextStream, check_sampling, default_stop_tokens, generate_stream
    from smoe.io.checkpoint import model_directory
    from smoe.io.tokenizer import find_tokenizer
    from smoe.train.loop import resolve_device

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
    model = smoe.load_pretrained(directory, dtype=_dtype(args.dtype), device=resolve_device(args.device),
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


def _dtype(name: str | None):
    from smoe.interop.hf import DTYPES

    return DTYPES.get(name)


def _cmd_convert(args: argparse.Namespace) -> None:
    from smoe.interop import hf
    from smoe.models import quantize
    from smoe.parallel.checkpoint import consolidate, sharded_checkpoint

    if args.model_type and args.to == "smoe":
        raise ValueError("--model-type: only with --to hf or --to gguf")
    if args.quantize and args.to == "hf":
        raise ValueError("--quantize: only with --to smoe (transformers does not read smoe's int8/int4 format)")
    gguf_types, smoe_types = ("q8_0", "q4_0"), ("int8", "int4")
    if args.to == "gguf":
        if args.quantize not in (None, *gguf_types):
            raise ValueError(f"--quantize: a GGUF file is quantised as {' or '.join(gguf_types)}, not {args.quantize}")
        return _convert_to_gguf(args)
    if args.quantize not in (None, *smoe_types):
        raise ValueError(f"--quantize: {args.quantize} is a GGUF type (with --to gguf); smoe's are "
                         f"{' and '.join(smoe_types)}")
    check_quantize_flags(args)
    sharded = sharded_checkpoint(args.path)
    if sharded is not None and args.to == "smoe" and args.dtype is None and not args.quantize:
        # An expert-parallel run's per-rank files become one resumable single-file checkpoint, optimizer included.
        out = consolidate(sharded, args.out)
        print(f"{sharded} -> {out}: single-file smoe training checkpoint")
        return
    model = hf.load_pretrained(args.path, dtype=_dtype(args.dtype) or hf.stored_dtype(args.path))
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

    if args.group_size is not None:
        raise ValueError("--group-size: only with --quantize int4 (GGUF's q4_0 has blocks of 32)")
    out = Path(args.out)
    if out.exists():
        raise ValueError(f"--out {out}: exists; give a new file name")
    model = hf.load_pretrained(args.path, dtype=_dtype(args.dtype) or hf.stored_dtype(args.path),
                               offload=OffloadConfig(max_expert_memory="min", expert_prefetch="off"))
    tokenizer_json = hf.read_tokenizer_json(args.path)
    write_gguf(model, out, model_type=args.model_type, quantize=args.quantize, tokenizer_json=tokenizer_json)
    print(f"{args.path} -> {out}: GGUF, {args.quantize or 'float'} weights, {out.stat().st_size / 1e9:.2f} GB"
          + ("" if tokenizer_json else " (no tokenizer.json: a placeholder vocabulary, token ids only)"))


def _cmd_bench(args: argparse.Namespace) -> None:
    """Runs ``smoe.bench.<name>``'s main, passing the options through."""
    import importlib

    module = importlib.import_module(f"smoe.bench.{args.name.replace('-', '_')}")
    try:
        module.main(args.options)
    except ModuleNotFoundError as err:  # a peer the benchmark measures against is an optional dependency
        raise ValueError(f"{args.name}: needs {err.name}, which is not installed "
                         f"(pip install -U {err.name.split('.')[0]})") from None


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="preset name (see `smoe presets`)")
    p.add_argument("--hf-config", metavar="PATH", help="a Hugging Face config.json, or a directory holding one")
    p.add_argument("--config", metavar="FILE", help="a run config (JSON with model_config; a run's run.json is one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoe", description="Sparse Mixture-of-Experts language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list built-in presets with total/active parameters")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("inspect", help="parameters, FLOPs and memory of a preset or a Hugging Face config.json")
    _model_arguments(p)
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for attention FLOPs")
    p.add_argument("--max-expert-memory", metavar="SIZE",
                   help="what an expert cache of SIZE bytes (e.g. 4GB) means for the model at fp32, bf16, int8 and "
                        "int4: experts it holds, memory resident, bytes a decoded token reads from disk")
    p.add_argument("--hit-rate", type=float, help="with --max-expert-memory: the cache's hit rate (default: its "
                                                  "share of the experts, what routing spread evenly gives)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("cost", help="roofline inference cost: tokens/s, cache and all-to-all bytes, $ per M tokens",
                       description="Decode and prefill tokens/s, cache, all-to-all and memory per device, $ per million"
                                   " tokens, from a roofline: a step takes max(bytes / bandwidth, FLOPs / peak). "
                                   "Formulas: smoe/cost.py, docs/cost.md.")
    _model_arguments(p)
    add_config_arguments(p, CostSettings)
    p.add_argument("--json", action="store_true", help="print a JSON list, one report per hardware profile")
    p.set_defaults(func=_cmd_cost)

    p = sub.add_parser("smoke", help="forward + backward of the tiny presets on CPU (a quick health check)")
    p.add_argument("--presets", help="comma-separated preset names (default: every *-tiny preset)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.set_defaults(func=_cmd_smoke)

    p = sub.add_parser("train", help="train a preset on text data (checkpoints, metrics.jsonl, exact --resume)",
                       description="Train a preset (or the configs of a run config file, or --init-from's model) "
                                   "on text data. Every option below --quiet is a field of TrainConfig or DataConfig "
                                   "(smoe/train/config.py); with --config, the options given override the file's.")
    p.add_argument("--preset", help="preset name (see `smoe presets`)")
    p.add_argument("--config", metavar="FILE", help="a run config: JSON with model_config and optionally "
                                                    "train_config and data_config (a run's run.json is one)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field by dotted path, e.g. --set moe.top_k=4 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/PRESET); must be new, empty or a smoe run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest intact "
                                                         "checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p, DataConfig)
    add_config_arguments(p, TrainConfig)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="loss, perplexity and bits/byte of a checkpoint on text data")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--data", required=True, help="text to evaluate on (same spec as train --data); all of it")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=50)
    p.add_argument("--text-field", default="text")
    p.add_argument("--json", action="store_true")
    add_config_arguments(p, TrainConfig, only=("document_boundaries",))
    p.set_defaults(func=_cmd_eval)

    compare.add_parser(sub)

    upcycle.add_parser(sub)

    p = sub.add_parser("bench", help="a benchmark from benchmarks/ (moe-layer: smoe vs transformers' MoE block)")
    p.add_argument("name", choices=["moe-layer"])
    p.add_argument("options", nargs=argparse.REMAINDER, help="passed to the benchmark (see its --help)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("analyze", help="expert specialisation analyses of a checkpoint on text")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--data", required=True, help="text to analyse (several sources give domain affinity)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sequences", type=int, default=64, help="sequences to route")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", help="JSON output file (default: CHECKPOINT/analysis.json)")
    p.set_defaults(func=_cmd_analyze)

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
                   help="run each decode step as one torch.compile graph: 1.1-2.4x the tokens/s of eager decoding "
                        "on a CPU (docs/benchmarks.md), after compiling for tens of seconds; pays off for long "
                        "generations")
    add_config_arguments(p, OffloadConfig)
    p.set_defaults(func=_cmd_generate)

    serve.add_parser(sub)

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
    sizes = ", ".join(map(str, INT4_GROUP_SIZES))
    p.add_argument("--group-size", type=int, help=f"with --quantize int4: inputs per group, one of {sizes} "
                                                  f"(default {DEFAULT_INT4_GROUP})")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"smoe {args.command}: error: {user_message(err)}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"smoe {args.command}: stopped: {user_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
