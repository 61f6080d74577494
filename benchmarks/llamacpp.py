"""Decode against llama.cpp, the external anchor of issue 13: the same Mixtral-like weights (benchmarks/decode.py's
"mixtral" model) in smoe and in llama.cpp through llama-cpp-python, batch 1, greedy, the same thread count, at
matching bits: smoe fp32 / int8 / int4 against GGUF F32 / Q8_0 / Q4_0.

Optional: it prints a line and exits when ``llama_cpp`` or ``gguf`` is not importable
(``pip install llama-cpp-python gguf``; llama-cpp-python builds llama.cpp from source, about 8 minutes on 2 cores).

The GGUF file is written by ``smoe convert --to gguf``'s writer (smoe.interop.gguf), as llama.cpp's converter
writes Mixtral: the ``llama`` architecture with experts, q and k rows permuted from the rotate-half layout to
llama.cpp's adjacent rotary pairs, each layer's experts stacked into one (E, out, in) tensor per projection, and a
placeholder vocabulary (token ids only are fed). What stays in full precision follows each side's own quantiser:
llama.cpp keeps norms and the router (``ffn_gate_inp``) in F32 and quantises the embedding and the head; we keep the
embedding and quantise the head. Before timing, the F32 file's next-token logits are compared with ours (max
|diff|), which checks the conversion.

Timing: decode time is t(N new tokens) - t(1 new token) with the prompt evaluated in both, contenders interleaved
round by round (medians), as in benchmarks/decode.py. Each side's loop is Python around one forward per token
(smoe.generate; llama-cpp-python's ``eval`` and an argmax over its logits). ``--compile`` decodes ours with
``generate(compile=True)``, each step one compiled graph as llama.cpp's is (compiled in the warm-up, untimed).

    .venv/bin/python benchmarks/llamacpp.py [--quantize int8,int4] [--rounds 5] [--new-tokens 64] [--threads 2]
        [--compile]
"""

from __future__ import annotations

import argparse
import copy
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from decode import MODELS

import smoe
from smoe import presets
from smoe.interop.gguf import write_gguf
from smoe.kernels import cpp_build
from smoe.models import Transformer

# our scheme -> the GGUF type at matching bits (bits per weight including scales: int8 8.0 + a scale per row,
# Q8_0 8.5; int4 4.0 + an fp32 scale and offset per 64, i.e. 5.0, Q4_0 4.5)
GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}


def write(model: Transformer, path: Path, scheme: str) -> None:
    """``model`` (full precision) as llama.cpp's GGUF of the matching type, through smoe convert's writer."""
    write_gguf(model, path, model_type="mixtral", quantize=None if scheme == "fp32" else GGUF_TYPES[scheme].lower())


class LlamaCpp:
    """Greedy decoding of token ids with llama-cpp-python."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_ctx,
                         verbose=False)

    def _last_logits(self) -> np.ndarray:
        """The logits of the last token evaluated (without ``logits_all``, llama-cpp-python keeps no copy)."""
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def next_logits(self, prompt: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(prompt)
        return self._last_logits().copy()

    def generate(self, prompt: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        out = []
        for _ in range(n):
            token = int(np.argmax(self._last_logits()))
            out.append(token)
            if len(out) < n:
                self.llm.eval([token])
        return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", default="int8,int4", help="schemes besides fp32, e.g. int8,int4")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (medians)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="decode ours with generate(compile=True)")
    args = parser.parse_args()
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as e:
        print(f"skipped: {e.name} is not installed (pip install llama-cpp-python gguf)")
        return
    torch.set_num_threads(args.threads)
    preset, overrides, _ = MODELS["mixtral"]
    torch.manual_seed(0)
    ours = Transformer(presets.get(preset, **overrides)).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"greedy decode tokens/s at batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} "
          f"threads{', smoe compiled' if args.compile else ''}; torch {torch.__version__}, C++ kernels "
          f"{cpp_build.instruction_set()}, llama-cpp-python "
          f"{llama_cpp.__version__}; mixtral-like, "
          f"{n_params / 1e6:.0f}M parameters")
    prompt = torch.randint(3, ours.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    ids = prompt[0].tolist()
    schemes = ["fp32", *[s for s in args.quantize.split(",") if s]]
    runners, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in schemes:
            path = Path(tmp) / f"{scheme}.gguf"
            write(ours, path, scheme)
            peer = LlamaCpp(path, args.prompt_len + args.new_tokens, args.threads)
            model = ours if scheme == "fp32" else smoe.quantize(copy.deepcopy(ours), scheme)
            if scheme == "fp32":
                with torch.inference_mode():
                    logits = model(prompt).logits[0, -1].numpy()
                diff = np.abs(peer.next_logits(ids) - logits).max()
                print(f"conversion check: F32 GGUF vs smoe fp32 next-token logits, max |diff| {diff:.2e} "
                      f"(logits up to {np.abs(logits).max():.2f})")
            runners[f"smoe {scheme}"] = lambda n, m=model: smoe.generate(m, prompt, max_new_tokens=n,
                                                                         compile=args.compile)[0].tolist()
            runners[f"llama.cpp {GGUF_TYPES[scheme]}"] = lambda n, p=peer: p.generate(ids, n)
        times = {k: ([], []) for k in runners}
        with torch.inference_mode():
            for key, run in runners.items():
                outputs[key] = run(args.new_tokens)  # warm-up, and the tokens to compare
            for _ in range(args.rounds):
                for key, run in runners.items():
                    times[key][0].append(_timed(functools.partial(run, 1)))
                    times[key][1].append(_timed(functools.partial(run, args.new_tokens)))
    tok_s = {k: (args.new_tokens - 1) / (np.median(full) - np.median(first)) for k, (first, full) in times.items()}
    spread = {k: (np.max(full) - np.min(full)) / np.median(full) for k, (_, full) in times.items()}
    print(f"{'smoe':>10} {'tok/s':>8} {'llama.cpp':>10} {'tok/s':>8} {'smoe/llama.cpp':>14} {'same tokens':>11} "
          f"{'round spread':>12}")
    for scheme in schemes:
        ours_key, peer_key = f"smoe {scheme}", f"llama.cpp {GGUF_TYPES[scheme]}"
        same = np.mean([a == b for a, b in zip(outputs[ours_key], outputs[peer_key], strict=True)])
        print(f"{scheme:>10} {tok_s[ours_key]:>8.1f} {GGUF_TYPES[scheme]:>10} {tok_s[peer_key]:>8.1f} "
              f"{tok_s[ours_key] / tok_s[peer_key]:>13.2f}x {same:>11.0%} "
              f"{max(spread[ours_key], spread[peer_key]):>11.0%}", flush=True)


if __name__ == "__main__":
    main()
