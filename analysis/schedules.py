"""Decay schedules w(x) (issue 24): the LR curves a decay-emulating merge imitates, and their names.

Here, outside ``selection``, so that the recipe can check a recorded schedule without importing the recommender.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgument

SCHEDULES = ("linear", "1-sqrt", "cosine", "exp")
DEFAULT_EXP_RATE = 5.0   # exp: w(1) = e^-5 ≈ 0.007, a decay that ends near zero like the others


@dataclass(frozen=True, slots=True)
class Schedule:
    """A decay curve w(x) on x in [0, 1], w(0) = 1, non-increasing, so every coefficient is ≥ 0."""

    name: str             # linear | 1-sqrt | cosine | exp
    rate: float = DEFAULT_EXP_RATE   # exp only: w(x) = exp(-rate x)

    @property
    def spec(self) -> str:
        """The text that parses back to this schedule (``exp:3`` keeps its rate)."""
        return f"exp:{self.rate:g}" if self.name == "exp" else self.name

    def at(self, x: np.ndarray) -> np.ndarray:
        """w(x): the LR multiplier a fraction ``x`` of the way through the decay."""
        x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
        if self.name == "linear":
            return 1.0 - x
        if self.name == "1-sqrt":
            return 1.0 - np.sqrt(x)
        if self.name == "cosine":
            return 0.5 * (1.0 + np.cos(math.pi * x))
        return np.exp(-self.rate * x)


def parse_schedule(spec: str) -> Schedule:
    """``linear``, ``1-sqrt`` (also ``minus-sqrt``, Megatron's name), ``cosine`` or ``exp[:RATE]``.

    Raises:
        InvalidArgument: an unknown name, or an exp rate that is not a positive number.
    """
    name, _, rate = str(spec).strip().lower().partition(":")
    name = {"minus-sqrt": "1-sqrt", "sqrt": "1-sqrt"}.get(name, name)
    if name not in SCHEDULES:
        raise InvalidArgument(f"schedule must be one of linear, 1-sqrt, cosine, exp[:RATE], got {spec!r}")
    if name != "exp":
        if rate:
            raise InvalidArgument(f"only the exp schedule takes a rate, got {spec!r}")
        return Schedule(name)
    try:
        value = float(rate) if rate else DEFAULT_EXP_RATE
    except ValueError:
        raise InvalidArgument(f"exp schedule rate must be a number, got {rate!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"exp schedule rate must be positive, got {rate!r}")
    return Schedule("exp", value)
