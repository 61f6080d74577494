"""What an expert budget costs (smoe.offload, docs/offload.md): decode tokens/s, cache hit rate, look-ahead accuracy,
bytes read per token and peak resident memory at budgets of 100%, 50%, 25% and 10% of the routed experts' bytes,
with routing spread evenly (random weights: the worst case) and skewed (Zipf over experts, as trained models show);
beside each, the physical model: the 100% run's time per token plus the bytes it reads over the measured disk
bandwidth. Against llama.cpp on the same weights as GGUF (``smoe convert --to gguf``) where llama-cpp-python is
installed.

The model: a preset's real shape (default DeepSeek-V2-Lite: 26 MoE layers of 64 experts, top-6, two shared; 15.7B
parameters) with random weights, written once as a smoe int4 checkpoint (``--scheme``), streamed a tensor (an
expert) at a time so it never sits in memory. The skewed load: each MoE layer's router gets a fixed bias of
``log p_e`` with p Zipf(``--zipf``) over a random order of its experts, so tokens prefer some experts as a trained
router does and the next layer's look-ahead guess (its own biased router) stays meaningful; the realised skew is
printed (the share of routed tokens the top tenth of experts get, and the effective number of experts, exp of the
routing entropy).

Each configuration runs in a fresh process, which loads the checkpoint with its budget, decodes a warm-up prompt,
then times a second one (``--new-tokens`` greedy tokens after a ``--prompt``-token prompt; decode time from the
first token on) and reports its own peak resident set (VmHWM) over its resident set before loading. Every expert
read is dropped from the kernel's page cache once read (``drop_page_cache``, no read-ahead), and the file is evicted
before each run, so each miss reads the disk, as on a machine whose RAM the model exceeds (``--warm-page-cache``:
as on one whose RAM holds the file). Policies (lru, lfu, load) and look-ahead on or off are compared by replaying
the cache calls the runs record through the cache itself (reads that cost nothing; the warm-up generation and the
timed prompt warm the cache and the policies' counts, the timed decode is counted), for every budget: hit rates, not
times. Runs alternate budgets and repeat (``--repeats``); the table gives each measurement's range over the repeats.

``--trained CKPT,...`` compares the policies on trained routers instead (no timed runs): each checkpoint reads
text one token a forward (the routing decode steps see), ``--warm-tokens`` tokens of ``--warm-text`` (default: the
start of ``--text``) to warm the cache, then ``--trained-tokens`` of ``--text``, counted; checkpoints of one
architecture (seeds) give each policy's hit rate, and its difference with lru on the same trace, as a mean and 95%
t-interval. A ``--warm-text`` of another kind is a workload that shifts.

    .venv/bin/python benchmarks/offload.py [--dir /work/scratch/offload-bench] [--preset deepseek-v2-lite]
        [--budgets 100,50,25,10] [--routings uniform,zipf] [--repeats 2] [--threads 2] [--keep]
    .venv/bin/python benchmarks/offload.py --trained RUN/checkpoints/step_N,... --text FILE [--trained-tokens 1024]
        [--warm-text FILE --warm-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from smoe import presets
from smoe.config import QuantConfig
from smoe.eval.stats import interval
from smoe.io.safetensors import SafetensorsFile, write_safetensors_streamed
from smoe.io.tokenizer import load_tokenizer
from smoe.models import Transformer
from smoe.nn import RMSNorm
from smoe.offload.budget import OffloadConfig, format_size
from smoe.offload.cache import CacheStats, ExpertCache
from smoe.quant.format import quantize_weight

CHILD = r"""
import json, sys, time
from dataclasses import asdict
import torch, smoe
from smoe.generation import generate_stream
from smoe.kernels import cpp_experts, cpp_quant
from smoe.offload.budget import OffloadConfig
from smoe.offload.experts import cache_of

a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
cpp_experts.build(); cpp_quant.build()
base = status("VmRSS")
start = time.perf_counter()
model = smoe.load_pretrained(a["path"], offload=OffloadConfig(**a["offload"]) if a["offload"] else None)
load_s = time.perf_counter() - start
if a["zipf"]:
    g = torch.Generator().manual_seed(a["seed"])
    for moe in model.moe_layers:
        E = moe.config.n_routed_experts
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float) ** a["zipf"]
        moe.router.logit_bias = torch.nn.Parameter((p / p.sum()).log()[torch.randperm(E, generator=g)], False)
