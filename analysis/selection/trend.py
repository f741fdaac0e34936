"""The val-loss curve's noise around its trend, and whether it is still falling: what a val band must not cross.

A median of first differences (the band's noise) counts a steady descent as noise: on a curve still
falling steeply it called 0.84 nats of descent "within noise" and averaged checkpoints a whole
stretch of training apart (issue 21). Here the noise is the scatter left around a local fit (a
quadratic through each five neighbouring evals, a line through each point's two neighbours when
there are only three or four), which a smooth descent, curved or not, barely moves.
"""

from __future__ import annotations

import numpy as np

MAD_TO_SIGMA = 1.0 / 0.6745   # median |x| of a normal sample to its sigma
_RECENT = 16                  # newest evals the noise is read from, as the band's own noise
# Of a residual at the centre of a five-point quadratic fit, and of a point from the line through its two
# neighbours: the share of a single eval's variance that the residual keeps (1 − leverage; 1 + 1/2).
_QUADRATIC_CENTRE_VARIANCE = 1.0 - (1 / 5 + 4 / 14)
_NEIGHBOUR_LINE_VARIANCE = 1.5


def trend_noise(values: np.ndarray) -> float | None:
    """The robust sigma of the newest evals around a local fit (None under three values).

    Args:
        values: val losses in step order (finite).
    """
    recent = np.asarray(values, dtype=np.float64)[-_RECENT:]
    if len(recent) >= 5:
        x = np.arange(-2, 3, dtype=np.float64)
        residuals = [recent[i + 2] - np.polyval(np.polyfit(x, recent[i:i + 5], 2), 0.0) for i in range(len(recent) - 4)]
        return _robust_sigma(np.array(residuals), _QUADRATIC_CENTRE_VARIANCE)
    if len(recent) >= 3:
        return _robust_sigma(recent[1:-1] - (recent[:-2] + recent[2:]) / 2.0, _NEIGHBOUR_LINE_VARIANCE)
    return None


def descent_per_checkpoint(values: np.ndarray, newest: int = 5) -> float:
    """How much the loss falls per checkpoint over the newest ``newest`` evals (a least-squares line; 0 under three)."""
    recent = np.asarray(values, dtype=np.float64)[-newest:]
    if len(recent) < 3:
        return 0.0
    return float(-np.polyfit(np.arange(len(recent), dtype=np.float64), recent, 1)[0])


def _robust_sigma(residuals: np.ndarray, variance_share: float) -> float:
    """The sigma of one eval from residuals that keep ``variance_share`` of its variance (median-based)."""
    return float(np.median(np.abs(residuals))) * MAD_TO_SIGMA / float(np.sqrt(variance_share))
