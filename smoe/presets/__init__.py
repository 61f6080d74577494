"""Presets: plain functions returning a ModelConfig, each citing its source, one file per family.

    get("deepseek-v3")                         # the published architecture
    get("deepseek-v3-tiny", **{"moe.top_k": 4})  # a CPU-sized twin, with dotted-path overrides
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from smoe.config import ModelConfig, override
from smoe.presets import ablation, arctic, dbrx, deepseek, grok, kimi, llama_moe, minimax, mixtral, olmoe, qwen

_REGISTRY: dict[str, Callable[[], ModelConfig]] = {}
for _module in (mixtral, deepseek, qwen, grok, dbrx, arctic, minimax, olmoe, llama_moe, kimi, ablation):
    for _name, _fn in _module.PRESETS.items():
        assert _name not in _REGISTRY, _name
        _REGISTRY[_name] = _fn


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with ``overrides`` (dotted config paths) applied and validated."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(_REGISTRY)}"
        raise ValueError(f"preset: unknown preset {name!r}{hint}")
    config = _REGISTRY[name]()
    return override(config, overrides) if overrides else config.validate()
