"""Which checkpoints to average, with what weights, and why — for every checkpoint.

Without an evaluator the averaging window comes from the logs and the optimizer state. When the
newest checkpoint saved Adam's second moments, the loss its weight jitter costs (V, see
``signals.noise``) is known, and the weights are those whose average has the lowest predicted
loss: the older checkpoints' logged val losses say what their lag costs, V what averaging wins
back. Without optimizer state, the newest eligible checkpoints whose val loss lies within noise of
the newest level form the plateau worth averaging; older, clearly worse ones would pull the
average back. With an evaluator, candidate averages (the predicted weights first, then windows,
EMAs and a greedy soup) are scored and the best is kept — and the last checkpoint alone wins
whenever no average beats it, so averaging never makes the user's model worse than what they have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .errors import InvalidArgument, NotEnoughCheckpoints
from .evaluate import Evaluator
from .run import CheckpointRef
from .signals import CheckpointSignals, IterateNoise, RunSignals
from .signals.spikes import diff_sigma

METHODS = ("auto", "sma", "ema", "wma", "soup", "recovery")
# Window sizes an evaluator search tries first (after the predicted weights and the log-chosen window), newest-first suffixes;
# then every other size, then EMA over all eligible checkpoints, then a greedy soup, budget allowing.
_SEARCH_WINDOWS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_SEARCH_EMA_ALPHAS = (0.5, 0.3, 0.2, 0.1)


@dataclass(frozen=True, slots=True)
class RecommendConfig:
    """Parameters of a recommendation (no logic here)."""

    method: str = "auto"          # auto | sma | ema | wma | soup
    window: int | None = None     # average the newest N eligible checkpoints instead of choosing
    ema_alpha: float = 0.3        # weight of the newest checkpoint under EMA
    band_sigmas: float = 2.0      # val-loss noise units that still count as "on the plateau"
    max_evals: int | None = None  # evaluator calls allowed (default 2 x checkpoints)
    output_dtype: str = "same"
    include_contaminated: bool = False  # average spike-contaminated checkpoints too (forced)
    lr_ratio_limit: float = 2.0   # checkpoints saved at more than this x the newest LR are another regime
    before_step: int | None = None  # recovery: only checkpoints saved before this step (default: the last spike)


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one checkpoint."""

    step: int
    path: str
    taken: bool
    weight: float
    reason: str   # a plain sentence, shown verbatim in the UI


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Checkpoints to average with their weights, and a reason for every checkpoint."""

    method: str
    checkpoints: tuple[CheckpointRef, ...]
    weights: tuple[float, ...]               # sum to 1.0, oldest first
    decisions: tuple[Decision, ...]          # one per checkpoint of the run, in step order
    evaluations: int                         # candidates scored (those read from --eval-cache included)
    score: float | None                      # evaluator score of the recommendation (lower is better)
    last_score: float | None                 # evaluator score of the last eligible checkpoint alone
    summary: str
    iterate_noise: float | None = None       # nats of iterate noise at the newest LR (Adam state), if known
    predicted_gain: float | None = None      # nats below the last checkpoint, predicted from logs and noise
    evaluations_cached: int = 0              # of ``evaluations``, scores read from the evaluator's disk cache
    basis: str = ""                          # how the weights were chosen: evaluator | predicted | val band | window | default
    basis_note: str = ""                     # that in a sentence, with what would choose better when anything would
    stand_in_error: float | None = None      # nats of sampling error of a train-loss stand-in (a run without val)

    @property
    def reasons(self) -> dict[str, str]:
        """str(step) -> reason, as stored in a recipe."""
        return {str(d.step): d.reason for d in self.decisions}


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


@dataclass(frozen=True, slots=True)
class _Cutoff:
    """Recovery: checkpoints at or after ``step`` are left out, for the reason ``why``."""

    step: int
    why: str


@dataclass(frozen=True, slots=True)
class _Window:
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


def recommend(signals: RunSignals, config: RecommendConfig = RecommendConfig(), evaluator: Evaluator | None = None,
              progress: Callable[[float, str], None] | None = None) -> Recommendation:
    """Recommend checkpoints to average.

    Raises:
        NotEnoughCheckpoints: no checkpoint may be averaged.
        InvalidArgument: unknown method, or soup without an evaluator.
    """
    if config.method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    if config.method == "soup" and evaluator is None:
        raise InvalidArgument("the soup method adds checkpoints only when an evaluator says it helps: pass --eval")
    cutoff = _recovery_cutoff(signals, config) if config.method == "recovery" else None
    eligible = [s for s in signals.checkpoints
                if _eligible(s, config) and (cutoff is None or s.ref.step < cutoff.step)]
    if not eligible:
        raise NotEnoughCheckpoints(_why_none_eligible(signals, cutoff))
    window = _choose_window(eligible, config, signals.noise)
    if evaluator is None:
        if window.weights is not None and config.method in ("auto", "recovery"):
            chosen, weights = _predicted_choice(eligible, window)
            return _finish(signals, config, "predicted", chosen, weights, window, None, None, 0, None, cutoff)
        span = eligible[len(eligible) - window.size:]
        method = config.method if config.method in ("sma", "ema", "wma") else "sma"
        weights = policy_weights(method, len(span), config.ema_alpha)
        return _finish(signals, config, method, span, weights, window, None, None, 0, None, cutoff)
    return _recommend_with_evaluator(signals, eligible, window, config, evaluator, progress, cutoff)


def _recovery_cutoff(signals: RunSignals, config: RecommendConfig) -> _Cutoff:
    """Where a recovery must restart before: the user's step, else the onset of the newest loss spike.

    Raises:
        InvalidArgument: no step was given and the logs show no loss spike to recover from.
    """
    if config.before_step is not None:
        return _Cutoff(config.before_step, f"at or after step {config.before_step}, where the recovery was asked to start")
    spikes = signals.loss_spikes
    if not spikes:
        raise InvalidArgument("recovery restarts from before a loss spike, and the logs show none: "
                              "pass --before STEP to say where the run went wrong")
    spike = spikes[-1]
    return _Cutoff(spike.onset_after_step + 1, f"saved after the {spike.describe()} began")


def _eligible(item: CheckpointSignals, config: RecommendConfig) -> bool:
    if not item.health.finite or item.mismatch is not None:
        return False
    return item.spike is None or config.include_contaminated


def _why_none_eligible(signals: RunSignals, cutoff: _Cutoff | None = None) -> str:
    if not signals.checkpoints:
        return "the run has no checkpoints to average"
    if cutoff is not None:
        return (f"no checkpoint saved before step {cutoff.step} may be averaged "
                f"(none was saved earlier, or every earlier one is non-finite or mismatched)")
    return ("no checkpoint may be averaged: every one is non-finite, spike-contaminated or mismatched "
            "(see `analyze`); pass --include-contaminated to force contaminated ones")


def _choose_window(eligible: list[CheckpointSignals], config: RecommendConfig,
                   noise: IterateNoise | None = None) -> _Window:
    """How many of the newest eligible checkpoints to average, from logged val losses, LRs and iterate noise."""
    if config.window is not None:
        if config.window < 1:
            raise InvalidArgument(f"window must be at least 1, got {config.window}")
        return _Window(min(config.window, len(eligible)), None, None, None)
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
        return _Window(min(len(eligible), 3), None, None, "too few logged val losses to see a plateau")
    sigma = _noise(known)
    level = float(np.nanmin(vals[-3:])) if any(math.isfinite(v) for v in vals[-3:]) else float(known[-1])
    ceiling = level + config.band_sigmas * sigma
    size = 0
    for value, stop_step in zip(reversed(vals), reversed([s.ref.step for s in in_regime])):
        if math.isfinite(value) and value > ceiling:
            return _Window(max(size, 1), level, sigma,
                           f"{_loss_kind(in_regime)} {value:.4f} is {value - level:.4f} above the newest level {level:.4f}, "
                           f"more than {config.band_sigmas:g} x noise ({sigma:.4f})", stop_step)
        size += 1
    return _Window(size, level, sigma, regime.why_stop, regime.stop_step)


def _predicted_window(in_regime: list[CheckpointSignals], noise: IterateNoise, regime: _Window) -> _Window | None:
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
        return _Window(size, None, None, _why_no_weight(lag[size], excess[size], cut, kind), older.ref.step, **fields)
    if len(known) < len(in_regime):
        unjudged = in_regime[len(in_regime) - len(known) - 1]
        return _Window(size, None, None, f"no val loss or LR was logged for step {unjudged.ref.step} to judge it by",
                       unjudged.ref.step, **fields)
    return _Window(size, None, None, regime.why_stop, regime.stop_step, **fields)


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


def _loss_kind(items: list[CheckpointSignals]) -> str:
    """What the checkpoints' val scores are ("val loss", or "train loss" when the run logs none), for sentences."""
    return next((item.val.kind for item in items if item.val is not None), "val loss")


