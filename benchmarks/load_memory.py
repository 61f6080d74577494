"""Peak memory of loading a ~1 GB Hugging Face checkpoint: smoe.load_pretrained vs transformers' from_pretrained.

A Mixtral-shaped bf16 model is written once as a Hugging Face directory (through smoe's exporter); each loader then
runs in a fresh process that reads its resident set after its imports (the baseline) and its peak after loading.
The ratio (peak - baseline) / weight bytes is the loader's memory overhead: 1.0 means the weights alone.

    .venv/bin/python benchmarks/load_memory.py [--layers 6] [--dir /tmp/smoe-load-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, warnings
import torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
loader, path = sys.argv[1], sys.argv[2]
if loader == "smoe":
    from smoe import load_pretrained
    load = lambda: load_pretrained(path)
else:
    import transformers
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
base = rss()
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"base": base, "peak": peak, "seconds": seconds, "weight_bytes": n_bytes}))
"""


def write_checkpoint(path: Path, layers: int) -> int:
    import torch

    from smoe import presets, save_pretrained
    from smoe.models import build_model

    config = presets.get("mixtral-tiny", **{"vocab_size": 32000, "dim": 1024, "n_layers": layers,
                                            "attention.n_heads": 16, "attention.n_kv_heads": 4,
                                            "moe.expert_dim": 2816, "ffn_dim": 2816})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, path, model_type="mixtral")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(loader: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, loader, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="MoE layers (6: about 1.0 GB of bf16 weights)")
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per loader, alternating; the best is kept")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="smoe-load-bench-"))
    path = root / "hf"
    shutil.rmtree(path, ignore_errors=True)
    weight_bytes = write_checkpoint(path, args.layers)
    print(f"checkpoint: {path} ({weight_bytes / 2**30:.2f} GiB of bf16 weights)")
    results: dict[str, list[dict]] = {"smoe": [], "transformers": []}
    for _ in range(args.repeats):
        for loader in results:
            results[loader].append(measure(loader, path))
    print(f"{'loader':<14} {'baseline':>9} {'peak':>9} {'peak - baseline':>16} {'/ weights':>10} {'seconds':>8}")
    for loader, runs in results.items():
        r = min(runs, key=lambda r: r["peak"] - r["base"])
        extra = r["peak"] - r["base"]
        print(f"{loader:<14} {r['base'] / 2**20:>7.0f}Mi {r['peak'] / 2**20:>7.0f}Mi {extra / 2**20:>14.0f}Mi "
              f"{extra / weight_bytes:>9.2f}x {min(x['seconds'] for x in runs):>8.2f}")
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
