"""Validation score of each checkpoint, read from the run's logs.

An eval is often logged at the checkpoint's own step, but not always (eval every 500,
save every 1000 or the reverse). The nearest eval is used only when it is closer than
half the spacing between checkpoints, and the step it came from is always reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True, slots=True)
class ValScore:
    """A checkpoint's validation loss and where it came from."""

    value: float
    source_step: int     # the step of the logged eval used
    source: str          # "logged" (same step), "logged-nearest", or "evaluator"

    def describe(self) -> str:
        """E.g. 'val loss 1.8430, logged at this step'."""
        if self.source == "evaluator":
            return f"val loss {self.value:.4f}, from the evaluator"
        where = "logged at this step" if self.source == "logged" else f"nearest eval at step {self.source_step}"
        return f"val loss {self.value:.4f}, {where}"


def logged_val_scores(val: pd.DataFrame, ckpt_steps: list[int]) -> list[ValScore | None]:
    """The logged val loss for each checkpoint step, or None where no eval is close enough.

    Args:
        val: rows of the ``val_loss`` metric (``step``, ``value``), any order.
        ckpt_steps: checkpoint steps, increasing.
    """
    if val.empty or not ckpt_steps:
        return [None] * len(ckpt_steps)
    val = val.sort_values("step").drop_duplicates("step", keep="last")
    eval_steps = val["step"].to_numpy()
    values = val["value"].to_numpy(dtype=np.float64)
    spacing = np.diff(ckpt_steps)
    tolerance = (float(np.median(spacing)) / 2.0) if len(spacing) else float("inf")
    scores: list[ValScore | None] = []
    for step in ckpt_steps:
        i = int(np.argmin(np.abs(eval_steps - step)))
        gap = abs(int(eval_steps[i]) - step)
        if gap == 0:
            scores.append(ValScore(float(values[i]), int(eval_steps[i]), "logged"))
        elif gap < tolerance:
            scores.append(ValScore(float(values[i]), int(eval_steps[i]), "logged-nearest"))
        else:
            scores.append(None)
    return scores
