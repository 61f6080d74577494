"""Expert parallelism: measured step time and all-to-all bytes per token at EP = 1, 2, 4 (CPU processes on gloo),
and the analytical all-to-all volume per token per MoE layer of DeepSeek-V3 at EP = 64.

Measured: each EP size runs in its own group of forked processes; every rank trains (forward + backward + AdamW,
gradients synchronised as smoe train does) on its slice of the same global batch. Bytes are counted from the
routing each step actually produced (RouterStats.load): the rows a rank sends to experts on other ranks, times the
row size, for dispatch and again for combine; the backward pass moves the same bytes again in reverse. The
per-expert count exchange (E int64 per rank) is left out.

    .venv/bin/python benchmarks/expert_parallel.py [--preset deepseek-v3-tiny] [--batch-size 8] [--seq-len 128]
        [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from smoe import presets
from smoe.cost import routed_rows_sent
from smoe.models import build_model
from smoe.parallel import apply_expert_parallel, local_rows, max_ranks_per_token
from smoe.parallel.data_parallel import clip_gradients, sync_gradients
from smoe.train.optim import build_optimizer


def _rank(rank: int, ep: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ep)
    mesh = init_device_mesh("cpu", (1, ep), mesh_dim_names=("dp", "ep"))
    config = presets.get(args.preset)
    torch.manual_seed(0)
    model = apply_expert_parallel(build_model(config), mesh)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
    inputs, labels = (local_rows(t, mesh, 1) for t in (ids[:, :-1], ids[:, 1:]))
    per_rank = config.moe.n_routed_experts // ep
    times, sent_rows = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out_ = model(inputs, labels=labels)
        out_.loss.backward()
        sync_gradients(model, mesh)
        clip_gradients(model, mesh, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            local = slice(rank * per_rank, (rank + 1) * per_rank)
            sent_rows.append(sum(int(s.load.sum() - s.load[local].sum()) for s in out_.router_stats.values()))
    rows = torch.tensor(sent_rows, dtype=torch.float64)
    dist.all_reduce(rows)
    if rank == 0:
        n_moe = len(model.moe_layers)
        tokens = args.batch_size * args.seq_len
        row_bytes = config.dim * (2 if args.precision == "bf16" else 4)  # the dtype that travels
        Path(out).write_text(json.dumps({
            "ep": ep, "step_ms": statistics.median(times) * 1e3,
            "bytes_per_token_layer": float(rows.mean()) * row_bytes * 2 / tokens / n_moe,  # dispatch + combine
        }))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ep in args.ep:
            out = os.path.join(tmp, f"ep{ep}.json")
            mp.start_processes(_rank, (ep, _free_port(), args, out), nprocs=ep, start_method="fork")
            results.append(json.loads(Path(out).read_text()))
    return results


def deepseek_v3_volume(ep: int = 64) -> dict:
    """Bytes one token sends off its rank per MoE layer at EP=ep, DeepSeek-V3 shapes (D 7168, top-8 of 256 experts,
    8 groups = nodes, 4 per token), uniform routing: each of the K rows leaves the rank with probability
    (ep - 1) / ep (smoe.cost.routed_rows_sent). fp8 rows carry one fp32 scale per 128 elements (V3's 1x128
    activation tiles)."""
    cfg = presets.get("deepseek-v3")
    D, K = cfg.dim, cfg.moe.top_k
    row = {"bf16": 2 * D, "fp8": D + 4 * (D // 128)}
    remote = routed_rows_sent(cfg, ep)
    return {
        "dim": D, "top_k": K, "ep": ep, "ranks_per_token_max": max_ranks_per_token(cfg.moe, ep),
        "nodes_per_token_max": cfg.moe.topk_group,
        **{f"{kind}_{dtype}": remote * size for kind in ("dispatch", "combine") for dtype, size in row.items()},
        # Node-limited routing with one copy per node over the inter-node fabric (DeepEP) bounds that traffic:
        **{f"internode_dispatch_{dtype}_max": cfg.moe.topk_group * size for dtype, size in row.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="deepseek-v3-tiny")
    parser.add_argument("--ep", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 autocast is ~20x slower than fp32 on CPUs without native bf16 matmuls")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    print(f"{args.preset}, global batch {args.batch_size} x {args.seq_len}, {args.precision}, 1 thread per process")
    print(f"{'EP':>3}  {'step ms':>8}  {'a2a bytes/token/layer (fwd)':>28}")
    for r in measure(args):
        print(f"{r['ep']:>3}  {r['step_ms']:>8.1f}  {r['bytes_per_token_layer']:>28,.0f}")
    v3 = deepseek_v3_volume()
    print(f"\nDeepSeek-V3 at EP={v3['ep']} (analytical, uniform routing, per token per MoE layer, bytes leaving the "
          f"rank; a token reaches at most {v3['ranks_per_token_max']} ranks, {v3['nodes_per_token_max']} nodes):")
    for dtype in ("bf16", "fp8"):
        print(f"  {dtype}: dispatch {v3[f'dispatch_{dtype}']:,.0f}  combine {v3[f'combine_{dtype}']:,.0f}  "
              f"(inter-node dispatch with one copy per node <= {v3[f'internode_dispatch_{dtype}_max']:,.0f})")


if __name__ == "__main__":
    main()