def _why_no_weight(lag: float, excess: float, cut: float, kind: str) -> str:
    """Why the predicted weights give a checkpoint none, with the numbers (``kind``: "val loss" or "train loss")."""
    return (f"the predicted weights give it none: its logged {kind} lies {lag:.4f} nats above the newest, "
            f"and a checkpoint gets weight only below its iterate noise ({excess:.4f} nats at its LR) "
            f"{'plus' if cut >= 0 else 'minus'} {abs(cut):.4f}, the cut at which the weights sum to 1")


def _lr_regime_size(eligible: list[CheckpointSignals], limit: float) -> _Window:
    """The newest checkpoints saved at a learning rate within ``limit`` x the newest one's.

    Weight averaging acts like a lower learning rate; an LR decay already did that, so a
    checkpoint from before the decay carries more noise than the annealed newest one and
    averaging it in pulls the result back (the end of a warmup-stable-decay run, say).
    """
    newest = eligible[-1].lr
    if newest is None or newest <= 0:
        return _Window(len(eligible), None, None, None)
    size = 0
    for item in reversed(eligible):
        if item.lr is not None and item.lr > limit * newest:
            return _Window(max(size, 1), None, None,
                           f"it was saved at LR {item.lr:.3g}, {item.lr / newest:.1f} x the newest checkpoint's "
                           f"{newest:.3g}: averaging across an LR decay pulls the annealed weights back",
                           item.ref.step)
        size += 1
    return _Window(size, None, None, None)