cache = cache_of(model)
trace = []  # every cache call, for the policy replays: those before trace_from warm the cache, the rest are counted
if cache is not None:
    reserve, prefetch = cache.reserve, cache.prefetch
    def reserve_logged(layer, experts, tokens):
        trace.append(("reserve", layer, experts, tokens))
        return reserve(layer, experts, tokens)
    def prefetch_logged(layer, experts):
        trace.append(("prefetch", layer, experts))
        return prefetch(layer, experts)
    cache.reserve, cache.prefetch = reserve_logged, prefetch_logged
def read(ids):  # one token a forward, in windows the model's context holds
    window = model.config.max_seq_len  # a prompt of T tokens and 1 new token need T positions
    for start in range(0, len(ids), window):
        for _ in generate_stream(model, [ids[start : start + window]], max_new_tokens=1, prefill_chunk=1):
            pass
if a.get("text"):  # a trained model reads text one token a forward (teacher-forced decode): its routers' trace
    warm, counted = a["text"]
    with torch.inference_mode():
        read(warm)
        trace_from = len(trace)
        read(counted)
    print(json.dumps({"trace": trace, "trace_from": trace_from, "slots": cache.n_slots,
                      "expert_bytes": cache.expert_bytes, "per_layer": model.config.moe.n_routed_experts,
                      "name": model.config.name}))
    sys.exit()
def decode(prompt, n):
    times, snap, trace_from = [], None, None
    for i, _ in enumerate(generate_stream(model, [prompt], max_new_tokens=n)):
        times.append(time.perf_counter())
        if i == 0 and cache is not None:
            snap, trace_from = asdict(cache.stats), len(trace)
    return times, snap, trace_from
g = torch.Generator().manual_seed(a["seed"])
prompts = [torch.randint(3, model.config.vocab_size, (a["prompt"],), generator=g).tolist() for _ in range(2)]
with torch.inference_mode():
    decode(prompts[0], a["warmup"])
    times, snap, trace_from = decode(prompts[1], a["new_tokens"])
steps = len(times) - 1
out = {"base": base, "peak": status("VmHWM"), "load_s": load_s, "steps": steps,
       "decode_s": times[-1] - times[0], "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
       "weights_buffers": sum(b.numel() * b.element_size() for b in model.buffers())}
if cache is not None:
    end = asdict(cache.stats)
    out.update(stats={k: end[k] - snap[k] for k in end}, slots=cache.n_slots, expert_bytes=cache.expert_bytes,
               trace=trace, trace_from=trace_from)
print(json.dumps(out))
"""

LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp
a = json.loads(sys.argv[1])
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
base = status("VmRSS")
llm = llama_cpp.Llama(a["path"], n_ctx=a["prompt"] + a["new_tokens"] + a["warmup"] + 16, n_threads=a["threads"],
                      n_threads_batch=a["threads"], verbose=False)
rng = np.random.default_rng(a["seed"])
def decode(prompt, n):
    llm.reset()
    llm.eval(prompt)
    times = [time.perf_counter()]
    for _ in range(n - 1):
        token = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                    shape=(llm.n_vocab(),))))
        llm.eval([token])
        times.append(time.perf_counter())
    return times
prompts = [rng.integers(3, llm.n_vocab(), a["prompt"]).tolist() for _ in range(2)]
decode(prompts[0], a["warmup"])
times = decode(prompts[1], a["new_tokens"])
print(json.dumps({"base": base, "peak": status("VmHWM"), "steps": len(times) - 1, "decode_s": times[-1] - times[0]}))
"""


# --- the checkpoint ----------------------------------------------------------------------------------------------


