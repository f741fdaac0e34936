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
    out = y.copy()
    last, count = 0.0, 0
    for i in np.flatnonzero(finite):
        last = last * weight + (1.0 - weight) * y[i]
        count += 1
        out[i] = last if weight == 1.0 else last / (1.0 - weight ** count)
    return out
