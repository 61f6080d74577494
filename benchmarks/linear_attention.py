"""Linear attention on this CPU, fp32, in four parts (``--parts``, default all four):

- ``layers``: one linear-attention layer's training step against the softmax attention layer it replaces
  (issue 15), at the hybrid suite's width: forward + backward of a (B, T, 256) batch. Each Gated DeltaNet row is
  timed with and without the decay floor of smoe/nn/linear_attention.py (decays below exp(-60) set to 0, which keeps
  the chunked form's products out of denormal numbers); the layers keep their initial decay rates.
- ``decode``: one decode step of one layer's recurrence at a released model's head shape (default Qwen3-Next's: 32
  value heads, K = V = 128, a 2 MiB fp32 state per sequence): the in-place step (``gated_delta_step_``, what
  generation runs) against the spec's step with its state copied back into the cache (what the layers ran before
  issue 29). A model's layers each hold their own state, so the step cycles over ``--layers`` states (36: Qwen3-
  Next's linear layers, 72 MiB at batch 1, more than this CPU's caches) and so does the peer: copying state-sized
  buffers (``copy_``, a read and a write of each). The step must at least read its state and write it back, the
  same bytes as a copy, so "GB/s" for a step is 2 x state bytes / its time, and "x copy" its fraction of the copy
  bandwidth just measured (its kernels move the state about 6 times: scale, predict, write, read).
- ``kda``: Kimi Delta Attention's chunked recurrence, forward + backward at T 4096 (``--kda-len``) and
  kimi-linear-tiny's heads (4 of 64, chunk 64), beside Gated DeltaNet's at the same shape: time, and peak memory
  of the tensors made (tracked through torch's dispatcher in a separate, untimed pass, since tracking slows ops).
  Run it with ``PYTHONPATH`` at an older tree for the before figures.

- ``documents``: what keeping packed documents apart (``TrainConfig.document_boundaries``, default ``all``) costs a
  training step: forward + backward of whole tiny models (``--presets``) on (4, 256) batches holding a document
  start every 60 tokens, with ``document_starts`` against without.

Contenders are interleaved round by round; each line gives the median over rounds with the range, and ratios are of
medians (with the range of the per-round ratios, where rounds pair up).

    .venv/bin/python benchmarks/linear_attention.py [--parts layers,decode,kda,documents] [--rounds 7] [--threads 1]
        [--batch 8] [--seq-lens 128,512] [--decode-batches 1,8] [--layers 36] [--kda-len 4096]
        [--presets mixtral-tiny,qwen3-next-tiny,kimi-linear-tiny]
"""

from __future__ import annotations

import argparse
import time
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from smoe.config import AttentionConfig
from smoe.nn import (
    Attention,
    GatedDeltaNet,
    KimiDeltaAttention,
    LightningAttention,
    MixerStep,
    RotaryEmbedding,
    linear_attention,
)
from smoe.nn.linear_attention import chunked_gated_delta_rule, gated_delta_rule

DIM, HEADS, HEAD_DIM = 256, 4, 64


def _summary(ms: list[float]) -> str:
    return f"{np.median(ms):>9.3f} {f'{min(ms):.3f}-{max(ms):.3f}':>17}"


def _ratio(a: list[float], b: list[float]) -> str:
    per_round = [x / y for x, y in zip(a, b, strict=True)]
    return f"{np.median(a) / np.median(b):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"


# --- layers: one layer's training step ---------------------------------------------------------------------------