def make_checkpoint(path: Path, preset: str, scheme: str, layers: int | None, seed: int) -> None:
    """A smoe checkpoint of ``preset``'s shape, random weights (normal, std 0.02; norms 1), quantised to ``scheme``,
    streamed: one expert's (or a block of rows') weights in memory at a time."""
    changes = {"n_layers": layers} if layers else {}
    config = replace(presets.get(preset, **changes), quantization=QuantConfig(scheme, 64 if scheme == "int4" else None))
    with torch.device("meta"):
        model = Transformer(config)
    modules = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
    g = torch.Generator().manual_seed(seed)
    stash: dict[str, list[torch.Tensor]] = {}

    def data():
        for name, t in state.items():
            owner, _, leaf = name.rpartition(".")
            if name in stash:
                yield from stash.pop(name)
            elif leaf == "qweight":
                module = modules[owner]
                rows, inputs = t.shape[-2], t.shape[-1] * (2 if module.group_size else 1)
                stash[owner + ".scale"] = []
                if module.group_size:
                    stash[owner + ".offset"] = []
                for _ in range(t.shape[0] if t.dim() == 3 else 1):
                    for start in range(0, rows, 8192):  # a block of rows at a time (the head has 102400)
                        q = quantize_weight(torch.randn(min(8192, rows - start), inputs, generator=g) * 0.02,
                                            config.quantization)
                        stash[owner + ".scale"].append(q.scale)
                        if q.offset is not None:
                            stash[owner + ".offset"].append(q.offset)
                        yield q.qweight
            elif isinstance(modules.get(owner), RMSNorm) or leaf == "expert_bias" or leaf == "bias":
                yield (torch.ones if isinstance(modules.get(owner), RMSNorm) else torch.zeros)(t.shape, dtype=t.dtype)
            else:  # the embedding, routers, MLA's full-precision wkv_b
                for rows in torch.arange(t.shape[0]).split(8192):
                    yield torch.randn(len(rows), *t.shape[1:], generator=g).to(t.dtype) * 0.02

    path.mkdir(parents=True, exist_ok=True)
    write_safetensors_streamed(path / "model.safetensors.tmp", entries, data(), {"format": "pt"})
    (path / "config.json").write_text(config.to_json())
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")


def expert_sizes(path: Path) -> tuple[int, int, int]:
    """(routed experts, bytes of one, bytes of everything else) of a checkpoint, from its header."""
    header = SafetensorsFile(path / "model.safetensors")
    experts = [n for n in header.keys() if ".ffn.experts." in n]
    one_layer = [n for n in experts if n.startswith(experts[0].split(".ffn.")[0] + ".")]
    E = header.shape(one_layer[0])[0]
    per_expert = sum(math.prod(header.shape(n)) * header.dtype(n).itemsize for n in one_layer) // E
    total = (path / "model.safetensors").stat().st_size
    n = len(experts) // len(one_layer) * E
    return n, per_expert, total - n * per_expert