def _noise(values: np.ndarray) -> float:
    """The typical step-to-step change of the recent val losses (robust: a median of first differences).

    It holds both the checkpoint-to-checkpoint scatter and the recent descent per checkpoint, which
    is the scale that matters: a checkpoint whose val loss is within a couple of typical steps of the
    newest level is still part of the recent stretch of training that averaging smooths.
    """
    sigma = diff_sigma(values[-min(len(values), 16):])
    return max(sigma, 1e-4 * float(np.median(np.abs(values))))


def _recommend_with_evaluator(signals: RunSignals, eligible: list[CheckpointSignals], window: _Window,
                              config: RecommendConfig, evaluator: Evaluator,
                              progress: Callable[[float, str], None] | None,
                              cutoff: _Cutoff | None = None) -> Recommendation:
    """Score candidates within the evaluation budget and keep the best (or the last alone)."""
    budget = config.max_evals if config.max_evals is not None else 2 * len(signals.checkpoints)
    refs = [s.ref for s in eligible]
    start_calls, start_cached = evaluator.calls, evaluator.from_store
    last_score = evaluator.score(refs[-1:], (1.0,), config.output_dtype)
    best: tuple[float, str, list[CheckpointSignals], tuple[float, ...]] = (last_score, "sma", eligible[-1:], (1.0,))
    if window.weights is not None and config.method in ("auto", "recovery"):
        best = min(best, _score_predicted(eligible, window, evaluator, config.output_dtype, progress),
                   key=lambda choice: choice[0])
    if config.method == "soup":
        candidates: list[tuple[str, int, float]] = []
    elif config.method in ("auto", "recovery"):
        candidates = _search_candidates(len(eligible), window.size)
    else:
        candidates = [(config.method, window.size, config.ema_alpha)] if window.size > 1 else []
    for index, (method, k, alpha) in enumerate(candidates):
        if evaluator.calls - start_calls >= budget:
            break
        weights = policy_weights(method, k, alpha)
        score = evaluator.score(refs[-k:], weights, config.output_dtype)
        if progress is not None:
            label = f"EMA (alpha {alpha:g})" if method == "ema" else method.upper()
            progress((index + 1) / max(len(candidates), 1), f"{label} of the newest {k}: {score:.4f}")
        if score < best[0]:
            best = (score, method, eligible[-k:], weights)
    if config.method in ("soup", "auto", "recovery") and evaluator.calls - start_calls < budget:
        soup = _greedy_soup(eligible, evaluator, last_score, budget, start_calls, config.output_dtype)
        if soup[0] < best[0]:
            best = soup
    score, method, chosen, weights = best
    calls = evaluator.calls - start_calls
    rec = _finish(signals, config, method, chosen, weights, window, score, last_score, calls, evaluator, cutoff)
    return replace(rec, evaluations_cached=evaluator.from_store - start_cached)


