"""Dense -> MoE upcycling: ``spec`` (what to build, as a config; no torch import), ``partition`` (how a dense FFN's
hidden units are grouped into experts) and ``weights`` (``upcycle``, ``upcycle_checkpoint``: the weights). See
docs/upcycling.md."""
