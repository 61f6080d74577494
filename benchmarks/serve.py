"""Serving: throughput, time to first token (TTFT) and inter-token latency (ITL, p50/p99) of ``smoe serve`` at 1, 4
and 16 concurrent clients, against ``smoe.generate`` offline on the same prompts (a batch of as many prompts as
clients, with the server's quantisation and compilation) and against transformers' own server (``transformers
serve``, with and without its continuous batching) when the installed transformers has one. Then the issue 28
targets' ratios, per round and as their range over ``--rounds`` rounds (every server stays up; each round measures
each contender in turn, so a disturbance of the shared machine shows as spread).

The model is a small Mixtral-like one built by transformers from ``config_to_hf`` (random weights; the
end-of-sequence token's logit is zeroed, so greedy requests run their full length) with a byte-level BPE tokenizer
trained on Python's standard library; both servers load the same directory. Each client sends ``--requests``
streamed completions one after another (temperature 0, ``--new-tokens`` each, prompts of about
``--prompt-tokens``). TTFT: from sending to the first text; ITL: between consecutive text events (a token whose
bytes end inside a character arrives with the next, which shows as one longer gap); throughput: tokens over the
wall time of the whole round. Offline, TTFT is the batch's prefill and ITL the decode step.

    .venv/bin/python benchmarks/serve.py [--clients 1,4,16] [--requests 2] [--new-tokens 64] [--threads 1]
        [--serve-flags "--quantize int8 --compile --dependent-rows"] [--also "FLAGS" ...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import torch

import smoe
from smoe import presets
from smoe.generation import generate_stream
from smoe.interop.hf import load_pretrained
from smoe.interop.hf_config import config_to_hf
from smoe.io.tokenizer import EOS, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096
MODEL = ("mixtral-tiny", {"vocab_size": VOCAB, "dim": 384, "n_layers": 4, "moe.expert_dim": 768,
                          "attention.n_heads": 6, "attention.n_kv_heads": 2, "max_seq_len": 1024}, "mixtral")


def build_model_dir(out: Path) -> Path:
    import transformers

    from smoe.train.data.tokenizer import train_tokenizer

    texts = [p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:60]]
    tokenizer = train_tokenizer(texts, vocab_size=VOCAB)
    preset, overrides, model_type = MODEL
    hf_dict = config_to_hf(presets.get(preset, **overrides), model_type)
    hf_dict.pop("model_type")
    eos = tokenizer.token_to_id(EOS)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(model_type, **{**hf_dict, "bos_token_id": None,
                                                                  "eos_token_id": eos, "pad_token_id": eos})
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # its logit is 0 while the other 4095 are random: greedy decoding never stops early
            model.lm_head.weight[eos] = 0
        model.save_pretrained(out)
    (out / "tokenizer.json").write_text(tokenizer.to_str())
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "eos_token": EOS}))
    return out


def make_prompts(directory: Path, n: int, tokens: int) -> list[str]:
    tokenizer = load_tokenizer(directory)
    ids = tokenizer.encode(Path(argparse.__file__).read_text()).ids
    return [tokenizer.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, argv: list[str], port: int, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise RuntimeError(f"{argv[:3]} did not start: {self.proc.stderr.read()[-2000:] if self.proc.poll() else ''}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_clients(url: str, model: str, prompts: list[str], clients: int, requests: int, new_tokens: int) -> dict:
    """``clients`` threads, each streaming ``requests`` completions in turn; the latencies and the throughput."""
    ttft, itl, tokens = [], [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                body = {"model": model, "prompt": prompts[(c * requests + r) % len(prompts)], "max_tokens": new_tokens,
                        "temperature": 0, "stream": True}
                start, arrivals = time.perf_counter(), []
                with http.stream("POST", url + "/v1/completions", json=body) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text"):
                            arrivals.append(time.perf_counter())
                with lock:
                    ttft.append(arrivals[0] - start)
                    itl.extend(np.diff(arrivals).tolist())
                    tokens.append(new_tokens)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(ttft, itl, sum(tokens) / (time.perf_counter() - start))


def offline_model(directory: Path, quantize: str | None):
    model = load_pretrained(directory)
    return smoe.quantize(model, quantize) if quantize else model


def run_offline(model, tokenizer, prompts: list[str], clients: int, new_tokens: int, compile: bool) -> dict:
    """smoe.generate on a batch of ``clients`` prompts: TTFT is the prefill, ITL each decode step."""
    batch = [tokenizer.encode(p).ids for p in prompts[:clients]]
    list(generate_stream(model, batch, max_new_tokens=new_tokens, compile=compile))  # warm-up (and compile)
    start = time.perf_counter()
    arrivals = [time.perf_counter() for _ in generate_stream(model, batch, max_new_tokens=new_tokens,
                                                             compile=compile)]
    total = time.perf_counter() - start
    return summary([arrivals[0] - start], np.diff(arrivals).tolist(), clients * new_tokens / total)


def summary(ttft: list[float], itl: list[float], tok_s: float) -> dict:
    def ms(values, q):
        return 1e3 * float(np.percentile(values, q)) if values else float("nan")

    return {"tok/s": tok_s, "TTFT p50": ms(ttft, 50), "TTFT p99": ms(ttft, 99), "ITL p50": ms(itl, 50),
            "ITL p99": ms(itl, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every contender")
    parser.add_argument("--max-batch", type=int, default=16, help="smoe serve --max-batch")
    parser.add_argument("--serve-flags", default="--quantize int8 --compile --dependent-rows",
                        help="more flags of the smoe serve measured against the targets; offline generate gets "
                             "the same --quantize and --compile")
    parser.add_argument("--also", action="append", default=[],
                        help="also measure a smoe serve with these flags (\"\" for the defaults); repeatable")
    parser.add_argument("--rounds", type=int, default=1, help="measurements of every contender, in turn")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers serve")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # offline: a graph per batch size
    counts = [int(c) for c in args.clients.split(",")]
    serve_flags = shlex.split(args.serve_flags)
    quantize = serve_flags[serve_flags.index("--quantize") + 1] if "--quantize" in serve_flags else None
    compile = "--compile" in serve_flags
    with tempfile.TemporaryDirectory() as tmp:
        directory = build_model_dir(Path(tmp) / "model")
        prompts = make_prompts(directory, max(counts) * args.requests, args.prompt_tokens)
        n_params = sum(p.numel() for p in load_pretrained(directory).parameters())
        print(f"{n_params / 1e6:.1f}M-parameter Mixtral-like model, prompts of ~{args.prompt_tokens} tokens, "
              f"{args.new_tokens} new tokens, {args.requests} requests per client, {args.threads} thread(s), "
              f"torch {torch.__version__}, {args.rounds} round(s)")
        smoe_serve = [sys.executable, "-m", "smoe", "serve", str(directory), "--max-batch", str(args.max_batch),
                      "--max-seq-len", "512"]
        name = "smoe serve " + args.serve_flags
        contenders = {name: smoe_serve + serve_flags}
        for flags in args.also:
            contenders["smoe serve " + (flags or "(defaults)")] = smoe_serve + shlex.split(flags)
        if not args.no_transformers and _transformers_serve():
            for label, flags in (("transformers serve", []), (TRANSFORMERS_CB, ["--continuous-batching"])):
                contenders[label] = [str(Path(sys.executable).parent / "transformers"), "serve", str(directory),
                                     "--device", "cpu", *flags]
        tokenizer = load_tokenizer(directory)
        model = offline_model(directory, quantize)
        ids = list(generate_stream(model, [tokenizer.encode(prompts[0]).ids], max_new_tokens=args.new_tokens))
        reference = tokenizer.decode([int(t) for t in ids])
        servers = {}
        try:
            for label, argv in contenders.items():
                port = free_port()
                try:
                    servers[label] = Server([*argv, "--port", str(port)], port, args.threads)
                except RuntimeError as err:
                    print(f"{label}: skipped ({str(err)[:300]})")
                    continue
                body = {"model": str(directory), "prompt": prompts[0], "max_tokens": args.new_tokens,
                        "temperature": 0}
                text = httpx.post(servers[label].url + "/v1/completions", json=body, timeout=600).json()
                same = text["choices"][0]["text"] == reference
                print(f"{label}: the greedy text of prompt 0 is {'the same as' if same else 'NOT'} smoe.generate's "
                      f"(on the {quantize or 'fp32'} weights)")
            rounds = []
            for _ in range(args.rounds):
                rows = [("smoe.generate offline", c, run_offline(model, tokenizer, prompts, c, args.new_tokens,
                                                                 compile)) for c in counts]
                for label, server in servers.items():
                    rows += [(label, c, run_clients(server.url, str(directory), prompts, c, args.requests,
                                                    args.new_tokens)) for c in counts]
                rounds.append(rows)
        finally:
            for server in servers.values():
                server.stop()
    keys = ["tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"]
    for r, rows in enumerate(rounds):
        print(f"\nround {r + 1}\n| contender | clients | tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | "
              f"ITL p99 (ms) |")
        print("|---|---|" + "---|" * len(keys))
        for label, clients, result in rows:
            print(f"| {label} | {clients} | " + " | ".join(f"{result[k]:,.1f}" for k in keys) + " |")
    print_targets(rounds, name, counts)


TRANSFORMERS_CB = "transformers serve --continuous-batching"


def print_targets(rounds: list, name: str, counts: list[int]) -> None:
    """Issue 28's targets for ``name``, per round, then their range over the rounds."""
    targets = []  # (label, rule, value per round)
    top = max(counts)

    def at(rows, label, clients):
        return next((r for n, c, r in rows if n == label and c == clients), None)

    def add(label, rule, value):
        found = next((t for t in targets if t[0] == label), None)
        if found is None:
            targets.append((label, rule, [value]))
        else:
            found[2].append(value)

    for rows in rounds:
        if at(rows, name, top) is None:
            continue
        peer = at(rows, TRANSFORMERS_CB, top)
        if peer is not None:
            add(f"tok/s / transformers' continuous batching, {top} clients", ">= 2",
                at(rows, name, top)["tok/s"] / peer["tok/s"])
        add(f"ITL p99 / p50, {top} clients", "<= 2", at(rows, name, top)["ITL p99"] / at(rows, name, top)["ITL p50"])
        for c in counts:
            add(f"tok/s / offline smoe.generate, {c} client(s)", ">= 0.9",
                at(rows, name, c)["tok/s"] / at(rows, "smoe.generate offline", c)["tok/s"])
        if 1 in counts and top > 1:
            add(f"tok/s, {top} clients / 1 client", ">= 4", at(rows, name, top)["tok/s"] / at(rows, name, 1)["tok/s"])
        add(f"TTFT p50 at {top} clients (ms)", "<= 230", at(rows, name, top)["TTFT p50"])
    print(f"\nTargets of {name} (each round; range):")
    for label, rule, values in targets:
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"- {label}: {shown} (range {min(values):.2f}-{max(values):.2f}; target {rule})")


def _transformers_serve() -> bool:
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:
        return False
    return is_serve_available()


if __name__ == "__main__":
    main()