def _score_predicted(eligible: list[CheckpointSignals], window: _Window, evaluator: Evaluator, dtype: str,
                     progress: Callable[[float, str], None] | None,
                     ) -> tuple[float, str, list[CheckpointSignals], tuple[float, ...]]:
    """The evaluator's score of the predicted weights, the first candidate searched.

    The prediction from the logs and Adam's second moments is a soft window that no uniform window
    or EMA equals; where the evaluator agrees with it, one call finds what the ladder of windows
    would only approach.
    """
    chosen, weights = _predicted_choice(eligible, window)
    score = evaluator.score([s.ref for s in chosen], weights, dtype)
    if progress is not None:
        progress(0.0, f"predicted weights over the newest {len(chosen)}: {score:.4f}")
    return score, "predicted", chosen, weights


def _predicted_choice(eligible: list[CheckpointSignals],
                      window: _Window) -> tuple[list[CheckpointSignals], tuple[float, ...]]:
    """The checkpoints the predicted weights take (those given a weight above zero), oldest first, and those weights."""
    span = eligible[len(eligible) - window.size:]
    taken = [(s, w) for s, w in zip(span, window.weights) if w > 0.0]
    return [s for s, _ in taken], tuple(w for _, w in taken)


def _search_candidates(count: int, val_window: int) -> list[tuple[str, int, float]]:
    """(method, newest N, alpha) to score, most promising first, so a small budget still finds a good one.

    The val-chosen window, a geometric ladder of windows, every remaining window size, and EMA
    over every eligible checkpoint at a few alphas (a soft window that no uniform one equals).
    """
    sizes = [val_window] + list(_SEARCH_WINDOWS) + list(range(2, count + 1))
    ordered = [k for i, k in enumerate(sizes) if 1 < k <= count and k not in sizes[:i]]
    emas = [("ema", count, a) for a in _SEARCH_EMA_ALPHAS] if count > 2 else []
    return [("sma", k, 0.0) for k in ordered] + emas


def _greedy_soup(eligible: list[CheckpointSignals], evaluator: Evaluator, last_score: float, budget: int,
                 start_calls: int, dtype: str) -> tuple[float, str, list[CheckpointSignals], tuple[float, ...]]:
    """Newest first, add each older checkpoint only if the uniform average improves."""
    members = [eligible[-1]]
    best = last_score
    for candidate in reversed(eligible[:-1]):
        if evaluator.calls - start_calls >= budget:
            break
        trial = [candidate] + members
        score = evaluator.score([s.ref for s in trial], policy_weights("sma", len(trial)), dtype)
        if score < best:
            members, best = trial, score
    return best, "soup", members, policy_weights("sma", len(members))


def _finish(signals: RunSignals, config: RecommendConfig, method: str, chosen: list[CheckpointSignals],
            weights: tuple[float, ...], window: _Window, score: float | None, last_score: float | None,
            calls: int, evaluator: Evaluator | None, cutoff: _Cutoff | None = None) -> Recommendation:
    """Assemble the recommendation and a reason for every checkpoint.

    ``method`` is how the weights were made (sma, ema, wma, soup, predicted); a recovery is reported as
    ``recovery`` while its summary still names that averaging.
    """
    weight_of = {s.ref.step: w for s, w in zip(chosen, weights)}
    oldest_taken = chosen[0].ref.step
    decisions = _with_unreadable(signals, tuple(
        Decision(s.ref.step, str(s.ref.path), s.ref.step in weight_of, weight_of.get(s.ref.step, 0.0),
                 _reason(s, weight_of, oldest_taken, window, config, evaluator is not None, method == "predicted",
                         cutoff))
        for s in signals.checkpoints
    ))
    summary = _summary(method, chosen, weights, score, last_score, window, evaluator, config.window is not None)
    if cutoff is not None:
        summary = f"Recovery from before step {cutoff.step}: {summary}"
    name = "recovery" if cutoff is not None else method
    noise = signals.noise.excess_at(chosen[-1].lr) if signals.noise is not None and chosen[-1].lr else None
    # The prediction is for the predicted weights; other weights or an evaluator's choice have none.
    gain = window.predicted_gain if evaluator is None and method == "predicted" else None
    stand_in_error = stand_in_sampling_error(signals)
    basis, note = _basis(signals, config, window, evaluator, method, calls, stand_in_error)
    return Recommendation(name, tuple(s.ref for s in chosen), tuple(weights), decisions, calls, score,
                          last_score, summary, noise, gain, basis=basis, basis_note=note,
                          stand_in_error=stand_in_error)


