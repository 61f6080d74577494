"""Where a run's metrics go: metrics.jsonl (always, on the main process), TensorBoard (when installed) and a
progress bar (on a terminal)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator


class MetricsSinks:
    """``write(row)`` appends one JSON line (flushed, so a kill loses at most the line being written) and logs the
    row's numbers to TensorBoard; ``progress(...)`` moves the bar. Use as a context manager."""

    def __init__(self, metrics_file: Path, tensorboard_dir: Path | None, progress: bool | None, total: int,
                 start: int):
        self._metrics_file, self._tensorboard_dir = metrics_file, tensorboard_dir
        self._progress_args = (progress, total, start)
        self._stack = contextlib.ExitStack()
        self._jsonl = self._tensorboard = None
        self.progress = lambda step, loss, tokens_per_s: None

    def __enter__(self) -> "MetricsSinks":
        self._jsonl = self._stack.enter_context(open(self._metrics_file, "a", encoding="utf-8"))
        self._tensorboard = _tensorboard(self._tensorboard_dir) if self._tensorboard_dir is not None else None
        if self._tensorboard is not None:
            self._stack.callback(self._tensorboard.close)
        self.progress = self._stack.enter_context(_progress_bar(*self._progress_args))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def write(self, row: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in _flat_scalars(row):
                self._tensorboard.add_scalar(key, value, row["step"])


class NoSinks:
    """What the other ranks of a distributed run write to: nothing."""

    def __enter__(self) -> "NoSinks":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, row: dict[str, Any]) -> None:
        pass

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        pass


def _flat_scalars(row: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in row.items():
        if isinstance(value, dict):
            yield from _flat_scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield f"{prefix}{key}", value


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))


@contextlib.contextmanager
def _progress_bar(enabled: bool | None, total: int, start: int):
    """A rich progress bar with loss, tokens/s and ETA on a terminal; silent otherwise."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda *args: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("train", total=total, completed=start, info="")

        def update(step: int, loss: float, tokens_per_s: float) -> None:
            progress.update(task, completed=step, info=f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s")

        yield update
