"""Thin a long series for display without hiding its spikes.

A million-point curve cannot go to a browser; sampling every n-th point would drop
exactly the one-step spikes users look for. Each bucket of consecutive points keeps
its first, minimum, maximum and last point, in step order, so the drawn envelope is
the true one at screen resolution.
"""

from __future__ import annotations

import numpy as np


def minmax_decimate(x: np.ndarray, y: np.ndarray, max_points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) with at most about ``max_points`` points, keeping each bucket's extremes.

    Non-finite values are kept (they are what a user must see), never used as extremes.
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    if n <= max_points or max_points < 8:
        return x, y
    buckets = max_points // 4
    edges = np.linspace(0, n, buckets + 1, dtype=np.int64)
    keep: list[np.ndarray] = []
    for start, end in zip(edges[:-1], edges[1:]):
        if end <= start:
            continue
        segment = y[start:end]
        finite = np.isfinite(segment)
        picks = [start, end - 1]
        if finite.any():
            masked = np.where(finite, segment, np.nan)
            picks += [start + int(np.nanargmin(masked)), start + int(np.nanargmax(masked))]
        picks += list(start + np.flatnonzero(~finite)[:2])
        keep.append(np.unique(picks))
    index = np.unique(np.concatenate(keep))
    return x[index], y[index]