def _with_unreadable(signals: RunSignals, decisions: tuple[Decision, ...]) -> tuple[Decision, ...]:
    """The decisions plus one "not taken" per checkpoint that could not be read, in step order (issue 19).

    One without a step in its name is placed after the newest, as discovery places unnumbered ones.
    """
    bad = [u for u in signals.unreadable if u.kind == "checkpoint"]
    newest = max([d.step for d in decisions] + [u.step for u in bad if u.step is not None], default=-1)
    steps = [u.step if u.step is not None else newest + 1 + i for i, u in enumerate(bad)]
    extra = [Decision(step, str(u.path), False, 0.0, f"Left out: {u.status}: {u.reason.rstrip('.')}.")
             for step, u in zip(steps, bad)]
    # On a shared step the readable checkpoint's decision comes last, so a {step: reason} map keeps it.
    return tuple(sorted(extra + list(decisions), key=lambda d: (d.step, d in decisions)))


def _basis(signals: RunSignals, config: RecommendConfig, window: _Window, evaluator: Evaluator | None,
           method: str, calls: int, stand_in_error: float | None) -> tuple[str, str]:
    """How the weights were chosen, and a sentence saying so.

    Without an evaluator and without Adam's second moments the window comes from a heuristic that
    measurably averages too few checkpoints of bigger models (README, "How good the choice is"), so
    the sentence then names what is missing and what the user can do about it.
    """
    if evaluator is not None:
        return "evaluator", (f"Measured: the evaluator scored {calls} candidates (the last checkpoint alone among "
                             "them) and the best was kept.")
    if config.window is not None:
        return "window", f"The newest {config.window} eligible checkpoints, as asked (--window)."
    losses = ("train losses (the run logs no val loss)"
              if any(c.val is not None and c.val.source == "train" for c in signals.checkpoints) else "val losses")
    luck = _stand_in_luck(stand_in_error, window.noise)
    if window.weights is not None:
        asked = "" if method == "predicted" else f" The {method} weights over that window were asked for (--method)."
        return "predicted", (f"From logged {losses}, LRs and the optimizer's second moments, a model's prediction."
                             f"{asked}{luck} --eval FILE.py:FUNC measures candidate averages instead.")
    if window.sigma is not None:
        basis, lead = "val band", f"From logged {losses} and LRs, a heuristic"
    else:
        basis, lead = "default", "Too few logged losses to see a plateau, so the newest few within the LR regime"
    if signals.noise is None:
        missing = ("no checkpoint from the second half of the run kept Adam's second moments (exp_avg_sq), so "
                   "the loss that averaging wins back is unknown")
        fix = "keep the optimizer state with the newest checkpoint for predicted weights"
    elif not signals.checkpoints[-1].lr:
        missing = (f"Adam's second moments were read (step {signals.noise.step}) but the newest checkpoint's LR is "
                   "in neither the logs nor its optimizer state, so their noise cannot be put in nats")
        fix = "log the LR for predicted weights"
    else:
        missing = "the newest checkpoint has no logged loss to weigh older ones against"
        fix = "log a val loss at each save for predicted weights"
    return basis, (f"{lead}: {missing}, and such windows hold too few checkpoints of bigger models.{luck} To do "
                   f"better, {fix}, or pass --eval FILE.py:FUNC to measure candidate averages.")


def stand_in_sampling_error(signals: RunSignals) -> float | None:
    """The typical sampling error (nats) of the newest checkpoints' train-loss stand-ins, or None.

    The median over the newest eight, the checkpoints a recommendation weighs: each mean train loss
    moves by this much from the batches it happened to meet, which a val loss over a fixed set does not.
    """
    errors = [c.val.stderr for c in signals.checkpoints[-8:]
              if c.val is not None and c.val.source == "train" and c.val.stderr is not None]
    return float(np.median(errors)) if errors else None


def _stand_in_luck(error: float | None, noise: float | None) -> str:
    """For a train-loss stand-in (``error``: its sampling error), a sentence on how much of the checkpoints'
    differences is batch luck: when the sampling error is near the iterate noise the weights follow luck
    (the benchmark's cosine runs, README), so the user sees both numbers."""
    if error is None:
        return ""
    against = f", against {noise:.4f} nats of iterate noise at the newest LR" if noise is not None else ""
    return (f" Each checkpoint's train-loss mean carries about {error:.4f} nats of sampling "
            f"error from the batches it met{against}; differences between checkpoints of that size are luck.")