def _layer_contenders(T: int) -> dict:
    torch.manual_seed(0)
    attention = Attention(DIM, AttentionConfig(n_heads=HEADS, n_kv_heads=HEADS), 1e-6)
    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0)(torch.arange(T))
    gdn = GatedDeltaNet(DIM, HEADS // 2, HEADS, HEAD_DIM, HEAD_DIM, chunk=64)
    kda = KimiDeltaAttention(DIM, HEADS, HEAD_DIM, chunk=64)
    lightning = LightningAttention(DIM, HEADS, HEAD_DIM, layer=0, n_layers=8, chunk=64)
    return {
        "attention (SDPA)": (lambda x, step: attention(x, MixerStep(cos=cos, sin=sin)), None),
        "gated delta": (gdn, linear_attention._DECAY_FLOOR),
        "gated delta, no floor": (gdn, float("-inf")),
        "kimi delta": (kda, linear_attention._DECAY_FLOOR),
        "lightning": (lightning, linear_attention._DECAY_FLOOR),
    }


def _layer_step(layer, x: torch.Tensor, floor: float | None) -> float:
    saved = linear_attention._DECAY_FLOOR
    if floor is not None:
        linear_attention._DECAY_FLOOR = floor
    try:
        leaf = x.clone().requires_grad_()
        start = time.perf_counter()
        layer(leaf, MixerStep()).square().sum().backward()
        return time.perf_counter() - start
    finally:
        linear_attention._DECAY_FLOOR = saved


def layers(args) -> None:
    print(f"\n## one layer's training step: forward + backward, dim {DIM}, {HEADS} heads of {HEAD_DIM}, batch "
          f"{args.batch}; ms, median over {args.rounds} rounds (range)")
    for T in (int(t) for t in args.seq_lens.split(",")):
        x = torch.randn(args.batch, T, DIM)
        contenders = _layer_contenders(T)
        for layer, floor in contenders.values():
            _layer_step(layer, x, floor)  # warm-up
        times = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, (layer, floor) in contenders.items():
                times[name].append(_layer_step(layer, x, floor) * 1e3)
        print(f"\nT = {T}\n{'layer':<24} {'ms':>9} {'range':>17}  x attention (range)")
        for name, ms in times.items():
            print(f"{name:<24} {_summary(ms)}  {_ratio(ms, times['attention (SDPA)'])}")


# --- decode: one layer's step against its state's memory traffic ---------------------------------------------------


def _spec_step(q, k, v, g, beta, state):
    """The layers' decode step before issue 29: the spec at T = 1, its new state copied into the cache."""
    out, final = gated_delta_rule(q, k, v, g, beta, state)
    state.copy_(final)
    return out


def _per_layer(step, calls: list[tuple]) -> float:
    """Seconds per call of ``step`` over ``calls``, one per layer (each layer's state cold in cache, as in a model)."""
    start = time.perf_counter()
    for call in calls:
        step(*call)
    return (time.perf_counter() - start) / len(calls)


def decode(args) -> None:
    from smoe.nn.linear_attention import gated_delta_step_

    H, K, V, L = args.decode_heads, args.decode_dim, args.decode_dim, args.layers
    print(f"\n## one decode step of one layer's recurrence: {H} heads, K = V = {K}, cycling over {L} layers' "
          f"states; us per layer, median over {args.rounds} rounds (range)")
    for B in (int(b) for b in args.decode_batches.split(",")):
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(B, 1, H, K, generator=g), F.normalize(torch.randn(B, 1, H, K, generator=g), dim=-1)
        v = torch.randn(B, 1, H, V, generator=g)
        log_decay, beta = -torch.rand(B, 1, H, generator=g), torch.rand(B, 1, H, generator=g)
        states = [torch.randn(B, H, K, V, generator=g) * 0.01 for _ in range(L)]
        sources = [torch.randn(B, H, K, V, generator=g) for _ in range(L)]
        state_bytes = states[0].nbytes
        steps = [(q, k, v, log_decay, beta, state) for state in states]
        contenders = {  # name: (what is timed, its calls: one per layer)
            "in-place step": (gated_delta_step_, steps),
            "spec step + copy (before)": (_spec_step, steps),
            "copy_ (the peer)": (torch.Tensor.copy_, list(zip(states, sources, strict=True))),
        }
        with torch.inference_mode():
            for fn, calls in contenders.values():
                _per_layer(fn, calls)  # warm-up
            times = {name: [] for name in contenders}
            for _ in range(args.rounds):
                for name, (fn, calls) in contenders.items():
                    times[name].append(_per_layer(fn, calls) * 1e6)
        copy_us = times["copy_ (the peer)"]
        print(f"\nbatch {B}: state {state_bytes / 2**20:.1f} MiB per layer, {L * state_bytes / 2**20:.0f} MiB in all")
        print(f"{'':<26} {'us':>9} {'range':>17} {'GB/s':>7}  x copy (range)      x in-place (range)")
        for name, us in times.items():
            gbps = 2 * state_bytes / (np.median(us) * 1e-6) / 1e9
            print(f"{name:<26} {_summary(us)} {gbps:>7.1f}  {_ratio(copy_us, us):<19} "
                  f"{_ratio(us, times['in-place step'])}")


# --- kda: the chunked recurrence at length, time and memory ------------------------------------------------------


class _PeakMemory(TorchDispatchMode):
    """The peak bytes of the tensor storages made while active and still alive (inputs and parameters excluded)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def _recurrence_step(per_channel: bool, T: int, H: int, K: int, chunk: int) -> float:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, T, H, K, generator=g), F.normalize(torch.randn(1, T, H, K, generator=g), dim=-1)
    v, beta = torch.randn(1, T, H, K, generator=g), torch.rand(1, T, H, generator=g)
    log_decay = -0.1 * torch.rand((1, T, H, K) if per_channel else (1, T, H), generator=g)
    leaves = [x.requires_grad_() for x in (q, k, v, log_decay, beta)]
    start = time.perf_counter()
    out, state = chunked_gated_delta_rule(*leaves, chunk=chunk)
    (out.square().sum() + state.square().sum()).backward()
    return time.perf_counter() - start


def kda(args) -> None:
    T, H, K, C = args.kda_len, 4, 64, 64
    contenders = {"gated delta (per head)": False, "kimi delta (per channel)": True}
    print(f"\n## the chunked recurrence, forward + backward: batch 1, T {T}, {H} heads, K = V = {K}, chunk {C}; "
          f"ms, median over {args.rounds} rounds (range); peak memory of the tensors made")
    for per_channel in contenders.values():
        _recurrence_step(per_channel, T, H, K, C)  # warm-up
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, per_channel in contenders.items():
            times[name].append(_recurrence_step(per_channel, T, H, K, C) * 1e3)
    peaks = {}
    for name, per_channel in contenders.items():
        with _PeakMemory() as memory:
            _recurrence_step(per_channel, T, H, K, C)
        peaks[name] = memory.peak / 2**30
    print(f"{'':<26} {'ms':>9} {'range':>17}  {'x gated delta (range)':<22} {'peak GiB':>8}")
    for name, ms in times.items():
        print(f"{name:<26} {_summary(ms)}  {_ratio(ms, times['gated delta (per head)']):<22} {peaks[name]:>8.3f}")


# --- documents: the cost of keeping packed documents apart -----------------------------------------------------


def _model_step(model, inputs: torch.Tensor, labels: torch.Tensor, kwargs: dict) -> float:
    start = time.perf_counter()
    model(inputs, labels, **kwargs).loss.backward()
    return time.perf_counter() - start


def documents(args) -> None:
    from smoe import presets
    from smoe.models import build_model, document_starts

    print(f"\n## a training step of a whole model, forward + backward, batch 4 x 256 with a document start every 60 "
          f"tokens; ms, median over {args.rounds} rounds (range)")
    print(f"{'preset':<18} {'without':>9} {'with document_starts':>21}  with / without (range)")
    for name in args.presets.split(","):
        torch.manual_seed(0)
        model = build_model(presets.get(name))
        ids = torch.randint(1, model.config.vocab_size, (4, 257))
        ids[:, 59::60] = 0  # token 0 as the end of a document
        inputs, labels = ids[:, :-1], ids[:, 1:]
        contenders = {"without": {}, "with": {"document_starts": document_starts(inputs, 0)}}
        for kwargs in contenders.values():
            _model_step(model, inputs, labels, kwargs)  # warm-up
        times = {label: [] for label in contenders}
        for _ in range(args.rounds):
            for label, kwargs in contenders.items():
                times[label].append(_model_step(model, inputs, labels, kwargs) * 1e3)
        print(f"{name:<18} {np.median(times['without']):>9.1f} {np.median(times['with']):>21.1f}  "
              f"{_ratio(times['with'], times['without'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="layers,decode,kda,documents")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=8, help="layers: sequences per step")
    parser.add_argument("--seq-lens", default="128,512", help="layers: sequence lengths")
    parser.add_argument("--decode-batches", default="1,8", help="decode: sequences per step")
    parser.add_argument("--decode-heads", type=int, default=32, help="decode: value heads (Qwen3-Next's 32)")
    parser.add_argument("--decode-dim", type=int, default=128, help="decode: K = V (Qwen3-Next's 128)")
    parser.add_argument("--layers", type=int, default=36, help="decode: states cycled over (Qwen3-Next's 36)")
    parser.add_argument("--kda-len", type=int, default=4096, help="kda: sequence length")
    parser.add_argument("--presets", default="mixtral-tiny,qwen3-next-tiny,kimi-linear-tiny", help="documents: models")
    args = parser.parse_args()
    parts = args.parts.split(",")
    known = {"layers": layers, "decode": decode, "kda": kda, "documents": documents}
    unknown = sorted(set(parts) - known.keys())
    if unknown:
        parser.error(f"--parts: unknown part {unknown[0]!r}; choose from {', '.join(known)}")
    torch.set_num_threads(args.threads)
    print(f"linear attention, fp32, {args.threads} threads, torch {torch.__version__}")
    for part in parts:
        known[part](args)


if __name__ == "__main__":
    main()
