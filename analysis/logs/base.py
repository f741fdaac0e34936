"""What every log reader returns (:class:`LogTable`) and the protocol it follows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

# Columns of every tidy metrics frame, in this order.
TIDY_COLUMNS = ("step", "metric", "value", "wall_time")


@dataclass(frozen=True, slots=True, eq=False)
class LogTable:
    """One log file read into a tidy frame.

    ``frame`` has one row per (step, metric) with columns ``step`` (int64), ``metric``
    (canonical name such as ``train_loss``), ``value`` (float64, NaN/inf kept) and
    ``wall_time`` (unix seconds, NaN where the log has none).
    """

    path: Path
    format: str
    frame: pd.DataFrame
    rows: int            # records that carried at least one metric
    skipped_lines: int   # malformed lines skipped, never fatal
    restarts: int = 0    # times the step counter went back (resumes, appended runs)
    notes: tuple[str, ...] = field(default_factory=tuple)
    # (first_step, last_step) of each run segment in file order, as logged (before later
    # segments replaced the overlap); one segment when the log never restarts.
    segments: tuple[tuple[int, int], ...] = ()

    def metric_names(self) -> list[str]:
        """Names of the metrics present, sorted."""
        return sorted(self.frame["metric"].unique().tolist())

    def series(self, metric: str) -> pd.DataFrame:
        """The ``step``/``value``/``wall_time`` rows of one metric, sorted by step."""
        sub = self.frame[self.frame["metric"] == metric]
        return sub[["step", "value", "wall_time"]].sort_values("step", kind="stable").reset_index(drop=True)

    def series_by_metric(self) -> dict[str, pd.DataFrame]:
        """``{name: series(name)}`` for every metric, by name: one pass over the frame."""
        return split_by_metric(self.frame)


class LogReader(Protocol):
    """One log format. ``name`` is the stable id used in the README, the UI and golden files."""

    name: str
    description: str

    def sniff(self, path: Path, head: str) -> bool:
        """True if ``head`` is this format: the first ~4 KB of the file plus a few evenly
        spaced ~4 KB windows up to its tail, decoded leniently ('' for a binary file).

        Must be cheap (a regex search) and must not read the file again. A reader whose
        line pattern is specific enough to be tested on any stretch of text may set
        ``deep_sniff = True``: it is then also tried on the first 32 MB, chunk by chunk,
        when no reader claimed the sample (logs whose records follow a long preamble).
        """
        ...

    def read(self, path: Path) -> LogTable:
        """Read the whole file; skip and count malformed lines; raise LogParseError if unusable."""
        ...


def split_by_metric(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """A tidy frame's ``step``/``value``/``wall_time`` rows per metric, each sorted by step, names sorted.

    One pass: selecting one metric at a time compares the whole metric-name column (7 million
    names for a million-step log, ~0.2 s) on every call.
    """
    groups = {str(key): sub for key, sub in frame.groupby("metric", sort=False, observed=True)}
    return {name: groups[name][["step", "value", "wall_time"]].sort_values("step", kind="stable")
            .reset_index(drop=True) for name in sorted(groups)}


def empty_frame() -> pd.DataFrame:
    """A tidy frame with no rows but the right dtypes."""
    return pd.DataFrame(
        {
            "step": pd.Series([], dtype="int64"),
            "metric": pd.Series([], dtype="object"),
            "value": pd.Series([], dtype="float64"),
            "wall_time": pd.Series([], dtype="float64"),
        }
    )


def to_float(value: object) -> float | None:
    """A metric value as float, or None if it is not a number.

    Accepts numbers, numeric strings (some trainers quote them) and the strings
    ``nan``/``inf`` so that non-finite values are kept and flagged, never dropped.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(",", "")
        try:
            return float(text)
        except ValueError:
            return None
    return None


def to_step(value: object) -> float | None:
    """A step as a number; ``"12/2353"`` (ms-swift's ``global_step/max_steps``) -> 12."""
    if isinstance(value, str) and "/" in value:
        value = value.split("/", 1)[0]
    return to_float(value)
