"""Thin a long series for display without hiding its spikes.

A million-point curve cannot go to a browser; sampling every n-th point would drop
exactly the one-step spikes users look for. Each bucket of consecutive points keeps
its first, minimum, maximum and last point, in step order, so the drawn envelope is
the true one at screen resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..run import Run
from .axes import step_to_axis
from .smoothing import debiased_ema

MAX_POINTS = 4000  # per series sent to a browser


@dataclass(frozen=True, slots=True, eq=False)
class DisplaySeries:
    """One metric ready to draw: at most about MAX_POINTS points, extremes kept."""

    x: np.ndarray        # on the requested axis (steps, tokens or hours)
    raw: np.ndarray      # the logged values at the kept points
    smooth: np.ndarray   # debiased EMA computed on the full series, at the kept points (raw when not smoothed)


def minmax_indices(y: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Sorted indexes of the points ``minmax_decimate`` keeps (all of them for a short series).

    Per bucket: its first and last point, the first minimum and first maximum of its finite
    values, and its first two non-finite points. Vectorised (a Python loop over the
    buckets cost ~0.1 s per million points, on every chart redraw).
    """
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    if n <= max_points or max_points < 8:
        return np.arange(n)
    buckets = max_points // 4
    edges = np.linspace(0, n, buckets + 1, dtype=np.int64)
    starts, ends = edges[:-1], edges[1:]
    starts, ends = starts[ends > starts], ends[ends > starts]
    finite = np.isfinite(y)
    picks = [starts, ends - 1]
    lengths = ends - starts
    has_finite = np.add.reduceat(finite, starts) > 0
    for fill, reduce in ((np.inf, np.minimum), (-np.inf, np.maximum)):
        masked = np.where(finite, y, fill)
        extreme = reduce.reduceat(masked, starts)
        hits = np.flatnonzero((masked == np.repeat(extreme, lengths)) & finite)
        first = np.searchsorted(hits, starts)   # the first hit at or after each bucket's start
        picks.append(hits[first[has_finite]])
    bad = np.flatnonzero(~finite)
    if len(bad):
        bucket = np.searchsorted(starts, bad, side="right") - 1
        rank = np.arange(len(bad)) - np.searchsorted(bad, starts)[bucket]
        picks.append(bad[rank < 2])
    return np.unique(np.concatenate(picks))


def minmax_decimate(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) with at most about ``max_points`` points, keeping each bucket's extremes.

    Non-finite values are kept (they are what a user must see), never used as extremes.
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.float64)
    index = minmax_indices(y, max_points)
    return (x, y) if len(index) == len(y) else (x[index], y[index])


def display_series(run: Run, metric: str, axis: str = "step", smoothing: float | None = None,
                   index: np.ndarray | None = None, max_points: int = MAX_POINTS) -> DisplaySeries:
    """``metric`` of ``run`` on ``axis``, smoothed on the full series, then decimated.

    ``index`` is ``minmax_indices`` of the metric's values, when the caller kept it (it
    depends on neither the axis nor the smoothing).
    """
    frame = run.metric(metric)
    steps, raw = frame["step"].to_numpy(), frame["value"].to_numpy(float)
    smooth = debiased_ema(raw, smoothing) if smoothing else raw
    index = minmax_indices(raw, max_points) if index is None else index
    return DisplaySeries(step_to_axis(run, steps[index], axis), raw[index], smooth[index])
