"""Training: configs, data pipeline, loop, optimizer, checkpoints, run directories, and the API behind
``smoe train`` / ``smoe eval``."""

from smoe.errors import TrainingError
from smoe.train.config import DataConfig, TrainConfig
from smoe.train.loop import TrainResult
from smoe.train.run import evaluate_checkpoint, train_model

__all__ = ["DataConfig", "TrainConfig", "TrainResult", "TrainingError", "evaluate_checkpoint", "train_model"]
