"""Running a model whose routed experts do not fit in memory: they stay in the checkpoint's files and are read on
demand, expert by expert, into a cache of at most ``max_expert_memory`` bytes (docs/offload.md).

    model = smoe.load_pretrained(path, max_expert_memory="4GB")    # everything else loads as usual

- budget.py: the settings (``OffloadConfig``), size strings, and what a budget means for a model (``plan``): no
  torch, so ``smoe inspect`` and ``smoe cost`` use it.
- store.py: where each expert's bytes lie in the files (``Part``, ``ExpertFiles``) and reading them into a slot.
- cache.py: the slots (one preallocated slab shared by every MoE layer), eviction, background reads, statistics.
- experts.py: ``OffloadedExperts``, which takes a MoE layer's experts' place and computes them from the slots.

This package is imported by the loaders (smoe.io.checkpoint, smoe.interop.hf) and imports nothing above smoe.models.
"""
