"""Loss-spike events: where the loss jumped, how high, and when it came back.

A point is flagged when it sits far above a rolling median of the points before it,
in units of a robust noise scale; flagged points close together form one event; the
event ends when the loss is back within noise of its pre-spike baseline. Both tests
are ratios, so flags do not change when the loss is scaled. Checkpoints saved inside
an event carry the spike in their weights and are not averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

# median(|x_i - x_{i-1}|) of i.i.d. normal noise is 0.954 sigma: this turns the robust
# spread of first differences (immune to the slow downward trend of a loss) into sigma.
DIFF_MAD_TO_SIGMA = 1.0 / 0.9539


def diff_sigma(values: np.ndarray) -> float:
    """The noise sigma of a series from the median of its absolute first differences (0.0 under two values).

    Robust to the series' slow trend and to a stray outlier, which a standard deviation is not.
    """
    diffs = np.abs(np.diff(values))
    return float(np.median(diffs)) * DIFF_MAD_TO_SIGMA if len(diffs) else 0.0


@dataclass(frozen=True, slots=True)
class SpikeConfig:
    """Parameters of spike detection (defaults suit per-step and windowed loss logs)."""

    window: int = 50           # samples in the rolling baseline before each point
    min_periods: int = 10      # samples needed before anything can be flagged
    threshold: float = 6.0     # robust z-score above the baseline that flags a point
    min_ratio: float = 1.05    # ... and at least this ratio to the baseline
    merge_gap: int = 10        # flagged samples this close belong to one event
    recovery_sigmas: float = 2.0  # back within this many noise units of the baseline = recovered
    recovery_patience: int = 3    # ... for this many consecutive samples
    # Under Adam with clipping the grad norm routinely doubles for a step and comes straight
    # back; only a larger jump says the optimiser left its basin. Loss ratios stay at min_ratio.
    grad_norm_min_ratio: float = 2.5
    end_at_last_high: bool = False  # end an event at its last sample above noise (sparse evals), not the first back


def sparse_config(config: SpikeConfig) -> SpikeConfig:
    """The same sensitivity for a sparse series such as one eval per checkpoint.

    A short baseline (the few evals before), no merging of separate evals into one event, and
    each event ends at its last eval still above noise: the checkpoint whose eval is back to
    normal is not held against it, since each eval measures its own checkpoint's weights.
    """
    return replace(config, window=8, min_periods=4, merge_gap=1, recovery_patience=1, end_at_last_high=True)


@dataclass(frozen=True, slots=True)
class LossSpike:
    """One spike event on one metric."""

    metric: str
    onset_after_step: int   # last unflagged sample before the event: weights after it may be hit
    start_step: int         # first flagged sample
    peak_step: int
    end_step: int           # first step back within noise of the baseline (or the last step)
    peak_value: float
    baseline: float         # rolling median before the event
    ratio: float            # peak / baseline
    recovered: bool         # False if the run ends before the metric came back

    def contains(self, step: int) -> bool:
        """True if a checkpoint saved at ``step`` was saved inside this event."""
        return self.onset_after_step < step <= self.end_step

    def describe(self) -> str:
        """A plain sentence for reasons and tooltips."""
        tail = f"recovered by step {self.end_step}" if self.recovered else "not recovered by the end of the log"
        return (f"{self.metric} spike at steps {self.start_step}-{self.end_step} "
                f"(peak {self.peak_value:.4g} at step {self.peak_step}, {self.ratio:.2f}x the baseline "
                f"{self.baseline:.4g}; {tail})")


def detect_spikes(steps: np.ndarray | pd.Series, values: np.ndarray | pd.Series, metric: str = "train_loss",
                  config: SpikeConfig = SpikeConfig()) -> tuple[LossSpike, ...]:
    """Find spike events in one metric.

    Args:
        steps: increasing step numbers.
        values: the metric at those steps; non-finite values count as flagged points.
        metric: name recorded on each event.
        config: sensitivity and windows.

    Returns:
        Events in step order.
    """
    steps = np.asarray(steps, dtype=np.int64)
    y = np.asarray(values, dtype=np.float64)
    if len(y) < config.min_periods + 1:
        return ()
    baseline, sigma = _rolling_baseline(y, config)
    finite = np.isfinite(y)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (y - baseline) / sigma
        flagged = (~finite) | ((z > config.threshold) & (y > baseline * config.min_ratio))
    flagged &= ~np.isnan(baseline) | ~finite
    groups = _group(np.flatnonzero(flagged), config.merge_gap)
    return tuple(_event(steps, y, baseline, sigma, g, metric, config) for g in groups)


def _rolling_baseline(y: np.ndarray, config: SpikeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Median of the preceding window, and a noise scale from first differences."""
    series = pd.Series(np.where(np.isfinite(y), y, np.nan))
    baseline = series.rolling(config.window, min_periods=config.min_periods).median().shift(1)
    diffs = series.diff().abs()
    spread = diffs.rolling(config.window, min_periods=config.min_periods).median().shift(1) * DIFF_MAD_TO_SIGMA
    # A floor keeps a perfectly flat stretch from making every wiggle a spike.
    sigma = np.maximum(spread.to_numpy(), np.abs(baseline.to_numpy()) * 1e-3)
    return baseline.to_numpy(), sigma


def _group(indices: np.ndarray, gap: int) -> list[np.ndarray]:
    """Split sorted indices wherever two neighbours are more than ``gap`` apart."""
    if len(indices) == 0:
        return []
    cuts = np.flatnonzero(np.diff(indices) > gap) + 1
    return np.split(indices, cuts)


def _event(steps: np.ndarray, y: np.ndarray, baseline: np.ndarray, sigma: np.ndarray,
           group: np.ndarray, metric: str, config: SpikeConfig) -> LossSpike:
    """Build one event from its flagged indices."""
    first, last = int(group[0]), int(group[-1])
    base, noise = baseline[first], sigma[first]
    window = y[first:last + 1]
    peak = first + int(np.nanargmax(np.where(np.isfinite(window), window, np.inf)))
    end_index, recovered = _recovery(y, last, base + config.recovery_sigmas * noise, config.recovery_patience)
    if config.end_at_last_high and recovered:
        end_index = max(last, end_index - 1)
    peak_value = float(y[peak])
    return LossSpike(
        metric=metric,
        onset_after_step=int(steps[first - 1]) if first > 0 else int(steps[first]) - 1,
        start_step=int(steps[first]), peak_step=int(steps[peak]), end_step=int(steps[end_index]),
        peak_value=peak_value, baseline=float(base),
        ratio=float(peak_value / base) if base else float("inf"), recovered=recovered,
    )


def _recovery(y: np.ndarray, last_flagged: int, ceiling: float, patience: int) -> tuple[int, bool]:
    """Index of the first of ``patience`` consecutive samples under ``ceiling`` after the event."""
    run = 0
    for i in range(last_flagged + 1, len(y)):
        run = run + 1 if np.isfinite(y[i]) and y[i] <= ceiling else 0
        if run == patience:
            return i - patience + 1, True
    return len(y) - 1, False
