"""Training: data pipeline, loop, optimizer, checkpoints, and the API behind ``smoe train`` / ``smoe eval``."""

from smoe.train.loop import TrainConfig, TrainingError, TrainResult
from smoe.train.run import evaluate_checkpoint, train_model

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "evaluate_checkpoint", "train_model"]
