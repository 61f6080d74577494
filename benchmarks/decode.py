"""Decode throughput of smoe.generate vs transformers' generate on the same model and weights, in one run, and
against the roofline `smoe cost` predicts for this CPU.

A Mixtral-like (GQA, 8 coarse experts top-2) and a DeepSeek-V3-like (MLA, 32 fine-grained experts top-4 + a shared
one, a dense first layer) model of roughly 100-200M parameters are built as transformers models from
smoe.interop.hf_config.config_to_hf, and ours gets the very same weights. Each contender generates greedily from
the same random prompts, with no stop token; decode time is t(N new tokens) - t(1 new token), so the prefill
cancels, and contenders are interleaved round by round (medians) so load from other tenants hits all alike.
transformers runs with each experts implementation; its best is the peer.

The prediction: `smoe cost`'s roofline (smoe.cost) for the same config, batch, precision and context on the
`cpu-measured` profile, whose bandwidth is the best of copies timed between the rounds (other tenants of the
machine only ever lower it) and whose fp32 matmul peak is measured once at the start. It assumes uniform routing;
the experts our run actually hit per MoE layer are printed beside the uniform expectation. measured / predicted is
the fraction of the roofline reached. The int8 column is the prediction for int8 weights on the same profile.

With ``--quantize int8,int4`` our model also runs weight-only quantised (smoe.quantize) in the same rounds: one
more line per scheme, against the same transformers peer and against the floor of its own bytes (int8/int4
weights and their scales, counted from the quantised model's tensors and the experts the run hit, at the same
measured bandwidth). With ``--compile`` each of our models also decodes with ``generate(compile=True)`` (each
step one torch.compile graph), one more line each; the compilation happens in the warm-up, untimed.

    .venv/bin/python benchmarks/decode.py [--models mixtral,deepseek] [--batch-sizes 1,16] [--rounds 5] [--threads 1]
        [--quantize int8,int4] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import tempfile
import time
import warnings
from dataclasses import replace

import numpy as np
import torch

import smoe
from smoe import presets
from smoe.cost import CostSettings, estimate
from smoe.hardware import copy_bandwidth
from smoe.interop.hf_config import config_to_hf
from smoe.kernels import cpp_build
from smoe.models import Transformer
from smoe.quant.measure import cpu_profile

# (preset, overrides, transformers model type): sized so that weights, not per-op overhead, dominate a decode step
# on a few CPU cores, with a realistic 32k vocabulary.
MODELS = {
    "mixtral": ("mixtral-tiny", {"vocab_size": 32000, "dim": 512, "n_layers": 8, "moe.expert_dim": 1536,
                                 "attention.n_heads": 8, "attention.n_kv_heads": 2, "max_seq_len": 4096}, "mixtral"),
    "deepseek": ("deepseek-v3-tiny", {"vocab_size": 32000, "dim": 512, "n_layers": 8, "ffn_dim": 2048,
                                      "moe.expert_dim": 384, "layout.n_mtp_modules": 0, "max_seq_len": 4096,
                                      "attention.n_heads": 8, "attention.q_lora_rank": 192,
                                      "attention.kv_lora_rank": 128}, "deepseek_v3"),
}
HF_EXPERTS = ("eager", "grouped_mm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # also the weight formats smoe cost predicts for


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_pair(name: str, dtype: torch.dtype):
    """Our model and transformers' with identical weights (saved by transformers, loaded by smoe)."""
    import transformers

    preset, overrides, model_type = MODELS[name]
    config = presets.get(preset, **overrides)
    hf_dict = config_to_hf(config, model_type)
    hf_dict.pop("model_type")
    torch.manual_seed(0)
    hf_models = {}
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        hf_config = transformers.AutoConfig.for_model(model_type, **hf_dict)
        base = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
        for key, tensor in base.state_dict().items():
            if key.endswith("e_score_correction_bias"):
                tensor.normal_(0, 0.1)  # as a trained model's: non-zero, so that it steers the routing
        base.save_pretrained(tmp)
        ours = smoe.load_pretrained(tmp, dtype=dtype).eval()
        for impl in HF_EXPERTS:
            try:
                hf_models[impl] = transformers.AutoModelForCausalLM.from_pretrained(
                    tmp, dtype=dtype, experts_implementation=impl).eval()
            except (ValueError, TypeError):
                continue
    for hf in hf_models.values():
        hf.generation_config.eos_token_id = None  # both sides generate the full length
        hf.generation_config.pad_token_id = 0
    return config, ours, hf_models


