"""Decay-emulating weights (WSM): the average of constant-LR checkpoints that acts like an LR decay.

Checkpoint j of a constant-LR stretch is θ_j = θ_0 − η Σ (updates up to it). The average Σ c_j θ_j with
c_0 = 1 − w_1, c_j = w_j − w_{j+1}, c_k = w_k (Tian et al., WSM, arXiv 2507.17634) scales the updates made
between checkpoints j−1 and j by Σ_{i≥j} c_i = w_j: it is the run as if its LR had followed w, piecewise
constant, and Σ c = w_0 = 1. A decay schedule w(x), x in [0, 1] through the decay, gives w_j = w(x_j).

Where x_j comes from decides everything. Megatron-LM's ``weighted_merge.py`` assumes equal spacing and
reads w at x_j = j / n for the n checkpoints (``linspace(0, 1, n, endpoint=False)``): the decay runs from
the oldest checkpoint to one interval past the newest, and each checkpoint's w is read at its own
position. This module keeps that convention but places the checkpoints where they were saved, in
TOKENS (steps when the run logs no token count): x_j = (t_j − t_0) / (t_k − t_0 + mean spacing). On equal
spacing that is exactly j / n (so 1 − √x, n = 5 gives Megatron's 0.447, 0.185, 0.142, 0.120, 0.106);
a run that saved more often somewhere gets the weights the schedule implies there, not j / n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument, NotEnoughCheckpoints
from ..schedules import SCHEDULES, Schedule, parse_schedule
from ..signals import CheckpointSignals
from .span import positions

def decay_fractions(positions: np.ndarray | list[float]) -> np.ndarray:
    """x_j of checkpoints at ``positions`` (tokens or steps, oldest first): how far through the decay each sits.

    The decay runs from the oldest to one mean spacing past the newest (Megatron's j / n on equal spacing).
    """
    t = np.asarray(positions, dtype=np.float64)
    if len(t) < 2:
        return np.zeros(len(t))
    span = float(t[-1] - t[0])
    if not span > 0 or np.any(np.diff(t) <= 0):
        raise InvalidArgument("decay weights need checkpoints at strictly increasing positions")
    return (t - t[0]) / (span * len(t) / (len(t) - 1))


def decay_coefficients(schedule: Schedule, positions: np.ndarray | list[float]) -> tuple[float, ...]:
    """The WSM coefficients c_0 = 1 − w_1, c_j = w_j − w_{j+1}, c_k = w_k of checkpoints at ``positions``.

    Oldest first; they sum to 1 (w_0 = w(0) = 1) and are ≥ 0 (w does not increase).

    Raises:
        NotEnoughCheckpoints: no position. InvalidArgument: positions not strictly increasing.
    """
    if len(positions) < 1:
        raise NotEnoughCheckpoints("no checkpoint to weight")
    w = schedule.at(decay_fractions(positions))
    w[0] = 1.0
    c = np.append(w[:-1] - w[1:], w[-1])
    return tuple(float(v) for v in c / c.sum())


def emulated_lr(schedule: Schedule, positions: np.ndarray | list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The LR multiplier the merge applies, as (positions, multiplier) for a step chart (plotly ``hv``).

    The updates between checkpoint j−1 and j count w_j (the multiplier at position j−1 holds until j);
    those after the newest not at all (0). Updates before the oldest count fully (1, not returned).
    """
    t = np.asarray(positions, dtype=np.float64)
    w = schedule.at(decay_fractions(t))
    return t, np.append(w[1:], 0.0)


def decay_weights(schedule: Schedule, items: list[CheckpointSignals] | tuple[CheckpointSignals, ...]) -> tuple[float, ...]:
    """The coefficients of checkpoints ``items`` (oldest first) at their positions in tokens, else steps."""
    where, _ = positions(list(items))
    return decay_coefficients(schedule, where)


@dataclass(frozen=True, slots=True)
class DecaySelection:
    """Decay-emulating weights of a selection of checkpoints, and the LR curve they emulate (for the app)."""

    steps: tuple[int, ...]          # the checkpoints weighted, oldest first (those of the selection in the window)
    weights: tuple[float, ...]
    where: tuple[float, ...]        # their positions in ``unit``
    multiplier: tuple[float, ...]   # the emulated LR multiplier from each position on (:func:`emulated_lr`)
    unit: str                       # tokens | steps
    lr_at_start: float | None       # the LR at the oldest, to put the multiplier in LR units
    describe: str                   # the window in words, or "" when the whole selection is weighted


def decay_selection(items: list[CheckpointSignals], schedule: str, window_tokens: float | None = None,
                    window_steps: int | None = None) -> DecaySelection:
    """WSM weights of ``items`` (a selection, oldest first), within a window in tokens or steps when given.

    Raises:
        InvalidArgument: a bad schedule or window. NotEnoughCheckpoints: an empty selection.
    """
    from .span import resolve_span
    if not items:
        raise NotEnoughCheckpoints("no checkpoint to weight")
    parsed = parse_schedule(schedule)
    span = resolve_span(items, window_tokens, window_steps)
    taken = items[len(items) - span.size:] if span is not None else items
    where, unit = positions(taken)
    x, multiplier = emulated_lr(parsed, where)
    return DecaySelection(tuple(s.ref.step for s in taken), decay_weights(parsed, taken), tuple(map(float, x)),
                          tuple(map(float, multiplier)), unit, taken[0].lr, span.describe if span else "")
