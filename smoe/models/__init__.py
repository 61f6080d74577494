"""Models built from a ModelConfig."""

from smoe.models.transformer import IGNORE_INDEX, ModelOutput, Transformer, build_model

__all__ = ["IGNORE_INDEX", "ModelOutput", "Transformer", "build_model"]
