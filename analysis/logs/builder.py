"""Accumulates records from a reader into a :class:`LogTable`, handling restarts.

Readers hand records over in file order, either one at a time (:meth:`TableBuilder.add`)
or a whole block of columns at once (:meth:`TableBuilder.add_columns`, the vectorised
fast path). The builder canonicalises names, counts skipped lines and detects restarts
(the step counter going back), keeping the curve the way the run actually continued: a
later segment replaces every earlier row at or after its first step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .base import LogTable, empty_frame
from .names import canonical_metric

# Steps outside this range cannot be stored (int64): such a record is malformed.
MAX_STEP = 2**62

# One block of records: (record steps, record wall times, {metric: (values, present mask)}).
_Block = tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]
# One metric's rows: (steps, values, wall times).
MetricPart = tuple[np.ndarray, np.ndarray, np.ndarray]


class TableBuilder:
    """Collects tidy rows (record by record or column-wise) and builds the frame once."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.format = path, fmt
        self._blocks: list[_Block] = []
        self._rec_steps: list[int] = []
        self._rec_walls: list[float] = []
        self._rows: list[tuple[int, str, float]] = []   # (record index in pending, metric, value)
        self.rows = 0
        self.skipped_lines = 0
        self.notes: list[str] = []

    def skip(self, count: int = 1) -> None:
        """Count a malformed line that was passed over."""
        self.skipped_lines += count

    def note(self, text: str) -> None:
        """Record something the reader did that a user should know (shown with the table)."""
        if text not in self.notes:
            self.notes.append(text)

    def add(self, step: int, metrics: dict[str, float], wall_time: float | None = None) -> None:
        """Add one record; ``metrics`` maps raw names to floats (NaN/inf allowed)."""
        if not metrics:
            return
        if not -MAX_STEP <= step <= MAX_STEP:
            self.skip()
            return
        index = len(self._rec_steps)
        self._rec_steps.append(int(step))
        self._rec_walls.append(float("nan") if wall_time is None else float(wall_time))
        for name, value in metrics.items():
            self._rows.append((index, name, float(value)))
        self.rows += 1

    def add_columns(
        self,
        steps: np.ndarray,
        metrics: dict[str, tuple[np.ndarray, np.ndarray]],
        wall_times: np.ndarray | None = None,
    ) -> None:
        """Add a block of records at once (the fast path for big logs).

        Args:
            steps: int step of each record, in file order.
            metrics: raw name -> (float values, bool mask of records that carry it).
            wall_times: unix seconds per record, or None.
        """
        self._flush()
        steps = np.asarray(steps, dtype=np.int64)
        if not len(steps):
            return
        keep = np.zeros(len(steps), dtype=bool)
        for _, mask in metrics.values():
            keep |= mask
        walls = np.full(len(steps), np.nan) if wall_times is None else np.asarray(wall_times, dtype=np.float64)
        block = {name: (np.asarray(v, dtype=np.float64), np.asarray(m, dtype=bool)) for name, (v, m) in metrics.items()}
        if not keep.all():   # records without any metric are not rows (copying only when needed)
            steps, walls = steps[keep], walls[keep]
            block = {name: (v[keep], m[keep]) for name, (v, m) in block.items()}
        self._blocks.append((steps, walls, block))
        self.rows += len(steps)

    def _flush(self) -> None:
        """Turn the pending one-at-a-time records into a block (keeps file order)."""
        if not self._rec_steps:
            return
        n = len(self._rec_steps)
        block: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for index, name, value in self._rows:
            if name not in block:
                block[name] = (np.full(n, np.nan), np.zeros(n, dtype=bool))
            block[name][0][index] = value
            block[name][1][index] = True
        self._blocks.append((np.asarray(self._rec_steps, dtype=np.int64), np.asarray(self._rec_walls), block))
        self._rec_steps, self._rec_walls, self._rows = [], [], []

    def build(self) -> LogTable:
        """The finished table, with superseded rows of earlier segments removed."""
        blocks = self.blocks()
        if not blocks:
            return self.table({}, 0, ())
        parts, restarts = metric_parts(blocks)
        return self.table(parts, restarts, step_segments(np.concatenate([b[0] for b in blocks])))

    def blocks(self) -> list[_Block]:
        """The records added so far, as blocks in file order (a follower adds to what it read: issue 23)."""
        self._flush()
        return self._blocks

    def table(self, parts: dict[str, MetricPart], restarts: int, segments: tuple[tuple[int, int], ...]) -> LogTable:
        """A :class:`LogTable` of this builder's counts and notes holding ``parts`` (see :func:`metric_parts`)."""
        return LogTable(
            path=self.path, format=self.format, frame=tidy_frame(parts), rows=self.rows,
            skipped_lines=self.skipped_lines, restarts=restarts, notes=tuple(self.notes), segments=segments,
        )


