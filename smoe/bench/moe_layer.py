"""One MoE layer, smoe vs transformers' MoE block of the same shape and weights, in one run.

Legend: T tokens, D model dim, E routed experts, K top-k, F (n) expert hidden dim.

For each shape x dtype x T x mode (fwd under inference_mode, or fwd+bwd), the contenders are timed in
interleaved rounds (one call of each per round, medians), so load from other tenants hits all alike:
  smoe         MoELayer, backend as given (default auto)
  hf <impl>    transformers' block (Mixtral / Qwen3-MoE / DeepSeek-V3) on each experts_implementation; best = peer
  dense        a dense SwiGLU with the same active FLOPs (hidden K*F, plus the shared experts' width)
Printed: smoe tokens/s, useful GF/s (routed expert FLOPs only: 6*T*K*D*F per forward, x3 for fwd+bwd), the
ratio smoe / best transformers, R_dense = dense time / smoe time, and smoe's activation memory saved for the
backward against the 2TD + 4TKF-element minimum (SonicMoE). The first call checks both sides compute the same
function (max |diff| column). The process keeps freed memory for reuse, as `smoe train` does
(smoe.train.loop.reuse_freed_memory), for every contender: otherwise each call page-faults its large buffers in.

    smoe bench moe-layer [--shapes qwen3,mixtral,deepseek-v3] [--tokens 1,16,256,2048]
        [--dtypes bf16,fp32] [--modes fwd,fwd+bwd] [--backend auto] [--rounds 5] [--threads 2]
    .venv/bin/python benchmarks/moe_layer.py [same options]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from smoe.config import MoEConfig
from smoe.kernels import cpp_build
from smoe.moe import MoELayer
from smoe.nn.mlp import MLP
from smoe.train.loop import reuse_freed_memory

HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
BATCHED_MM_LIMIT = 2**28  # batched_mm copies one weight set per assignment: skip it past this many elements


@dataclass(frozen=True)
class Shape:
    """A production MoE layer scaled down to what a 2-core CPU runs in seconds (ratios kept: E, K, F/D)."""

    name: str
    hf_family: str
    dim: int
    moe: MoEConfig


SHAPES = {
    # Mixtral-8x7B: d 4096, 8 x 14336, top-2 (scaled by 1/8)
    "mixtral": Shape("mixtral", "mixtral", 512, MoEConfig(n_routed_experts=8, top_k=2, expert_dim=1792)),
    # Qwen3-30B-A3B: d 2048, 128 x 768, top-8, normalised top-k (scaled by 1/4)
    "qwen3": Shape("qwen3", "qwen3_moe", 512, MoEConfig(n_routed_experts=128, top_k=8, expert_dim=192)),
    # DeepSeek-V3: d 7168, 256 x 2048 + 1 shared, top-8, sigmoid, 8 groups keep 4, scale 2.5 (d and n scaled)
    "deepseek-v3": Shape("deepseek-v3", "deepseek_v3", 512, MoEConfig(
        n_routed_experts=256, top_k=8, expert_dim=128, score_func="sigmoid", balance="aux_free", n_group=8,
        topk_group=4, routed_scaling_factor=2.5, n_shared_experts=1)),
}


def _hf_block(shape: Shape, impl: str):
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    m, D = shape.moe, shape.dim
    if shape.hf_family == "mixtral":
        config = MixtralConfig(hidden_size=D, intermediate_size=m.expert_dim, num_local_experts=m.n_routed_experts,
                               num_experts_per_tok=m.top_k)
        block_cls = MixtralSparseMoeBlock
    elif shape.hf_family == "qwen3_moe":
        config = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=m.expert_dim, num_experts=m.n_routed_experts,
                                num_experts_per_tok=m.top_k, norm_topk_prob=True)
        block_cls = Qwen3MoeSparseMoeBlock
    else:
        config = DeepseekV3Config(hidden_size=D, moe_intermediate_size=m.expert_dim,
                                  n_routed_experts=m.n_routed_experts, num_experts_per_tok=m.top_k,
                                  n_group=m.n_group, topk_group=m.topk_group, norm_topk_prob=True,
                                  routed_scaling_factor=m.routed_scaling_factor, n_shared_experts=m.n_shared_experts)
        block_cls = DeepseekV3MoE
    config._experts_implementation = impl
    return block_cls(config)


def _copy_weights(ours: MoELayer, hf) -> None:
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.w_gate_up)
        hf.experts.down_proj.copy_(ours.experts.w_down)
        if ours.shared is not None:
            hf.gate.e_score_correction_bias.copy_(ours.router.expert_bias)
            for theirs, mine in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                getattr(hf.shared_experts, theirs).weight.copy_(getattr(ours.shared, mine).weight)


def _step(fn, x, backward: bool, params=()):
    """One call: forward under inference_mode, or forward + backward of a scalar loss from no gradients, as a
    training step after ``zero_grad(set_to_none=True)`` runs it (otherwise each call adds its weight gradients into
    the last call's: a pass over every expert's weights that no training step makes)."""
    if not backward:
        with torch.inference_mode():
            return fn(x)
    for t in (x, *params):
        t.grad = None

    def run():
        y = fn(x)
        y.float().square().mean().backward()
        return y

    return run()


def _saved_bytes(fn, x, params) -> int:
    """Bytes of the non-parameter tensors autograd saves for the backward (each storage once): activation memory."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def bench_point(shape: Shape, T: int, dtype: torch.dtype, backward: bool, backend: str, rounds: int) -> dict:
    m, D = shape.moe, shape.dim
    torch.manual_seed(0)
    ours = MoELayer(D, m, backend=backend).to(dtype)
    dense = MLP(D, m.top_k * m.expert_dim + m.n_shared_experts * m.resolved_shared_expert_dim).to(dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=backward)
    contenders = {"smoe": lambda x: ours(x)[0], "dense": dense}
    params = {"smoe": list(ours.parameters()), "dense": list(dense.parameters())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for impl in HF_IMPLEMENTATIONS:
            if impl == "batched_mm" and T * m.top_k * 3 * D * m.expert_dim > BATCHED_MM_LIMIT:
                continue
            hf = _hf_block(shape, impl).to(dtype)
            _copy_weights(ours, hf)
            contenders[f"hf {impl}"] = lambda x, hf=hf: hf(x.view(1, T, D)).view(T, D)
            params[f"hf {impl}"] = list(hf.parameters())
    with torch.no_grad():
        want = contenders["smoe"](x)
        diff = max((contenders[k](x) - want).abs().max().item() for k in contenders if k.startswith("hf"))
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for k, fn in contenders.items():  # warm-up
        _step(fn, x, backward, params[k])
    for _ in range(rounds):
        for k, fn in contenders.items():
            start = time.perf_counter()
            _step(fn, x, backward, params[k])
            times[k].append(time.perf_counter() - start)
    t = {k: statistics.median(v) for k, v in times.items()}
    hf_best = min((k for k in t if k.startswith("hf")), key=t.get)
    flops = 6 * T * m.top_k * D * m.expert_dim * (3 if backward else 1)
    minimum = (2 * T * D + 4 * T * m.top_k * m.expert_dim) * x.element_size()
    saved = _saved_bytes(contenders["smoe"], x, ours.parameters()) if backward else float("nan")
    return {"tokens_s": T / t["smoe"], "gflops": flops / t["smoe"] / 1e9, "hf_best": hf_best,
            "vs_hf": t[hf_best] / t["smoe"], "r_dense": t["dense"] / t["smoe"], "diff": diff,
            "mem_vs_min": saved / minimum,
            "ms": {k: v * 1e3 for k, v in t.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokens", default="1,16,256,2048")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per point")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads (1 is steadier when other tenants busy the cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"--shapes: unknown {', '.join(sorted(unknown))}; known: {', '.join(SHAPES)}")
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    print(f"MoE layer, smoe backend {args.backend!r} vs transformers' block, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, C++ kernels {cpp_build.instruction_set()}")
    print(f"{'shape':<12} {'dtype':<5} {'mode':<8} {'T':>6} {'tok/s':>9} {'GF/s':>7} {'vs hf best':>18} "
          f"{'R_dense':>8} {'mem/min':>8} {'max|diff|':>9}  ms (smoe | hf eager, grouped_mm, batched_mm | dense)")
    for name in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            for mode in args.modes.split(","):
                for T in (int(t) for t in args.tokens.split(",")):
                    r = bench_point(SHAPES[name], T, dtypes[dtype_name], mode == "fwd+bwd", args.backend, args.rounds)
                    ms = r["ms"]
                    hf_ms = ", ".join(f"{ms[k]:.1f}" if k in ms else "-" for k in
                                      (f"hf {i}" for i in HF_IMPLEMENTATIONS))
                    vs = f"{r['vs_hf']:.2f}x {r['hf_best'][3:]}"
                    print(f"{name:<12} {dtype_name:<5} {mode:<8} {T:>6} {r['tokens_s']:>9.0f} {r['gflops']:>7.1f} "
                          f"{vs:>18} {r['r_dense']:>8.2f} {r['mem_vs_min']:>8.2f} {r['diff']:>9.1e}  "
                          f"{ms['smoe']:.1f} | {hf_ms} | {ms['dense']:.1f}", flush=True)

