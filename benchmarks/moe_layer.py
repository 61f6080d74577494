"""One MoE layer, smoe vs transformers' MoE block: the code is smoe/bench/moe_layer.py (so that ``smoe bench
moe-layer`` runs from an installed wheel too); see its --help."""

import contextlib

from smoe.bench.moe_layer import main

if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
