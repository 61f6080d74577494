"""Training-step throughput of smoe vs Hugging Face transformers on the same architecture, in one run.

For each tiny preset that a transformers family can express, both models are built from the same config
(ours directly, transformers' through smoe.interop.hf_config.config_to_hf), then timed over identical steps of
forward + backward + AdamW at the same precision, interleaved round by round (median step time), so load from
other tenants of the machine hits every contender alike. transformers runs on each of its
`experts_implementation`s and the best one is the peer. Prints tokens/s and the ratio ours / best-transformers.

    .venv/bin/python benchmarks/train_throughput.py [--presets mixtral-tiny,deepseek-v3-tiny] [--precision bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import numpy as np
import torch

from smoe import presets
from smoe.interop.hf_config import config_to_hf
from smoe.models import build_model

FAMILY = {"mixtral-tiny": "mixtral", "qwen2-moe-tiny": "qwen2_moe", "qwen3-moe-tiny": "qwen3_moe",
          "deepseek-v2-tiny": "deepseek_v2", "deepseek-v3-tiny": "deepseek_v3", "olmoe-tiny": "olmoe",
          "minimax-tiny": "minimax_m2", "dbrx-tiny": "dbrx"}
HF_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _once(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _trainer(model, loss_fn, precision: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_preset(name: str, batch: int, seq: int, precision: str, warmup: int, steps: int) -> dict:
    """Tokens/s of each contender, timed in interleaved rounds (one step of each per round, medians reported) so
    that load from noisy neighbours hits all of them alike."""
    import transformers

    # MTP is a DeepSeek-V3 training extra that transformers does not implement: compare the same network.
    config = presets.get(name, **{"layout.n_mtp_modules": 0})
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1))
    ours = build_model(config)
    steppers = {"ours": _trainer(ours, lambda: ours(ids[:, :-1], labels=ids[:, 1:]).loss, precision)}
    for _ in range(warmup):
        ours_time = _once(steppers["ours"])
    hf_dict = config_to_hf(config, FAMILY[name])
    model_type = hf_dict.pop("model_type")
    result = {"preset": name}
    for impl in HF_IMPLEMENTATIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_config = transformers.AutoConfig.for_model(model_type, **hf_dict)
            hf_config.output_router_logits = True  # train with its balance loss, as we do
            try:
                hf = transformers.AutoModelForCausalLM.from_config(hf_config, experts_implementation=impl)
            except (ValueError, TypeError):
                continue
        # transformers shifts labels internally: give it the unshifted sequence
        step = _trainer(hf, lambda hf=hf: hf(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss, precision)
        try:
            probe = _once(step)
        except RuntimeError as err:  # e.g. DBRX's eager experts mix dtypes under autocast
            print(f"  transformers {impl} failed on {name}: {str(err).splitlines()[0]}", flush=True)
            continue
        if probe > 20 * ours_time:  # hopeless here (batched_mm on CPU): report the probe, don't spend minutes
            result[f"hf_{impl}"] = batch * seq / probe
            continue
        for _ in range(warmup - 1):
            step()
        steppers[f"hf_{impl}"] = step
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(steps):
        for key, step in steppers.items():
            times[key].append(_once(step))
    for key, ts in times.items():
        result[key] = batch * seq / float(np.median(ts))
    hf_best = max((v for k, v in result.items() if k.startswith("hf_")), default=float("nan"))
    result["ratio"] = result["ours"] / hf_best
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(FAMILY))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7, help="timed rounds")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"train step tokens/s, batch {args.batch_size} x seq {args.seq_len}, {args.precision}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'preset':<18} {'smoe':>8} " + " ".join(f"{'hf ' + i:>14}" for i in HF_IMPLEMENTATIONS)
    print(header + f" {'smoe/best hf':>13}")
    for name in args.presets.split(","):
        r = bench_preset(name, args.batch_size, args.seq_len, args.precision, args.warmup, args.steps)
        cells = " ".join(f"{r.get('hf_' + i, float('nan')):>14.0f}" for i in HF_IMPLEMENTATIONS)
        print(f"{name:<18} {r['ours']:>8.0f} {cells} {r['ratio']:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