def _reason(item: CheckpointSignals, weight_of: dict[int, float], oldest_taken: int, window: _Window,
            config: RecommendConfig, evaluated: bool, predicted: bool, cutoff: _Cutoff | None = None) -> str:
    """Why this checkpoint was taken or left out, in one or two plain sentences.

    ``predicted``: the chosen weights are the predicted ones, whose zero weights have their own reasons.
    """
    val = f" ({item.val.describe()})" if item.val is not None else ""
    if cutoff is not None and item.ref.step >= cutoff.step:
        return f"Left out: {cutoff.why}; a recovery restarts from weights saved before step {cutoff.step}."
    if not item.health.finite:
        names = ", ".join(item.health.nonfinite_tensors[:3])
        return f"Left out: NaN/Inf in {len(item.health.nonfinite_tensors)} tensors ({names}); it would poison the average."
    if item.mismatch is not None:
        return f"Left out: its tensors differ from the newest checkpoint's: {item.mismatch}."
    if item.spike is not None and not config.include_contaminated:
        return f"Left out: saved inside a {item.spike.describe()}; its weights carry the spike."
    if item.ref.step in weight_of:
        weight = weight_of[item.ref.step]
        forced = " Forced in despite a spike." if item.spike is not None else ""
        cleared = f" {item.cleared.describe()}." if item.cleared is not None else ""
        return f"Taken with weight {weight:.3f}{val}.{forced}{cleared}"
    unweighted = dict(window.unweighted).get(item.ref.step) if predicted else None
    if unweighted is not None:
        return f"Left out: {unweighted}."
    if item.ref.step > oldest_taken:
        return f"Left out: the evaluator found averages without it score better{val}."
    if window.stop_step == item.ref.step and window.noise is not None and (predicted or not evaluated):
        return f"Left out: the averaging window stops here, as {window.why_stop}."   # the prediction's numbers
    if evaluated:
        return f"Left out: older than the best-scoring window found by the evaluator{val}."
    if window.stop_step == item.ref.step:
        return f"Left out: the averaging window stops here: {window.why_stop}; older checkpoints would pull the average back."
    if window.stop_step is not None:
        return f"Left out: older than the averaging window, which stops at step {window.stop_step}{val}."
    return f"Left out: older than the averaging window of the newest {window.size}{val}."


def _summary(method: str, chosen: list[CheckpointSignals], weights: tuple[float, ...], score: float | None,
             last_score: float | None, window: _Window, evaluator: Evaluator | None, asked_window: bool = False) -> str:
    steps = f"{chosen[0].ref.step}-{chosen[-1].ref.step}" if len(chosen) > 1 else f"{chosen[0].ref.step}"
    if len(chosen) == 1 and evaluator is not None:
        return (f"Keep the last checkpoint (step {steps}) alone: no average scored better than its "
                f"{last_score:.4f} with {evaluator.name}.")
    if len(chosen) == 1 and evaluator is None:
        return (f"Keep the last checkpoint (step {steps}) alone: the next older one was left out because "
                f"{window.why_stop or 'the window holds one checkpoint'}.")
    head = (f"Predicted weights over {len(chosen)} checkpoints (steps {steps})" if method == "predicted"
            else f"{method.upper()} of {len(chosen)} checkpoints (steps {steps})")
    if score is not None and last_score is not None:
        return f"{head}: {evaluator.name} scores {score:.4f} vs {last_score:.4f} for the last checkpoint alone."
    if method == "predicted" and window.predicted_gain is not None:
        return (f"Predicted weights over {len(chosen)} checkpoints (steps {steps}; newest {weights[-1]:.3f}, "
                f"oldest {weights[0]:.3f}): predicted {window.predicted_gain:.4f} nats below the last checkpoint "
                f"alone; averaging cancels most of the iterate noise ({window.noise:.4f} nats at the newest LR, "
                f"from Adam's second moments) while their logged {_loss_kind(chosen)}es lie {window.lag_cost:.4f} nats above "
                f"the newest on (weighted) average.")
    if window.level is not None:
        return (f"{head}: their logged {_loss_kind(chosen)}es lie within noise ({window.sigma:.4f}) of the newest "
                f"level {window.level:.4f}.")
    if window.why_stop is None:
        return f"{head}: " + ("the window given by the user." if asked_window else "every eligible checkpoint.")
    if window.stop_step is None:
        return f"{head}: {window.why_stop}."
    return f"{head}; step {window.stop_step} and older are left out, step {window.stop_step} because {window.why_stop}."
