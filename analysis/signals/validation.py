"""Validation score of each checkpoint, read from the run's logs.

An eval is often logged at the checkpoint's own step, but not always (eval every 1000, save every
500, or evals at steps of their own). A checkpoint between two evals no further apart than the
run's eval cadence gets the linear interpolation of the two: the loss curve's trend at its step,
which is what the recommender compares checkpoints by (a neighbour's value would shift a checkpoint
by a whole eval interval of descent). Otherwise the nearest eval is used only when it is closer than
half the spacing between checkpoints. The steps the value came from are always reported.

Each framework writes an eval at a step of its own: the step is first mapped to that of the
checkpoint whose weights it scored, per the format's convention (:data:`EVAL_STEP_SHIFT`), so that
a checkpoint gets its own eval rather than an interpolation between its eval and the next one.
Lightning's CSVLogger writes the validation run that precedes the checkpoint saved at step N with
step N − 1 (the counter is not yet advanced when the epoch loop's validation logs), so its evals
move one step on; the Hugging Face Trainer evaluates at the save step and nanoGPT evaluates at
``iter_num`` just before saving that iter's checkpoint, so theirs stay (issue 21).

A run that logs no val loss at all (the Hugging Face Trainer evaluates nothing unless told to) gets
a stand-in from its train loss: the mean of the train losses logged since the checkpoint before.
Those were measured on batches the weights had not yet trained on (in a first epoch), around the
checkpoint, so they carry the same iterate noise and the same trend a val loss would, with a lag of
half a checkpoint interval that is the same for every checkpoint and cancels in the differences the
recommender compares. Rows inside a loss spike's window are left out of the mean. In a later epoch
the batches were seen before and the stand-in reads low.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pandas as pd

from ..logs.base import LogTable
from .spikes import diff_sigma


@dataclass(frozen=True, slots=True)
class ValScore:
    """A checkpoint's validation loss and where it came from."""

    value: float
    source_step: int     # the step of the logged eval used (of an interpolation: the nearer eval)
    source: str          # "logged" (same step), "interpolated", "logged-nearest", "train" or "evaluator"
    between: tuple[int, int] | None = None   # an interpolation's two eval steps; of "train", the interval (lo, hi]
    stderr: float | None = None   # of "train": the mean's sampling error, from its rows' scatter (3 rows or more)
    logged_at: int | None = None  # the step the log wrote the eval at, where its format's convention differs

    @property
    def kind(self) -> str:
        """What the value is: "val loss", or "train loss" for a run that logs no val loss."""
        return "train loss" if self.source == "train" else "val loss"

    def describe(self) -> str:
        """E.g. 'val loss 1.8430, logged at this step'."""
        if self.source == "evaluator":
            return f"val loss {self.value:.4f}, from the evaluator"
        if self.source == "train":
            return (f"train loss {self.value:.4f}, the mean of those logged over steps {self.between[0] + 1}-"
                    f"{self.between[1]}: the run logs no val loss")
        if self.between is not None:
            return f"val loss {self.value:.4f}, interpolated between the evals at steps {self.between[0]} and {self.between[1]}"
        where = "logged at this step" if self.source == "logged" else f"nearest eval at step {self.source_step}"
        if self.logged_at is not None and self.source == "logged":
            where = f"logged for this checkpoint (the log writes it at step {self.logged_at})"
        return f"val loss {self.value:.4f}, {where}"


# Steps from where a log format writes an eval to the step of the checkpoint whose weights it scored.
# Formats not named here evaluate at the save step (HF Trainer) or just before saving it (nanoGPT): 0.
EVAL_STEP_SHIFT: dict[str, int] = {"lightning_csv": 1}


def checkpoint_aligned_val(logs: Sequence[LogTable]) -> pd.DataFrame:
    """The ``val_loss`` rows of ``logs`` at the step of the checkpoint each eval scored (``step``, ``value``,
    ``logged_step``); where two logs give the same step the first wins, as in the run's merged metrics."""
    frames = []
    for log in logs:
        rows = log.frame[log.frame["metric"] == "val_loss"][["step", "value"]].copy()
        rows["logged_step"] = rows["step"]
        rows["step"] = rows["step"] + EVAL_STEP_SHIFT.get(log.format, 0)
        frames.append(rows)
    if not frames:
        return pd.DataFrame({"step": pd.Series([], dtype="int64"), "value": pd.Series([], dtype="float64"),
                             "logged_step": pd.Series([], dtype="int64")})
    merged = pd.concat(frames, ignore_index=True).drop_duplicates("step", keep="first")
    return merged.sort_values("step", kind="stable").reset_index(drop=True)


