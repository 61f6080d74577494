"""Autoregressive generation: a continuous-batching engine over a static cache (``engine``), greedy or sampled tokens
(``sampling``), and the calls users make, with stop tokens and streaming (``streaming``: token ids per step; text
deltas for a terminal).

    new_BN = smoe.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16)            # greedy
    for ids_B in generate_stream(model, prompts, temperature=0.8, top_p=0.9, seed=0): ...

``generate`` and ``smoe serve`` both run the ``Engine``; offline ``generate`` gives up the engine's fixed-shape
expert tiles for speed unless asked for ``decode_rows``. Every name is importable from here.
"""

from smoe.generation.engine import PREFILL_CHUNK, SLOT_BLOCK, Engine, Request, TokenLogprob
from smoe.generation.sampling import GREEDY_BELOW, check_sampling, sample
from smoe.generation.streaming import TextStream, default_stop_tokens, generate, generate_stream, pad_left

__all__ = [
    "GREEDY_BELOW", "PREFILL_CHUNK", "SLOT_BLOCK", "Engine", "Request", "TextStream", "TokenLogprob", "check_sampling",
    "default_stop_tokens", "generate", "generate_stream", "pad_left", "sample",
]
