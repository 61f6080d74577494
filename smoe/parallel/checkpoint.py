"""Former home of ``consolidate`` and ``sharded_checkpoint``, kept so that existing imports work: converting a
checkpoint between its two layouts is the checkpoint format's business, in smoe.io.checkpoint."""

from smoe.io.checkpoint import consolidate, sharded_checkpoint  # noqa: F401 (re-exported)
