"""Curve smoothing as TensorBoard and W&B draw it (their 'EMA' is this debiased one)."""

from __future__ import annotations

import numpy as np


def debiased_ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: EMA with weight ``weight`` divided by ``1 - weight**n``.

    Without the debias term the first points would be pulled towards zero. Non-finite
    values are passed through unchanged and do not advance the average, so a NaN
    shows as a NaN instead of breaking every later point.
    """
    y = np.asarray(values, dtype=np.float64)
    weight = float(np.clip(weight if np.isfinite(weight) else 0.0, 0.0, 1.0))
    finite = np.isfinite(y)
    if weight == 0.0 or not finite.any() or np.all(y[finite] == y[finite][0]):
        return y.copy()
    if weight == 1.0:  # the average never moves from the first value
        out = y.copy()
        out[finite] = y[finite][0]
        return out
    # Imported here: scipy takes 0.4 s to import and the CLI imports this module.
    from scipy.signal import lfilter

    # A Python loop costs ~1 s per million points (every smoothing-slider move);
    # lfilter runs the same recurrence last = w * last + (1 - w) * y in C.
    values = y[finite]
    ema = lfilter([1.0 - weight], [1.0, -weight], values)
    out = y.copy()
    out[finite] = ema / (1.0 - weight ** np.arange(1, len(values) + 1))
    return out