def weight_bytes_per_step(model: Transformer, batch: int, experts_hit: dict[int, float]) -> float:
    """Bytes of weights one decode step of ``batch`` sequences reads; ``experts_hit``: routed experts touched per
    MoE layer (its mean over the run)."""
    total = 0
    moe_layers = model.moe_layers_by_index()
    for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):  # quantised weights: buffers
        if name.startswith("mtp."):
            continue
        if name == "embed.weight":
            rows = min(batch, p.shape[0]) if model.head is not None else p.shape[0]  # a tied head reads it all
            total += rows * p.shape[1] * p.element_size()
            continue
        if ".ffn.experts." in name:
            layer = int(name.split(".")[1])
            E = moe_layers[layer].config.n_routed_experts
            total += p.numel() * p.element_size() * experts_hit[layer] / E
            continue
        total += p.numel() * p.element_size()
    return total


def count_experts_hit(model: Transformer, prompts, new_tokens: int) -> dict[int, float]:
    """Mean distinct routed experts per MoE layer per decode step, observed with router hooks."""
    hits: dict[int, list[int]] = {i: [] for i in model.moe_layers_by_index()}
    handles = []
    for i, layer in model.moe_layers_by_index().items():
        def hook(module, args, routing, i=i):
            if args[0].shape[0] == len(prompts):  # decode steps only: one token per row
                hits[i].append(int(routing.expert_ids_A.unique().numel()))
        handles.append(layer.router.register_forward_hook(hook))
    try:
        smoe.generate(model, prompts, max_new_tokens=new_tokens)
    finally:
        for h in handles:
            h.remove()
    return {i: float(np.mean(v)) for i, v in hits.items()}


def predicted(config, cpu, batch: int, context: int, weights: str):
    """`smoe cost`'s decode step for one batch on the measured CPU profile ``cpu``."""
    settings = CostSettings(hardware=(cpu.name,), batch=(batch,), weights=weights, context=context)
    return estimate(config, cpu, settings).decode[0]