# --- the disk ----------------------------------------------------------------------------------------------------


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (those no process maps)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_bandwidth(path: Path, chunk: int, n: int, seed: int) -> tuple[float, float]:
    """(bytes/s of ``n`` reads of ``chunk`` bytes at random offsets, one thread; of 1 GB read in order), cold: the
    file evicted first, no read-ahead for the random ones."""
    size = path.stat().st_size
    rng = random.Random(seed)
    buffer = bytearray(chunk)
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        start = time.perf_counter()
        for _ in range(n):
            os.preadv(fd, [buffer], rng.randrange(0, size - chunk) // 4096 * 4096)
        random_bps = n * chunk / (time.perf_counter() - start)
        evict(path)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        big = bytearray(64 * 2**20)
        start, done = time.perf_counter(), 0
        while done < min(size, 2**30):
            done += os.preadv(fd, [big], done)
        sequential_bps = done / (time.perf_counter() - start)
    finally:
        os.close(fd)
    evict(path)
    return random_bps, sequential_bps


# --- runs --------------------------------------------------------------------------------------------------------


def run_child(code: str, args: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    if out.returncode:
        shown = {k: v for k, v in args.items() if k != "text"}  # not the token ids
        raise RuntimeError(f"run {shown} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class _NoReads:
    """An ExpertFiles whose reads cost nothing: the cache's bookkeeping alone, for replays."""

    def __init__(self, expert_bytes: int):
        self.expert_bytes = expert_bytes

    def read(self, key, slot, drop_page_cache=False) -> int:
        return self.expert_bytes

    def advise_random(self) -> None:
        pass

    def close(self) -> None:
        pass


def replay(trace: list, trace_from: int, slots: int, policy: str, lookahead: bool, expert_bytes: int) -> CacheStats:
    """A recorded run's cache calls through a cache of ``slots`` slots under a policy: the calls before
    ``trace_from`` warm it (and the policy's counts), the rest are counted. History only: no call is seen twice.
    Reads cost nothing and finish before the next call (waited for), so a replay does not depend on thread timing."""
    name, _, half_life = policy.partition(":")  # load:K, load's counts with a half-life of K slots (0: never)
    cache = ExpertCache(_NoReads(expert_bytes), {"x": ((1,), torch.uint8)}, slots, name, io_threads=1,
                        **({"load_half_life": float(half_life) or None} if half_life else {}))
    held: list[int] = []
    for n, event in enumerate(trace):
        if n == trace_from:
            cache.stats = CacheStats()
        if event[0] == "reserve":
            if held:
                cache.release(held)
            held = cache.reserve(event[1], event[2], event[3])
        elif lookahead:
            cache.prefetch(event[1], event[2])
        cache.wait(list(cache.loading))
    if held:
        cache.release(held)
    cache.close()
    return cache.stats


def skew(trace: list, E: int) -> tuple[float, float]:
    """(share of routed tokens the top tenth of each layer's E experts got, mean effective experts
    exp(entropy))."""
    loads: dict[int, dict[int, int]] = {}
    for event in trace:
        if event[0] == "reserve":
            layer = loads.setdefault(event[1], {})
            for e, n in zip(event[2], event[3], strict=True):
                layer[e] = layer.get(e, 0) + n
    top, effective = [], []
    for layer in loads.values():
        counts = sorted(layer.values(), reverse=True)
        total = sum(counts)
        top.append(sum(counts[: max(1, E // 10)]) / total)
        effective.append(math.exp(-sum(c / total * math.log(c / total) for c in counts)))
    return sum(top) / len(top), sum(effective) / len(effective)


def _mean_interval(values: list[float], sign: str) -> str:
    """``mean [95% t-interval]`` as percentages; the mean alone for one value."""
    iv = interval(values)
    return f"{iv.mean:{sign}.1%}" + ("" if iv.n < 2 else f" [{iv.low:{sign}.1%}, {iv.high:{sign}.1%}]")


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if len(values) == 1 or format(lo, fmt) == format(hi, fmt) else \
        f"{format(lo, fmt)}-{format(hi, fmt)}"


def trained_replays(checkpoints: list[str], text_file: str, n_tokens: int, budgets: list[int], policies: list[str],
                    env: dict, warm_file: str | None = None, warm_tokens: int | None = None) -> None:
    """The policies compared on trained routers: each checkpoint reads text one token a forward (the routing a
    decode step sees), ``warm_tokens`` (default ``n_tokens``) of ``warm_file`` (default: the start of
    ``text_file``) that warm the cache, then ``n_tokens`` of ``text_file`` (after the warm-up's, when it is the same
    file) that are counted; its recorded cache calls are replayed under every policy and budget. A different warm-up
    file is a workload that shifts. Checkpoints of one architecture (seeds) give each policy's hit rate and its
    difference with lru as a mean and 95% t-interval over them."""
    warm_tokens = warm_tokens or n_tokens
    text = Path(text_file).read_text(encoding="utf-8")
    warm = Path(warm_file).read_text(encoding="utf-8") if warm_file else None
    print(f"trained routers reading one token a forward: {warm_tokens} tokens of {warm_file or text_file} warm the "
          f"cache, then {n_tokens} of {text_file} are counted; hit rate with look-ahead on / off")
    for i, checkpoint in enumerate(checkpoints):
        print(f"  [{i}] {checkpoint}")
    print(f"{'model':>14} {'ckpt':>4} {'skew':>18} {'budget':>7} {'slots':>6} "
          + " ".join(f"{p + ' on/off':>15}" for p in policies))
    hits: dict[tuple, list[float]] = {}  # (model, budget, policy) -> look-ahead on, per checkpoint
    for i, checkpoint in enumerate(checkpoints):
        tokenizer = load_tokenizer(checkpoint)
        ids = tokenizer.encode(text).ids
        if warm is None:
            warm_ids, counted = ids[:warm_tokens], ids[warm_tokens : warm_tokens + n_tokens]
        else:
            warm_ids, counted = tokenizer.encode(warm).ids[:warm_tokens], ids[:n_tokens]
        if len(warm_ids) < warm_tokens or len(counted) < n_tokens:
            raise SystemExit(f"--text, --warm-text: {checkpoint}'s tokenizer makes fewer tokens of them than "
                             f"--warm-tokens {warm_tokens} and --trained-tokens {n_tokens} ask for")
        everything = {"max_expert_memory": 2**62, "expert_cache_policy": "lru", "expert_io_threads": 1,
                      "drop_page_cache": False}
        res = run_child(CHILD, {"path": checkpoint, "threads": 1, "offload": everything, "zipf": 0, "seed": 0,
                                "text": [warm_ids, counted]}, env)
        trace, trace_from, n_experts, one = res["trace"], res["trace_from"], res["slots"], res["expert_bytes"]
        top, effective = skew(trace[trace_from:], res["per_layer"])
        for b in budgets:
            slots = max(1, n_experts * b // 100)
            cells = []
            for policy in policies:
                rates = [replay(trace, trace_from, slots, policy, la, one).hit_rate for la in (True, False)]
                hits.setdefault((res["name"], b, policy), []).append(rates[0])
                cells.append(f"{rates[0]:.1%}/{rates[1]:.1%}")
            print(f"{res['name']:>14} {f'[{i}]':>4} {f'top10% {top:.0%}, eff {effective:.0f}':>18} "
                  f"{b:>6}% {slots:>6} " + " ".join(f"{c:>15}" for c in cells), flush=True)
    print("\nper model, over its checkpoints: hit rate (look-ahead on), mean [95% t-interval], and each policy minus "
          "lru on the same trace")
    for name in dict.fromkeys(k[0] for k in hits):
        for b in budgets:
            base = hits[(name, b, "lru")] if "lru" in policies else None
            cells = []
            for policy in policies:
                rates = hits[(name, b, policy)]
                cell = f"{policy} {_mean_interval(rates, '')}"
                if base is not None and policy != "lru":
                    cell += f" ({_mean_interval([x - y for x, y in zip(rates, base, strict=True)], '+')})"
                cells.append(cell)
            print(f"{name:>14} {b:>3}% n={len(rates)}: " + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/smoe-offload-bench", help="where the checkpoint and GGUF go")
    parser.add_argument("--preset", default="deepseek-v2-lite")
    parser.add_argument("--layers", type=int, help="fewer layers than the preset's (a quicker, smaller model)")
    parser.add_argument("--scheme", default="int4", choices=["int8", "int4"])
    parser.add_argument("--budgets", default="100,50,25,10", help="percent of the routed experts' bytes")
    parser.add_argument("--routings", default="uniform,zipf")
    parser.add_argument("--zipf", type=float, default=1.0, help="exponent of the skewed load's Zipf distribution")
    parser.add_argument("--policies", default="lru,lfu,load", help="compared by replaying the recorded traces; "
                        "load:K gives load's counts a half-life of K slots' worth of routed tokens (load:0: never)")
    parser.add_argument("--policy", default=OffloadConfig().expert_cache_policy, help="the policy the timed runs use")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=8, help="new tokens of the untimed warm-up generation")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--io-threads", type=int, default=2)
    parser.add_argument("--warm-page-cache", action="store_true",
                        help="leave read experts in the page cache (a machine whose RAM holds the file)")
    parser.add_argument("--no-in-memory", action="store_true", help="skip the run with every expert in memory")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and GGUF for the next run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trained", help="comma-separated trained checkpoints: compare the policies on their routers' "
                                          "traces reading --text (replays only; no timed runs)")
    parser.add_argument("--text", help="with --trained: a text file the models read")
    parser.add_argument("--trained-tokens", type=int, default=1024, help="with --trained: tokens of --text counted")
    parser.add_argument("--warm-text", help="with --trained: a file whose tokens warm the cache first (a workload "
                                            "that shifts; default: the start of --text)")
    parser.add_argument("--warm-tokens", type=int, help="with --trained: tokens that warm the cache (default: "
                                                        "--trained-tokens)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    budgets, policies = [int(b) for b in args.budgets.split(",")], args.policies.split(",")
    if args.trained:
        if not args.text:
            parser.error("--trained: needs --text, the file the models read")
        trained_replays(args.trained.split(","), args.text, args.trained_tokens, budgets, policies, env,
                        args.warm_text, args.warm_tokens)
        return
    root = Path(args.dir)
    path = root / f"{args.preset}-{args.layers or 'all'}-{args.scheme}"
    if not (path / "model.safetensors").is_file():
        start = time.perf_counter()
        make_checkpoint(path, args.preset, args.scheme, args.layers, args.seed)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    n_experts, one, other = expert_sizes(path)
    experts, per_layer = n_experts * one, presets.get(args.preset).moe.n_routed_experts
    print(f"{args.preset} ({args.layers or 'all'} layers), random weights, {args.scheme}: {n_experts} routed experts "
          f"of {format_size(one)} = {format_size(experts)}, everything else {format_size(other)}; torch "
          f"{torch.__version__}, {args.threads} threads, {args.io_threads} reading threads, page cache "
          f"{'kept' if args.warm_page_cache else 'dropped after each read'}")
    random_bps, sequential_bps = disk_bandwidth(path / "model.safetensors", one, 64, args.seed)
    print(f"disk, cold: {random_bps / 1e6:.0f} MB/s reading single experts at random offsets (one thread), "
          f"{sequential_bps / 1e6:.0f} MB/s reading 1 GB in order")

    routings = args.routings.split(",")
    common = {"path": str(path), "threads": args.threads, "prompt": args.prompt, "warmup": args.warmup,
              "new_tokens": args.new_tokens, "seed": args.seed}
    results: dict[tuple, list[dict]] = {}
    for r in range(args.repeats):
        order = [(routing, b) for routing in routings for b in budgets]
        for routing, b in order if r % 2 == 0 else reversed(order):
            evict(path / "model.safetensors")
            offload = {"max_expert_memory": max(int(experts * b / 100), 1), "expert_cache_policy": args.policy,
                       "expert_io_threads": args.io_threads, "drop_page_cache": not args.warm_page_cache}
            res = run_child(CHILD, {**common, "offload": offload, "zipf": args.zipf if routing == "zipf" else 0},
                            env)
            results.setdefault((routing, b), []).append(res)
            print(f"  run {r + 1}: {routing} {b}%: {res['steps'] / res['decode_s']:.2f} tok/s", flush=True)
        if not args.no_in_memory:
            evict(path / "model.safetensors")
            res = run_child(CHILD, {**common, "offload": None, "zipf": 0}, env)
            results.setdefault(("uniform", "memory"), []).append(res)
            print(f"  run {r + 1}: in memory: {res['steps'] / res['decode_s']:.2f} tok/s", flush=True)

    print(f"\ndecode, batch 1, {args.prompt}-token prompt, {args.new_tokens} new tokens; policy {args.policy}, "
          f"look-ahead on; ranges over {args.repeats} runs")
    print(f"{'routing':>8} {'budget':>7} {'slots':>6} {'tok/s':>11} {'model tok/s':>11} {'hit rate':>9} "
          f"{'look-ahead':>10} {'MB read/tok':>11} {'peak RSS GB':>11} {'bound GB':>9} {'waited s':>9}")
    compute_s = {}  # the compute alone: every expert in memory, else the 100% budget after its warm-up
    for routing in routings:
        full = results.get(("uniform", "memory")) or results.get((routing, 100))
        if full:
            compute_s[routing] = min(x["decode_s"] / x["steps"] for x in full)
    for (routing, b), runs in results.items():
        tok_s = [x["steps"] / x["decode_s"] for x in runs]
        peak = [(x["peak"] - x["base"]) / 1e9 for x in runs]
        if b == "memory":
            print(f"{routing:>8} {'memory':>7} {'-':>6} {_range(tok_s, '.2f'):>11} {'':>11} {'':>9} {'':>10} "
                  f"{'':>11} {_range(peak, '.2f'):>11} {(other + experts) / 1e9:>9.2f}")
            continue
        stats = [CacheStats(**x["stats"]) for x in runs]
        per_token = [s.bytes_read / x["steps"] / 1e6 for s, x in zip(stats, runs, strict=True)]
        model = "-"
        if routing in compute_s:  # the physical model: compute + reads over the disk's random-read bandwidth
            predicted = [1 / (compute_s[routing] + mb * 1e6 / random_bps) for mb in per_token]
            model = _range(predicted, ".2f")
        # Parameters and buffers: a quantised linear's int4/int8 weights, scales and offsets are buffers (0.65 GB of
        # DeepSeek-V2-Lite's 1.73 GB at int4), which a bound of parameters alone left out.
        bound = (runs[0]["weights"] + runs[0]["weights_buffers"] + runs[0]["slots"] * runs[0]["expert_bytes"]) / 1e9
        print(f"{routing:>8} {b:>6}% {runs[0]['slots']:>6} {_range(tok_s, '.2f'):>11} {model:>11} "
              f"{_range([s.hit_rate for s in stats], '.1%'):>9} "
              f"{_range([s.lookahead_recall for s in stats], '.0%'):>10} {_range(per_token, '.0f'):>11} "
              f"{_range(peak, '.2f'):>11} {bound:>9.2f} {_range([s.wait_seconds for s in stats], '.1f'):>9}")
    print("model tok/s: 1 / (the in-memory run's s/token + MB read per token / the disk's random-read MB/s); bound GB: "
          "the weights that stay in memory (parameters and buffers) plus the cache's slots, against which peak RSS is "
          "measured")

    print(f"\nthe recorded cache calls replayed under each policy, the warm-up generation and the timed prompt warming "
          f"the cache, the timed decode counted (hit rate, look-ahead on / off; zipf {args.zipf})")
    print(f"{'routing':>8} {'skew':>18} {'budget':>7} " + " ".join(f"{p + ' on/off':>15}" for p in policies))
    for routing in routings:
        run = results[(routing, budgets[0])][0]  # the same tokens at every budget
        trace, trace_from = run["trace"], run["trace_from"]
        top, effective = skew(trace[trace_from:], per_layer)
        for b in budgets:
            slots = max(1, int(experts * b / 100) // one)
            cells = []
            for policy in policies:
                on, off = (replay(trace, trace_from, min(slots, n_experts), policy, la, one).hit_rate
                           for la in (True, False))
                cells.append(f"{on:.1%}/{off:.1%}")
            print(f"{routing:>8} {f'top10% {top:.0%}, eff {effective:.0f}':>18} {b:>6}% "
                  + " ".join(f"{c:>15}" for c in cells))

    if not args.no_llamacpp:
        try:
            import gguf  # noqa: F401
            import llama_cpp
        except ImportError as err:
            print(f"\nllama.cpp: skipped, {err.name} is not installed (pip install llama-cpp-python gguf)")
        else:
            gguf_path = root / f"{path.name}-q4_0.gguf"
            if not gguf_path.is_file():
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "smoe", "convert", str(path), "--to", "gguf", "--out",
                                str(gguf_path), "--quantize", "q4_0"], check=True, env=env)
                print(f"converted to {gguf_path} in {time.perf_counter() - start:.0f} s")
            runs = [run_child(LLAMA_CHILD, {**common, "path": str(gguf_path)}, env) for _ in range(args.repeats)]
            tok_s = [x["steps"] / x["decode_s"] for x in runs]
            peak = [(x["peak"] - x["base"]) / 1e9 for x in runs]
            print(f"\nllama.cpp {llama_cpp.__version__} on the same weights as Q4_0 GGUF "
                  f"({format_size(gguf_path.stat().st_size)}, memory-mapped, pages left to the kernel: the file fits "
                  f"this machine's RAM, so after the warm-up nothing is read from disk): {_range(tok_s, '.2f')} tok/s, "
                  f"peak RSS {_range(peak, '.2f')} GB (mapped file pages included)")
    if not args.keep:
        shutil.rmtree(path)
        for f in root.glob(f"{path.name}-*.gguf"):
            f.unlink()


if __name__ == "__main__":
    main()
