"""Accumulates records from a reader into a :class:`LogTable`, handling restarts.

Every reader yields ``(step, {metric: value}, wall_time)`` records in file order; the
builder canonicalises names, counts skipped lines and detects restarts (the step
counter going back), keeping the curve the way the run actually continued: a later
segment replaces every earlier row at or after its first step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .base import LogTable, empty_frame
from .names import canonical_metric


class TableBuilder:
    """Collects tidy rows column-wise (cheap appends) and builds the frame once."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.format = path, fmt
        self._steps: list[int] = []
        self._metrics: list[str] = []
        self._values: list[float] = []
        self._walls: list[float] = []
        self._segments: list[int] = []
        self._segment = 0
        self._last_step: int | None = None
        self.rows = 0
        self.skipped_lines = 0
        self.notes: list[str] = []

    def skip(self, count: int = 1) -> None:
        """Count a malformed line that was passed over."""
        self.skipped_lines += count

    def add(self, step: int, metrics: dict[str, float], wall_time: float | None = None) -> None:
        """Add one record; ``metrics`` maps raw names to floats (NaN/inf allowed)."""
        if not metrics:
            return
        if self._last_step is not None and step < self._last_step:
            self._segment += 1
        self._last_step = step
        wall = float("nan") if wall_time is None else float(wall_time)
        for name, value in metrics.items():
            self._steps.append(int(step))
            self._metrics.append(canonical_metric(name))
            self._values.append(float(value))
            self._walls.append(wall)
            self._segments.append(self._segment)
        self.rows += 1

    def build(self) -> LogTable:
        """The finished table, with superseded rows of earlier segments removed."""
        if not self._steps:
            frame = empty_frame()
        else:
            frame = pd.DataFrame(
                {
                    "step": np.asarray(self._steps, dtype=np.int64),
                    "metric": self._metrics,
                    "value": np.asarray(self._values, dtype=np.float64),
                    "wall_time": np.asarray(self._walls, dtype=np.float64),
                }
            )
            if self._segment:
                frame = _keep_continuation(frame, np.asarray(self._segments))
        return LogTable(
            path=self.path,
            format=self.format,
            frame=frame,
            rows=self.rows,
            skipped_lines=self.skipped_lines,
            restarts=self._segment,
            notes=tuple(self.notes),
        )


def _keep_continuation(frame: pd.DataFrame, segments: np.ndarray) -> pd.DataFrame:
    """Drop rows of earlier segments at or after the first step of any later segment."""
    steps = frame["step"].to_numpy()
    keep = np.ones(len(frame), dtype=bool)
    first_steps = {seg: int(steps[segments == seg].min()) for seg in np.unique(segments)}
    # A row survives if no LATER segment starts at or before its step.
    for seg, first in first_steps.items():
        keep &= ~((segments < seg) & (steps >= first))
    return frame[keep].reset_index(drop=True)