def bench(name: str, batch_sizes: list[int], prompt_len: int, new_tokens: int, rounds: int, dtype: str,
          schemes: list[str], compiled: bool) -> None:
    config, ours, hf_models = build_pair(name, DTYPES[dtype])
    cpu = cpu_profile()
    # our other contenders: name -> (model, compile, weight format)
    variants = {f"smoe {s}": (smoe.quantize(copy.deepcopy(ours), s), False, s) for s in schemes}
    if compiled:
        variants.update({f"{key} compiled": (model, True, weights) for key, (model, _, weights) in
                         [("smoe", (ours, False, dtype)), *variants.items()]})
    context = prompt_len + new_tokens // 2  # the mean context of the timed steps
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"\n{name}: {n_params / 1e6:.0f}M parameters, {config.n_layers} layers, dim {config.dim}, "
          f"{config.moe.n_routed_experts} experts top-{config.moe.top_k}, {config.attention.kind}; "
          f"predictions at context {context}, matmul peak {cpu.peak_flops['fp32'] / 1e9:.0f} GFLOP/s fp32")
    print(f"{'batch':>5} {'smoe tok/s':>10} " + " ".join(f"{'hf ' + k + ' tok/s':>20}" for k in hf_models)
          + f" {'smoe/best hf':>12} {'hit obs/unif':>12} {'MB/step':>8} {'GB/s':>5} {'pred tok/s':>10} {'bound':>7}"
          + f" {'smoe/pred':>9} {'int8 pred':>9} {'same tokens':>11}")
    g = torch.Generator().manual_seed(0)
    for B in batch_sizes:
        ids = torch.randint(1, config.vocab_size, (B, prompt_len), generator=g)
        mask = torch.ones_like(ids)
        runners = {"smoe": lambda n, ids=ids: smoe.generate(ours, ids, max_new_tokens=n)}
        for key, (model, compile, _) in variants.items():
            runners[key] = lambda n, ids=ids, model=model, compile=compile: smoe.generate(
                model, ids, max_new_tokens=n, compile=compile)
        for impl, hf in hf_models.items():
            runners[impl] = lambda n, ids=ids, mask=mask, hf=hf: hf.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)[:, prompt_len:]
        outputs = {k: run(new_tokens) for k, run in runners.items()}  # warm-up, and the tokens to compare
        times = {k: ([], []) for k in runners}
        bandwidth = copy_bandwidth()
        with torch.inference_mode():
            for _ in range(rounds):
                for key, run in runners.items():
                    times[key][0].append(_timed(functools.partial(run, 1)))
                    times[key][1].append(_timed(functools.partial(run, new_tokens)))
                bandwidth = max(bandwidth, copy_bandwidth())
        tok_s = {k: B * (new_tokens - 1) / (np.median(full) - np.median(first)) for k, (first, full) in times.items()}
        best_hf = max(tok_s[k] for k in hf_models)
        hit = count_experts_hit(ours, ids, new_tokens)
        mean_hit = np.mean(list(hit.values()))
        measured_cpu = replace(cpu, memory_bandwidth=max(bandwidth, cpu.memory_bandwidth))
        pred, pred_int8 = (predicted(config, measured_cpu, B, context, w) for w in (dtype, "int8"))
        same = all(torch.equal(outputs["smoe"], outputs[k]) for k in hf_models)
        cells = " ".join(f"{tok_s[k]:>20.1f}" for k in hf_models)
        print(f"{B:>5} {tok_s['smoe']:>10.1f} {cells} {tok_s['smoe'] / best_hf:>11.2f}x "
              f"{f'{mean_hit:.1f}/{pred.experts_hit:.1f}':>12} {pred.bytes / 1e6:>8.1f} "
              f"{measured_cpu.memory_bandwidth / 1e9:>5.1f} {pred.tokens_per_s:>10.1f} {pred.bound:>7} "
              f"{tok_s['smoe'] / pred.tokens_per_s:>9.2f} {pred_int8.tokens_per_s:>9.1f} {'yes' if same else 'no':>11}",
              flush=True)
        for key, (model, _, weights) in variants.items():
            q_bytes = weight_bytes_per_step(model, B, hit)
            q_floor = B * measured_cpu.memory_bandwidth / q_bytes
            agree = (outputs[key] == outputs["smoe"]).float().mean()
            pred_w = predicted(config, measured_cpu, B, context, weights).tokens_per_s
            print(f"{B:>5} {key:>10}: {tok_s[key]:.1f} tok/s, {tok_s[key] / best_hf:.2f}x best hf, "
                  f"{tok_s[key] / tok_s['smoe']:.2f}x smoe {dtype}, {q_bytes / 1e6:.1f} MB/step, floor {q_floor:.1f} "
                  f"tok/s, {tok_s[key] / q_floor:.2f} of it, {tok_s[key] / pred_w:.2f} of smoe cost's {weights} "
                  f"prediction; {agree:.0%} of tokens as {dtype}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (medians)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--quantize", default="", help="comma-separated schemes our model also runs in, e.g. int8,int4")
    parser.add_argument("--compile", action="store_true", help="also decode each of our models with compile=True")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Each (model, batch size) is a graph of Transformer.decode_step: allow them all (Dynamo's default is 8).
    torch._dynamo.config.recompile_limit = 64
    print(f"greedy decode tokens/s, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, C++ kernels {cpp_build.instruction_set()}")
    for name in args.models.split(","):
        bench(name, [int(b) for b in args.batch_sizes.split(",")], args.prompt_len, args.new_tokens, args.rounds,
              args.dtype, [s for s in args.quantize.split(",") if s], args.compile)


if __name__ == "__main__":
    main()