def metric_parts(blocks: list[_Block]) -> tuple[dict[str, MetricPart], int]:
    """({canonical metric: (steps, values, wall times)} in order of first appearance, restarts) of the blocks.

    Rows a later segment supersedes are removed, and a step repeated within a metric keeps its last row
    (numpy only: this runs on millions of rows).
    """
    rec_steps = np.concatenate([b[0] for b in blocks])
    segments = np.zeros(len(rec_steps), dtype=np.int64)
    if len(rec_steps) > 1:
        segments[1:] = np.cumsum(rec_steps[1:] < rec_steps[:-1])
    restarts = int(segments[-1]) if len(segments) else 0
    bound = _continuation_bounds(rec_steps, segments) if restarts else None
    columns: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    offset = 0
    for steps, walls, metrics in blocks:
        for name, (values, mask) in metrics.items():
            if bound is not None:
                mask = mask & (steps < bound[offset:offset + len(steps)])
            if mask.all():
                columns.setdefault(canonical_metric(name), []).append((steps, values, walls))
            elif mask.any():
                columns.setdefault(canonical_metric(name), []).append((steps[mask], values[mask], walls[mask]))
        offset += len(steps)
    return {name: _dedupe(*(p[0] if len(p) == 1 else np.concatenate(p) for p in zip(*chunks)))
            for name, chunks in columns.items()}, restarts


def extend_parts(parts: dict[str, MetricPart], blocks: list[_Block]) -> dict[str, MetricPart]:
    """:func:`metric_parts` of old blocks plus ``blocks``, given the old blocks' result ``parts``.

    Only for blocks that do not restart (their steps never go below the last step before them, see
    :func:`continues`): then no old row is superseded, and this equals :func:`metric_parts` of all blocks
    at the cost of the new rows alone (a followed log, issue 23).
    """
    columns: dict[str, list[MetricPart]] = {}
    for steps, walls, metrics in blocks:
        for name, (values, mask) in metrics.items():
            if mask.any():
                columns.setdefault(canonical_metric(name), []).append((steps[mask], values[mask], walls[mask]))
    extended = dict(parts)
    for name, chunks in columns.items():
        chunks = ([parts[name]] if name in parts else []) + chunks
        extended[name] = _dedupe(*(np.concatenate(p) for p in zip(*chunks)))
    return extended


def continues(last_step: int | None, blocks: list[_Block]) -> bool:
    """True when the records of ``blocks`` never step back, from ``last_step`` (the step of the record before)."""
    steps = np.concatenate([b[0] for b in blocks]) if blocks else np.empty(0, dtype=np.int64)
    if last_step is not None and len(steps):
        steps = np.concatenate([[last_step], steps])
    return bool(np.all(steps[1:] >= steps[:-1]))


def tidy_frame(parts: dict[str, MetricPart]) -> pd.DataFrame:
    """The tidy frame of :func:`metric_parts`' result: each metric's rows in turn, in the dict's order."""
    if not parts:
        return empty_frame()
    names = np.array(list(parts), dtype=object)
    parts = list(parts.values())
    # The one costly column (an object per row): built once by np.repeat, handed to pandas without a copy.
    metric = np.repeat(names, [len(p[0]) for p in parts])
    frame = pd.DataFrame({
        "step": np.concatenate([p[0] for p in parts]),
        "metric": pd.Series(metric, dtype=object, copy=False),   # object, like empty_frame(); 2x faster than str
        "value": np.concatenate([p[1] for p in parts]),
        "wall_time": np.concatenate([p[2] for p in parts]),
    }, copy=False)
    return frame


def step_segments(rec_steps: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(first, last) step of each stretch between restarts, in file order."""
    if not len(rec_steps):
        return ()
    cuts = np.flatnonzero(rec_steps[1:] < rec_steps[:-1]) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(rec_steps)]])
    return tuple((int(rec_steps[a]), int(rec_steps[b - 1])) for a, b in zip(starts, ends))


def _dedupe(steps: np.ndarray, values: np.ndarray, walls: np.ndarray) -> tuple[np.ndarray, ...]:
    """One metric's rows with a repeated step reduced to its last (in file order) row."""
    if len(steps) < 2 or np.all(steps[1:] > steps[:-1]):
        return steps, values, walls
    keep = ~pd.Series(steps).duplicated(keep="last").to_numpy()
    return steps[keep], values[keep], walls[keep]


def _continuation_bounds(rec_steps: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Per record, the first step of the earliest-starting LATER segment (rows at or past it are superseded)."""
    first = pd.Series(rec_steps).groupby(segments).min().to_numpy()
    later_min = np.minimum.accumulate(first[::-1])[::-1]
    later_min = np.append(later_min[1:], np.iinfo(np.int64).max)
    return later_min[segments]
