"""Which checkpoints may be averaged, and how many of the newest of them: the window rules.

A checkpoint is eligible when its weights are finite, match the newest checkpoint's tensors and
were not saved inside a loss spike (unless forced); a recovery also leaves out those saved at or
after its cutoff. Of the eligible ones, the window is the newest stretch worth averaging: within
the newest LR regime, then the predicted weights when Adam's second moments give the iterate
noise, else those whose logged val loss lies within noise of the newest level and, on a curve still
falling by more than its noise per checkpoint (once its noise while the weights still travel one way),
within noise of the trend (issue 21).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument
from ..signals import CheckpointSignals, IterateNoise, RunSignals
from ..signals.spikes import diff_sigma
from .recommendation import RecommendConfig
from .trend import descent_per_checkpoint, trend_noise
from .span import resolve_span
from .weights import optimal_weights


@dataclass(frozen=True, slots=True)
class Cutoff:
    """Recovery: checkpoints at or after ``step`` are left out, for the reason ``why``."""

    step: int
    why: str


@dataclass(frozen=True, slots=True)
class Window:
    """The val-chosen window: how many newest eligible checkpoints, and the evidence."""

    size: int
    level: float | None      # val loss level of the newest checkpoints
    sigma: float | None      # val-loss noise
    why_stop: str | None     # why the next older one was left out
    stop_step: int | None = None  # the checkpoint where the window stopped
    noise: float | None = None           # iterate noise at the newest LR, when the window was predicted from it
    predicted_gain: float | None = None  # predicted nats below the newest checkpoint alone
    lag_cost: float | None = None        # weighted mean logged val excess of the window over the newest
    weights: tuple[float, ...] | None = None  # predicted weights of the newest ``size``, oldest first (zeros too)
    unweighted: tuple[tuple[int, str], ...] = ()  # (step, why) of checkpoints inside the window given no weight
    trend_sigma: float | None = None     # val-loss noise around the local trend (the falling-curve guard's)
    descent: float | None = None         # nats the val loss falls per checkpoint, where that exceeds the guard
    drift: float | None = None           # median cosine of consecutive updates, where it lowered the guard's margin
    span: str | None = None   # a window asked in tokens or steps, in words (issue 24)


def recovery_cutoff(signals: RunSignals, config: RecommendConfig) -> Cutoff:
    """Where a recovery must restart before: the user's step, else the onset of the newest loss spike.

    Raises:
        InvalidArgument: no step was given and the logs show no loss spike to recover from.
    """
    if config.before_step is not None:
        return Cutoff(config.before_step, f"at or after step {config.before_step}, where the recovery was asked to start")
    spikes = signals.loss_spikes
    limit = spikes[-1].onset_after_step + 1 if spikes else None
    abnormal = signals.first_abnormal(before_step=limit)   # a layer's weights went wrong first (issue 25)
    if abnormal is not None:
        return Cutoff(abnormal.ref.step, f"at or after step {abnormal.ref.step}, the first checkpoint whose weights "
                                         f"are abnormal ({abnormal.abnormal})")
    if not spikes:
        raise InvalidArgument("recovery restarts from before a loss spike, and the logs show none: "
                              "pass --before STEP to say where the run went wrong")
    spike = spikes[-1]
    return Cutoff(spike.onset_after_step + 1, f"saved after the {spike.describe()} began")


def is_eligible(item: CheckpointSignals, config: RecommendConfig) -> bool:
    """Whether a checkpoint may be averaged: finite, matching the newest, and outside a spike and with no layer in
    an abnormal state (issue 25) unless forced."""
    if not item.health.finite or item.mismatch is not None:
        return False
    return (item.spike is None and item.abnormal is None) or config.include_contaminated


def why_none_eligible(signals: RunSignals, cutoff: Cutoff | None = None) -> str:
    """The error message when no checkpoint may be averaged, naming what left them all out."""
    if not signals.checkpoints:
        return "the run has no checkpoints to average"
    if cutoff is not None:
        return (f"no checkpoint saved before step {cutoff.step} may be averaged "
                f"(none was saved earlier, or every earlier one is non-finite or mismatched)")
    return ("no checkpoint may be averaged: every one is non-finite, spike-contaminated or mismatched "
            "(see `analyze`); pass --include-contaminated to force contaminated ones")


def choose_window(eligible: list[CheckpointSignals], config: RecommendConfig,
                  noise: IterateNoise | None = None) -> Window:
    """How many of the newest eligible checkpoints to average, from logged val losses, LRs and iterate noise."""
    span = resolve_span(eligible, config.window_tokens, config.window_steps)
    if span is not None:
        if config.window is not None:
            raise InvalidArgument("give --window or a window length (--window-tokens, --window-steps), not both")
        return Window(span.size, None, None, span.describe, span=span.describe)
    if config.window is not None:
        if config.window < 1:
            raise InvalidArgument(f"window must be at least 1, got {config.window}")
        return Window(min(config.window, len(eligible)), None, None, None)
    regime = _lr_regime_size(eligible, config.lr_ratio_limit)
    in_regime = eligible[len(eligible) - regime.size:]
    predicted = _predicted_window(in_regime, noise, regime) if noise is not None else None
    if predicted is not None:
        return predicted
    vals = [s.val.value if s.val is not None else math.nan for s in in_regime]
    known = np.array([s.val.value for s in eligible if s.val is not None and math.isfinite(s.val.value)])
    if len(known) < 3 or sum(math.isfinite(v) for v in vals) < 1:
        if regime.why_stop is not None:
            return regime
        return Window(min(len(eligible), 3), None, None, "too few logged val losses to see a plateau")
    sigma = _noise(known)
    level = float(np.nanmin(vals[-3:])) if any(math.isfinite(v) for v in vals[-3:]) else float(known[-1])
    guard = _falling_guard(known, config.band_sigmas, drift_cosine(in_regime))
    ceiling = level + config.band_sigmas * sigma
    size = 0
    for value, stop_step in zip(reversed(vals), reversed([s.ref.step for s in in_regime])):
        if math.isfinite(value) and value > ceiling:
            return Window(max(size, 1), level, sigma,
                           f"{loss_kind(in_regime)} {value:.4f} is {value - level:.4f} above the newest level {level:.4f}, "
                           f"more than {config.band_sigmas:g} x noise ({sigma:.4f})", stop_step, **guard)
        if guard and math.isfinite(value) and value > level + config.band_sigmas * guard["trend_sigma"]:
            return Window(max(size, 1), level, sigma, _why_falling(value, level, guard, config, in_regime),
                           stop_step, **guard)
        size += 1
    return Window(size, level, sigma, regime.why_stop, regime.stop_step, **guard)


def _falling_guard(known: np.ndarray, band_sigmas: float, drift: float | None = None) -> dict[str, float]:
    """``{trend_sigma, descent[, drift]}`` when the val loss still falls by more than its noise around the trend
    per checkpoint by a margin (the window must then not reach back across a descent larger than that), else {}.

    The margin is ``band_sigmas`` x the noise, or 1 x while the weights still travel one way (``drift``, the
    newest updates' median cosine, above 0): then the descent is the run moving on, which an average lags
    behind, not noise it cancels. From val losses alone the two look the same (issue 21: a 300-step Trainer
    run averaged 0.011 nats worse than its last checkpoint at 2 x; high-LR runs whose updates alternate lost
    0.09 nats over 7 windows at 1 x). On a plateau the guard is off and the band's own noise decides alone.
    """
    noise = trend_noise(known)
    descent = descent_per_checkpoint(known)
    drifting = drift is not None and drift > 0
    if noise is None or descent <= (1.0 if drifting else band_sigmas) * noise:
        return {}
    return {"trend_sigma": noise, "descent": descent, **({"drift": drift} if drifting else {})}


def drift_cosine(items: list[CheckpointSignals], newest: int = 5) -> float | None:
    """The median cosine between consecutive updates of the newest ``newest`` checkpoints (None without one).

    Above 0 the run still travels one way (drift outweighs the iterates' noise); at or below 0 the updates
    alternate around a minimum. A median, so one odd step (a relaunch, a spike's neighbour) does not decide.
    """
    values = [i.update_cosine for i in items[-newest:] if i.update_cosine is not None and math.isfinite(i.update_cosine)]
    return float(np.median(values)) if values else None


def _why_falling(value: float, level: float, guard: dict[str, float], config: RecommendConfig,
                 items: list[CheckpointSignals]) -> str:
    """Why the falling-curve guard stopped the window, with the numbers."""
    margin = (f"more than its noise around the trend ({guard['trend_sigma']:.4f}) while the weights still travel "
              f"one way (median cosine of consecutive updates {guard['drift']:+.2f})" if "drift" in guard else
              f"more than {config.band_sigmas:g} x its noise around the trend ({guard['trend_sigma']:.4f})")
    return (f"{loss_kind(items)} {value:.4f} is {value - level:.4f} above the newest level {level:.4f} while the "
            f"loss still falls {guard['descent']:.4f} per checkpoint: {margin}, a descent that averaging would undo")


def _predicted_window(in_regime: list[CheckpointSignals], noise: IterateNoise, regime: Window) -> Window | None:
    """The weights of the newest checkpoints whose average has the lowest predicted loss, or None without a
    val loss and LR at the newest.

    Checkpoint k carries its centre's loss plus V_k, the jitter at its LR; an average with weights w keeps
    the weighted mean of the centres' losses (to first order along the path) and, the jitter being
    independent, Σ w_k² V_k of it. Relative to the newest alone the average is predicted at
    Σ w_k (val_k − val_newest − V_k) + Σ w_k² V_k, a quadratic whose minimum over weights that are ≥ 0
    and sum to 1 is exact (:func:`optimal_weights`): a checkpoint gets weight while its val excess over
    the newest stays under its own V_k plus a common cut. Under a steady drift the weights fall linearly
    with age; on a plateau they are uniform. The window cannot reach past a checkpoint without a val loss
    or LR to judge it by.
    """
    known: list[tuple[CheckpointSignals, float, float]] = []
    for item in reversed(in_regime):
        if item.val is None or not math.isfinite(item.val.value) or item.lr is None or item.lr <= 0:
            break
        known.append((item, item.val.value, noise.excess_at(item.lr)))
    if not known:
        return None
    excess = np.array([e for _, _, e in known])
    lag = np.array([v for _, v, _ in known]) - known[0][1]
    weights, cut = optimal_weights(lag - excess, excess)
    size = int(np.flatnonzero(weights)[-1]) + 1
    predicted = float(weights @ (lag - excess) + (weights ** 2) @ excess)
    kind = known[0][0].val.kind
    unweighted = tuple((item.ref.step, _why_no_weight(lag[k], excess[k], cut, kind))
                       for k, (item, _, _) in enumerate(known[:size]) if weights[k] == 0.0)
    fields = dict(noise=float(excess[0]), predicted_gain=max(0.0, -predicted), lag_cost=float(weights @ lag),
                  weights=tuple(float(w) for w in weights[:size][::-1]), unweighted=unweighted)
    if size < len(known):
        older = known[size][0]
        return Window(size, None, None, _why_no_weight(lag[size], excess[size], cut, kind), older.ref.step, **fields)
    if len(known) < len(in_regime):
        unjudged = in_regime[len(in_regime) - len(known) - 1]
        return Window(size, None, None, f"no val loss or LR was logged for step {unjudged.ref.step} to judge it by",
                       unjudged.ref.step, **fields)
    return Window(size, None, None, regime.why_stop, regime.stop_step, **fields)


def predicted_excess(items: list[CheckpointSignals], weights: tuple[float, ...] | np.ndarray,
                     noise: IterateNoise) -> float | None:
    """Predicted loss of the average of ``items`` (oldest first) with ``weights``, relative to the newest alone.

    The model of :func:`_predicted_window`, for any weighting (a decay-emulating one, say): Σ w_k (val_k −
    val_newest − V_k) + Σ w_k² V_k. None when a checkpoint with weight lacks a val loss or an LR.
    """
    w = np.asarray(weights, dtype=np.float64)
    known = [(s.val.value, noise.excess_at(s.lr)) for s in items
             if s.val is not None and math.isfinite(s.val.value) and s.lr is not None and s.lr > 0]
    if len(known) != len(items):
        return None
    val, excess = np.array([v for v, _ in known]), np.array([e for _, e in known])
    return float(w @ (val - val[-1] - excess) + (w ** 2) @ excess)


def predicted_choice(eligible: list[CheckpointSignals],
                     window: Window) -> tuple[list[CheckpointSignals], tuple[float, ...]]:
    """The checkpoints the predicted weights take (those given a weight above zero), oldest first, and those weights."""
    span = eligible[len(eligible) - window.size:]
    taken = [(s, w) for s, w in zip(span, window.weights) if w > 0.0]
    return [s for s, _ in taken], tuple(w for _, w in taken)


def loss_kind(items: list[CheckpointSignals]) -> str:
    """What the checkpoints' val scores are ("val loss", or "train loss" when the run logs none), for sentences."""
    return next((item.val.kind for item in items if item.val is not None), "val loss")


def _why_no_weight(lag: float, excess: float, cut: float, kind: str) -> str:
    """Why the predicted weights give a checkpoint none, with the numbers (``kind``: "val loss" or "train loss")."""
    return (f"the predicted weights give it none: its logged {kind} lies {lag:.4f} nats above the newest, "
            f"and a checkpoint gets weight only below its iterate noise ({excess:.4f} nats at its LR) "
            f"{'plus' if cut >= 0 else 'minus'} {abs(cut):.4f}, the cut at which the weights sum to 1")


def _lr_regime_size(eligible: list[CheckpointSignals], limit: float) -> Window:
    """The newest checkpoints saved at a learning rate within ``limit`` x the newest one's.

    Weight averaging acts like a lower learning rate; an LR decay already did that, so a
    checkpoint from before the decay carries more noise than the annealed newest one and
    averaging it in pulls the result back (the end of a warmup-stable-decay run, say).
    """
    newest = eligible[-1].lr
    if newest is None or newest <= 0:
        return Window(len(eligible), None, None, None)
    size = 0
    for item in reversed(eligible):
        if item.lr is not None and item.lr > limit * newest:
            return Window(max(size, 1), None, None,
                           f"it was saved at LR {item.lr:.3g}, {item.lr / newest:.1f} x the newest checkpoint's "
                           f"{newest:.3g}: averaging across an LR decay pulls the annealed weights back",
                           item.ref.step)
        size += 1
    return Window(size, None, None, None)


def _noise(values: np.ndarray) -> float:
    """The typical step-to-step change of the recent val losses (robust: a median of first differences).

    It holds both the checkpoint-to-checkpoint scatter and the recent descent per checkpoint, which
    is the scale that matters: a checkpoint whose val loss is within a couple of typical steps of the
    newest level is still part of the recent stretch of training that averaging smooths.
    """
    sigma = diff_sigma(values[-min(len(values), 16):])
    return max(sigma, 1e-4 * float(np.median(np.abs(values))))
