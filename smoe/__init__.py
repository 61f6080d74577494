"""smoe: define, account for, train, compare and serve sparse Mixture-of-Experts language models."""

from smoe.config import AttentionConfig, LayoutConfig, MLAConfig, ModelConfig, MoEConfig, RopeScaling

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "LayoutConfig",
    "MLAConfig",
    "ModelConfig",
    "MoEConfig",
    "RopeScaling",
    "build_model",
    "generate",
    "load_pretrained",
    "quantize",
    "save_pretrained",
    "upcycle",
]


def __getattr__(name: str):
    # Torch-dependent entry points load lazily, so config-only commands (inspect, presets) start fast.
    if name in ("build_model", "quantize"):
        from smoe import models

        return getattr(models, name)
    if name == "generate":
        # The function lives in smoe.generation: a submodule named smoe.generate would replace this attribute
        # with the module as soon as anything imported it.
        from smoe.generation import generate

        return generate
    if name in ("load_pretrained", "save_pretrained"):
        from smoe.interop import hf

        return getattr(hf, name)
    if name == "upcycle":  # in smoe.upcycling.weights, for the reason generate lives in smoe.generation
        from smoe.upcycling.weights import upcycle

        return upcycle
    raise AttributeError(f"module 'smoe' has no attribute {name!r}")
