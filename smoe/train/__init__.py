"""Training: configs, data pipeline, loop, optimizer, checkpoints, run directories, and the API behind
``smoe train`` / ``smoe eval``."""

from smoe.errors import TrainingError
from smoe.train.config import DataConfig, TrainConfig

__all__ = ["DataConfig", "TrainConfig", "TrainResult", "TrainingError", "evaluate_checkpoint", "train_model"]


def __getattr__(name: str):
    # The torch-dependent entry points load lazily, so that the command line builds its parser from the configs
    # without importing torch.
    if name == "TrainResult":
        from smoe.train.loop import TrainResult

        return TrainResult
    if name in ("evaluate_checkpoint", "train_model"):
        from smoe.train import run

        return getattr(run, name)
    raise AttributeError(f"module 'smoe.train' has no attribute {name!r}")
