"""Models built from a ModelConfig."""

from smoe.models.transformer import (
    IGNORE_INDEX,
    DecodeCache,
    ModelOutput,
    Transformer,
    build_model,
    document_starts,
    empty_model,
    quantize,
)

__all__ = [
    "IGNORE_INDEX", "DecodeCache", "ModelOutput", "Transformer", "build_model", "document_starts", "empty_model",
    "quantize",
]
