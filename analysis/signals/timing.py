"""Step timing: steady-state step time, and what evaluation and checkpoint saves cost.

Logs that time every iteration (nanoGPT's ``time``, Megatron's ``elapsed time per
iteration``, build-nanogpt's ``dt``) show a few iterations many times slower than the
rest: those that also ran an evaluation or saved a checkpoint. This module separates
them: the steady step time is the median of the ordinary iterations, each slow
iteration is matched to the eval/checkpoint events logged between the previous timed
step and its own, and its cost is its time above the steady one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# Metrics whose presence at a step means "an evaluation ran there".
EVAL_PREFIXES = ("val_", "val/", "valid", "eval", "hellaswag")
CHECKPOINT_METRIC = "checkpoint_saved"


@dataclass(frozen=True, slots=True)
class SlowIteration:
    """One iteration much slower than the steady state."""

    step: int
    step_ms: float
    extra_ms: float   # step_ms - steady step time
    kind: str         # "eval" | "checkpoint" | "eval+checkpoint" | "warmup" | "other"


@dataclass(frozen=True, slots=True)
class StepTiming:
    """Where a run's wall time went, from its logged step times."""

    source: str | None                # "step_time_ms" | "wall_time" | None (no timing in the logs)
    timed_points: int
    steady_step_ms: float | None      # median of the ordinary iterations
    slow_factor: float                # an iteration is slow above slow_factor x the overall median
    slow: tuple[SlowIteration, ...]
    eval_cost_ms: float | None        # median extra time of an eval iteration
    checkpoint_cost_ms: float | None  # median extra time of a checkpoint-save iteration
    eval_checkpoint_cost_ms: float | None  # median extra of iterations doing both
    total_ms: float | None            # estimated wall time of the timed span
    eval_share: float | None          # fractions of total_ms
    checkpoint_share: float | None
    eval_checkpoint_share: float | None
    other_slow_share: float | None    # slow iterations with no logged event (data loading, GC...)
    warmup_ms: float | None           # the first timed iteration's extra (compilation), not in the shares

    def describe_shares(self) -> str:
        """The shares of wall time measured, in words; a share never measured is said so, not printed as 0.0 %.

        Where every save ran in an eval's iteration, the save's own cost cannot be told apart (issue 21).
        """
        parts = [f"{label} {100 * (share or 0.0):.1f}%" for label, cost, share in (
            ("eval", self.eval_cost_ms, self.eval_share), ("checkpoint", self.checkpoint_cost_ms, self.checkpoint_share),
            ("eval and checkpoint together", self.eval_checkpoint_cost_ms, self.eval_checkpoint_share))
            if cost is not None]
        text = f"{', '.join(parts)} of wall time" if parts else "no slow iteration ran an eval or a save"
        if self.checkpoint_cost_ms is None and self.eval_checkpoint_cost_ms is not None:
            text += "; checkpoint time not separable: every save coincided with an eval"
        return text


def analyze_step_times(run_or_metrics_frame, *, slow_factor: float = 2.0) -> StepTiming:
    """Split step times into steady iterations and eval/checkpoint/other slow ones.

    Args:
        run_or_metrics_frame: a :class:`~analysis.run.Run` or a tidy metrics frame
            (``step``, ``metric``, ``value``, ``wall_time``).
        slow_factor: an iteration slower than this many times the median is "slow".

    Returns:
        A :class:`StepTiming`; its fields are None when the logs carry no timing.
    """
    frame = getattr(run_or_metrics_frame, "metrics", run_or_metrics_frame)
    times, source = _step_times(frame)
    if len(times) < 3:
        return _empty(source, len(times), slow_factor)
    steps, values = times["step"].to_numpy(), times["value"].to_numpy()
    median = float(np.median(values))
    is_slow = values > slow_factor * median
    steady = float(np.median(values[~is_slow])) if (~is_slow).any() else median
    evals, ckpts = _event_steps(frame)
    previous = np.concatenate([[steps[0] - 1], steps[:-1]])
    slow = tuple(
        SlowIteration(int(steps[i]), float(values[i]), float(values[i] - steady),
                      "warmup" if i == 0 else _kind(previous[i], steps[i], evals, ckpts))
        for i in np.flatnonzero(is_slow)
    )
    return _summarise(source, len(times), steady, slow_factor, slow, int(steps[-1] - steps[0] + 1))


def _step_times(frame: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """(step, value ms) rows sorted by step, from step_time_ms or else wall-time differences."""
    rows = frame[frame["metric"] == "step_time_ms"][["step", "value"]]
    rows = rows[np.isfinite(rows["value"]) & (rows["value"] > 0)]
    if len(rows) >= 3:
        return rows.sort_values("step").drop_duplicates("step", keep="last").reset_index(drop=True), "step_time_ms"
    walls = frame[np.isfinite(frame["wall_time"])].groupby("step")["wall_time"].max().sort_index()
    if len(walls) < 4:
        return rows.iloc[0:0], None
    gaps = np.diff(walls.index.to_numpy())
    ms = np.diff(walls.to_numpy()) * 1000.0 / np.where(gaps > 0, gaps, 1)
    derived = pd.DataFrame({"step": walls.index.to_numpy()[1:], "value": ms})
    return derived[derived["value"] > 0].reset_index(drop=True), "wall_time"


def _event_steps(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Sorted steps at which an evaluation ran, and at which a checkpoint was saved."""
    names = frame["metric"].astype(str)
    evals = frame.loc[names.str.startswith(EVAL_PREFIXES), "step"].unique()
    ckpts = frame.loc[names == CHECKPOINT_METRIC, "step"].unique()
    return np.sort(evals), np.sort(ckpts)


def _kind(previous: int, step: int, evals: np.ndarray, ckpts: np.ndarray) -> str:
    """What ran inside the slow iteration: events logged in [previous timed step, step]."""
    has_eval = _any_between(evals, previous, step)
    has_ckpt = _any_between(ckpts, previous, step)
    if has_eval and has_ckpt:
        return "eval+checkpoint"
    return "eval" if has_eval else "checkpoint" if has_ckpt else "other"


def _any_between(sorted_steps: np.ndarray, low: int, high: int) -> bool:
    i = np.searchsorted(sorted_steps, low, side="left")
    return bool(i < len(sorted_steps) and sorted_steps[i] <= high)


def _summarise(source: str | None, points: int, steady: float, factor: float,
               slow: tuple[SlowIteration, ...], span_steps: int) -> StepTiming:
    """Costs per kind and their shares of the estimated wall time."""
    def extras(kind: str) -> list[float]:
        return [s.extra_ms for s in slow if s.kind == kind]

    total = steady * span_steps + sum(s.extra_ms for s in slow if s.kind != "warmup")

    def share(kind: str) -> float:
        return sum(extras(kind)) / total if total > 0 else 0.0

    def median(kind: str) -> float | None:
        return float(np.median(extras(kind))) if extras(kind) else None

    warm = extras("warmup")
    return StepTiming(
        source=source, timed_points=points, steady_step_ms=steady, slow_factor=factor, slow=slow,
        eval_cost_ms=median("eval"), checkpoint_cost_ms=median("checkpoint"),
        eval_checkpoint_cost_ms=median("eval+checkpoint"), total_ms=total,
        eval_share=share("eval"), checkpoint_share=share("checkpoint"),
        eval_checkpoint_share=share("eval+checkpoint"), other_slow_share=share("other"),
        warmup_ms=warm[0] if warm else None,
    )


def _empty(source: str | None, points: int, factor: float) -> StepTiming:
    return StepTiming(source, points, None, factor, (), None, None, None, None, None, None, None, None, None)
