"""X axes users expect besides the step: tokens seen and wall-clock time."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgument
from ..run import Run

AXES = ("step", "tokens", "wall_hours")


def available_axes(run: Run) -> list[str]:
    """The axes this run's logs can give (step always; tokens and wall time when logged)."""
    axes = ["step"]
    if len(run.metric("tokens")) >= 2:
        axes.append("tokens")
    if len(run.wall_clock()[0]) >= 2:
        axes.append("wall_hours")
    return axes


def step_to_axis(run: Run, steps: np.ndarray, axis: str) -> np.ndarray:
    """Map steps to ``axis``: tokens (interpolated from the logged count) or hours since the first log line.

    Wall time is interpolated between logged time stamps, so a resumed run shows its gap.
    """
    steps = np.asarray(steps, dtype=np.float64)
    if axis == "step":
        return steps
    if axis == "tokens":
        tokens = run.metric("tokens")
        return np.interp(steps, tokens["step"].to_numpy(float), tokens["value"].to_numpy(float))
    if axis == "wall_hours":
        clock_steps, wall = run.wall_clock()
        return (np.interp(steps, clock_steps, wall) - float(wall.min())) / 3600.0
    raise InvalidArgument(f"x axis must be one of {', '.join(AXES)}, got {axis!r}")
