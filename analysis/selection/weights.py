"""The weight policies: how much each chosen checkpoint counts in the average.

``policy_weights`` gives the fixed policies (sma, ema, wma; a soup and a recovery average
uniformly, as sma); ``optimal_weights`` gives the predicted weights, the exact minimum of the
predicted loss of an average (``eligibility.predicted_window`` feeds it the logs' numbers).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidArgument, NotEnoughCheckpoints


def policy_weights(method: str, count: int, alpha: float = 0.3) -> tuple[float, ...]:
    """Weights for ``count`` checkpoints ordered oldest to newest.

    ``sma``: uniform. ``wma``: 1, 2, ..., count. ``ema``: the newest gets alpha, the one
    before alpha(1-alpha), and so on, then normalised over the window — the EMA of a
    finite window, with no phantom zero-initialised accumulator.
    """
    if count < 1:
        raise NotEnoughCheckpoints("no checkpoint to weight")
    if method == "sma" or count == 1:
        raw = [1.0] * count
    elif method == "wma":
        raw = [float(i) for i in range(1, count + 1)]
    elif method == "ema":
        if not 0.0 < alpha <= 1.0:
            raise InvalidArgument(f"EMA alpha must be in (0, 1], got {alpha}")
        raw = [alpha * (1.0 - alpha) ** (count - 1 - i) for i in range(count)]
    else:
        raise InvalidArgument(f"no weights for method {method!r}; use sma, ema or wma")
    total = math.fsum(raw)
    return tuple(w / total for w in raw)


def optimal_weights(cost: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights w ≥ 0 with Σ w = 1 minimising Σ w_k cost_k + Σ w_k² noise_k (every noise_k > 0), and the cut.

    The KKT conditions give w_k = max(0, (cut − cost_k) / (2 noise_k)): the checkpoints with the lowest
    cost are weighted first, and the cut is where the weights of those below it sum to 1. Exact: the
    active set is the longest prefix (by cost) whose own cut lies above its highest cost.
    """
    order = np.argsort(cost, kind="stable")
    inv = 1.0 / (2.0 * noise[order])
    cuts = (1.0 + np.cumsum(cost[order] * inv)) / np.cumsum(inv)
    active = int(np.flatnonzero(cost[order] < cuts)[-1]) + 1
    cut = float(cuts[active - 1])
    weights = np.maximum(0.0, (cut - cost) / (2.0 * noise))
    return weights / weights.sum(), cut