def logged_val_scores(val: pd.DataFrame, ckpt_steps: list[int]) -> list[ValScore | None]:
    """The logged val loss for each checkpoint step, or None where no eval is close enough.

    Args:
        val: rows of the ``val_loss`` metric (``step``, ``value``, optionally ``logged_step`` where the log
            wrote it, from :func:`checkpoint_aligned_val`), any order.
        ckpt_steps: checkpoint steps, increasing.
    """
    if val.empty or not ckpt_steps:
        return [None] * len(ckpt_steps)
    val = val.sort_values("step").drop_duplicates("step", keep="last")
    eval_steps = val["step"].to_numpy(dtype=np.int64)
    values = val["value"].to_numpy(dtype=np.float64)
    logged = val["logged_step"].to_numpy(dtype=np.int64) if "logged_step" in val else eval_steps
    spacing = np.diff(ckpt_steps)
    tolerance = (float(np.median(spacing)) / 2.0) if len(spacing) else float("inf")
    cadence = float(np.median(np.diff(eval_steps))) if len(eval_steps) > 1 else 0.0
    scores = [_score_at(step, eval_steps, values, tolerance, cadence) for step in ckpt_steps]
    return [_with_logged_step(score, eval_steps, logged) for score in scores]


def _with_logged_step(score: ValScore | None, eval_steps: np.ndarray, logged: np.ndarray) -> ValScore | None:
    """``score`` noting the step its own-step eval was written at in the log, where that differs."""
    if score is None or score.source != "logged":
        return score
    at = int(logged[int(np.searchsorted(eval_steps, score.source_step))])
    return score if at == score.source_step else replace(score, logged_at=at)


def _score_at(step: int, eval_steps: np.ndarray, values: np.ndarray, tolerance: float,
              cadence: float) -> ValScore | None:
    """The val score at one checkpoint step: its own eval, an interpolation, the nearest eval, or None.

    Interpolation needs evals on both sides no further apart than 1.5x the eval cadence, so it never
    bridges a stretch where evals are missing (a crash, a resumed log).
    """
    after = int(np.searchsorted(eval_steps, step))
    if after < len(eval_steps) and eval_steps[after] == step:
        return ValScore(float(values[after]), step, "logged")
    if 0 < after < len(eval_steps):
        lo, hi = int(eval_steps[after - 1]), int(eval_steps[after])
        if hi - lo <= 1.5 * cadence:
            frac = (step - lo) / (hi - lo)
            value = float(values[after - 1] + frac * (values[after] - values[after - 1]))
            return ValScore(value, lo if step - lo <= hi - step else hi, "interpolated", (lo, hi))
    nearest = min((i for i in (after - 1, after) if 0 <= i < len(eval_steps)), key=lambda i: abs(eval_steps[i] - step))
    if abs(int(eval_steps[nearest]) - step) < tolerance:
        return ValScore(float(values[nearest]), int(eval_steps[nearest]), "logged-nearest")
    return None


def train_interval_scores(train: pd.DataFrame, ckpt_steps: list[int],
                          skip: Sequence[tuple[int, int]] = ()) -> list[ValScore | None]:
    """For a run that logs no val loss: each checkpoint's mean logged train loss since the checkpoint before.

    The first checkpoint's interval is as long as the median one. Rows inside a loss spike's window
    (``skip``: (after, up to) step pairs) are left out: a corrupted batch or a blow-up says nothing of the
    weights saved after the recovery, and would make the checkpoint whose interval holds it look worse
    than it is. A checkpoint with no finite train loss left in its interval gets None (a gap in the logs
    is not bridged).

    Args:
        train: rows of the ``train_loss`` metric (``step``, ``value``), any order.
        ckpt_steps: checkpoint steps, increasing.
        skip: (lo, hi] step windows of spikes whose rows do not count.
    """
    if train.empty or not ckpt_steps:
        return [None] * len(ckpt_steps)
    train = train[np.isfinite(train["value"].to_numpy(dtype=np.float64))].sort_values("step")
    steps, values = train["step"].to_numpy(dtype=np.int64), train["value"].to_numpy(dtype=np.float64)
    inside_spike = np.zeros(len(steps), dtype=bool)
    for lo, hi in skip:
        inside_spike |= (steps > lo) & (steps <= hi)
    steps, values = steps[~inside_spike], values[~inside_spike]
    spacing = np.diff(ckpt_steps)
    first = int(np.median(spacing)) if len(spacing) else ckpt_steps[0]
    out: list[ValScore | None] = []
    for lo, hi in zip([ckpt_steps[0] - first, *ckpt_steps[:-1]], ckpt_steps):
        inside = values[(steps > lo) & (steps <= hi)]
        out.append(ValScore(float(inside.mean()), hi, "train", (lo, hi), _sampling_error(inside)) if len(inside) else None)
    return out


def _sampling_error(rows: np.ndarray) -> float | None:
    """The sampling error of the mean of ``rows``: their batch-to-batch scatter over √n.

    The scatter is read from successive differences (:func:`diff_sigma`, as spike detection reads
    noise), so the interval's own slow descent and a stray hard batch barely move it. Unlike a val
    loss over a fixed eval set, a train-loss mean moves by this much from batch luck alone.
    """
    if len(rows) < 3:
        return None
    return diff_sigma(rows) / float(np.sqrt(len(rows)))
