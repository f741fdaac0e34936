"""Windows measured in tokens or steps (issue 24): which of the newest checkpoints a length covers.

A window of W tokens holds the eligible checkpoints saved within W tokens of the newest eligible one.
Positions are tokens when the logs count them for every checkpoint (``CheckpointSignals.tokens``),
else steps: what WSM found matters is the window's length in tokens, not its number of checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument
from ..signals import CheckpointSignals


@dataclass(frozen=True, slots=True)
class Span:
    """The newest ``size`` eligible checkpoints a window length covers, and the sentence saying so."""

    size: int
    describe: str   # "window 48.2B tokens: steps 91000–100000, 10 checkpoints"


def positions(items: list[CheckpointSignals]) -> tuple[np.ndarray, str]:
    """Where the checkpoints were saved: (tokens, "tokens") when every one has a token count and the counts
    rise with the steps (a reset counter after a restart does not), else steps."""
    if items and all(item.tokens is not None for item in items):
        tokens = np.array([item.tokens for item in items], dtype=np.float64)
        if np.all(np.isfinite(tokens)) and np.all(tokens[1:] > tokens[:-1]):
            return tokens, "tokens"
    return np.array([item.ref.step for item in items], dtype=np.float64), "steps"


def format_tokens(count: float) -> str:
    """48.2B, 350M, 12K: a token count as people write it."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:g}"


def resolve_span(eligible: list[CheckpointSignals], window_tokens: float | None,
                 window_steps: int | None) -> Span | None:
    """The newest eligible checkpoints within ``window_tokens`` (or ``window_steps``) of the newest, or None
    when neither was given.

    Raises:
        InvalidArgument: a non-positive length, both lengths at once, or tokens asked of a run that logs none.
    """
    if window_tokens is None and window_steps is None:
        return None
    if window_tokens is not None and window_steps is not None:
        raise InvalidArgument("give --window-tokens or --window-steps, not both")
    length = float(window_tokens if window_tokens is not None else window_steps)
    if not np.isfinite(length) or length <= 0:
        raise InvalidArgument(f"a window length must be positive, got {length:g}")
    if window_tokens is not None:
        where, unit = positions(eligible)
        if unit != "tokens":
            raise InvalidArgument("--window-tokens needs the tokens seen at every checkpoint, and the logs count "
                                  "none (no 'tokens' metric): use --window-steps")
    else:
        where, unit = np.array([s.ref.step for s in eligible], dtype=np.float64), "steps"
    size = int(np.count_nonzero(where >= where[-1] - length * (1 + 1e-9)))
    return Span(size, _describe(eligible[-size:], where[-size:], unit, length))


def _describe(taken: list[CheckpointSignals], where: np.ndarray, unit: str, asked: float) -> str:
    """The window's sentence: its real length, what was asked, its steps and how many checkpoints it holds."""
    covered = float(where[-1] - where[0])
    show = format_tokens if unit == "tokens" else (lambda v: f"{v:g}")
    count = f"{len(taken)} checkpoint{'s' if len(taken) != 1 else ''}"
    return (f"window {show(covered)} {unit} (asked {show(asked)}): steps {taken[0].ref.step}–{taken[-1].ref.step}, "
            f"{count}")
