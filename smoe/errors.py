"""Errors the command line reports in one line (no torch import, so every command can catch them)."""


class TrainingError(RuntimeError):
    """Training stopped on a fault (e.g. repeated non-finite loss); the last good checkpoint is intact."""
