"""The evaluator search: score candidate averages within a budget and keep the best.

The predicted weights are scored first, then the log-chosen window, a ladder of windows, EMAs and
a greedy soup, budget allowing; the last checkpoint alone is always a candidate, so averaging never
makes the user's model worse than what they have.
"""

from __future__ import annotations

from typing import Callable

from ..evaluate import Evaluator
from ..signals import CheckpointSignals, RunSignals
from .eligibility import Window, predicted_choice
from .recommendation import Choice, RecommendConfig
from .decay import decay_weights, parse_schedule
from .weights import policy_weights

# Window sizes an evaluator search tries first (after the predicted weights and the log-chosen window), newest-first suffixes;
# then every other size, then EMA over all eligible checkpoints, then a greedy soup, budget allowing.
_SEARCH_WINDOWS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_SEARCH_EMA_ALPHAS = (0.5, 0.3, 0.2, 0.1)
_SEARCH_DECAYS = ("1-sqrt", "cosine")   # linear decay weights are SMA's, which the windows already try


def search_with_evaluator(signals: RunSignals, eligible: list[CheckpointSignals], window: Window,
                          config: RecommendConfig, evaluator: Evaluator,
                          progress: Callable[[float, str], None] | None) -> Choice:
    """Score candidates within the evaluation budget and keep the best (or the last alone)."""
    budget = config.max_evals if config.max_evals is not None else 2 * len(signals.checkpoints)
    refs = [s.ref for s in eligible]
    start_calls, start_cached = evaluator.calls, evaluator.from_store
    candidates = _candidates(config, len(eligible), window.size)
    # With a cluster (issue 22) the candidates known up front are scored at once, in parallel; the search
    # below then takes their scores in its own order, so it decides exactly as a local search would.
    evaluator.prefetch(_planned(eligible, window, config, candidates), config.output_dtype, budget)
    last_score = evaluator.score(refs[-1:], (1.0,), config.output_dtype)
    best: tuple[float, str, list[CheckpointSignals], tuple[float, ...]] = (last_score, "sma", eligible[-1:], (1.0,))
    if window.weights is not None and config.method in ("auto", "recovery"):
        best = min(best, _score_predicted(eligible, window, evaluator, config.output_dtype, progress),
                   key=lambda choice: choice[0])
    for index, (method, k, alpha) in enumerate(candidates):
        if evaluator.calls - start_calls >= budget:
            break
        weights = _weights(method, eligible[-k:], alpha)
        score = evaluator.score(refs[-k:], weights, config.output_dtype)
        if progress is not None:
            label = (f"EMA (alpha {alpha:g})" if method == "ema" else f"decay-emulating {method[6:]}"
                     if method.startswith("decay:") else method.upper())
            progress((index + 1) / max(len(candidates), 1), f"{label} of the newest {k}: {score:.4f}")
        if score < best[0]:
            best = (score, method, eligible[-k:], weights)
    if config.method in ("soup", "auto", "recovery") and evaluator.calls - start_calls < budget:
        soup = _greedy_soup(eligible, evaluator, last_score, budget, start_calls, config.output_dtype)
        if soup[0] < best[0]:
            best = soup
    score, method, chosen, weights = best
    method, _, schedule = method.partition(":")
    return Choice(method=method, checkpoints=tuple(chosen), weights=weights, score=score, last_score=last_score,
                  evaluations=evaluator.calls - start_calls, evaluations_cached=evaluator.from_store - start_cached,
                  evaluator=evaluator, schedule=schedule or None)


def _candidates(config: RecommendConfig, count: int, window_size: int) -> list[tuple[str, int, float]]:
    """(method, newest N, alpha) the search scores after the last checkpoint and the predicted weights."""
    if config.method == "soup":
        return []
    if config.method in ("auto", "recovery"):
        return _search_candidates(count, window_size)
    if config.method == "decay":
        return [(f"decay:{parse_schedule(config.schedule).spec}", window_size, 0.0)] if window_size > 1 else []
    return [(config.method, window_size, config.ema_alpha)] if window_size > 1 else []


def _planned(eligible: list[CheckpointSignals], window: Window, config: RecommendConfig,
             candidates: list[tuple[str, int, float]]) -> list[tuple[list, tuple[float, ...]]]:
    """(refs, weights) of every average the search asks for before the soup, in the order it asks."""
    refs = [s.ref for s in eligible]
    planned = [(refs[-1:], (1.0,))]
    if window.weights is not None and config.method in ("auto", "recovery"):
        chosen, weights = predicted_choice(eligible, window)
        planned.append(([s.ref for s in chosen], weights))
    return planned + [(refs[-k:], _weights(method, eligible[-k:], alpha)) for method, k, alpha in candidates]


def _weights(method: str, chosen: list[CheckpointSignals], alpha: float) -> tuple[float, ...]:
    """A candidate's weights: a policy's, or for ``decay:SCHEDULE`` the coefficients at the checkpoints' positions."""
    if method.startswith("decay:"):
        return decay_weights(parse_schedule(method[6:]), chosen)
    return policy_weights(method, len(chosen), alpha)


def _score_predicted(eligible: list[CheckpointSignals], window: Window, evaluator: Evaluator, dtype: str,
                     progress: Callable[[float, str], None] | None,
                     ) -> tuple[float, str, list[CheckpointSignals], tuple[float, ...]]:
    """The evaluator's score of the predicted weights, the first candidate searched.

    The prediction from the logs and Adam's second moments is a soft window that no uniform window
    or EMA equals; where the evaluator agrees with it, one call finds what the ladder of windows
    would only approach.
    """
    chosen, weights = predicted_choice(eligible, window)
    score = evaluator.score([s.ref for s in chosen], weights, dtype)
    if progress is not None:
        progress(0.0, f"predicted weights over the newest {len(chosen)}: {score:.4f}")
    return score, "predicted", chosen, weights


def _search_candidates(count: int, val_window: int) -> list[tuple[str, int, float]]:
    """(method, newest N, alpha) to score, most promising first, so a small budget still finds a good one.

    The val-chosen window, a geometric ladder of windows, every remaining window size, and EMA
    over every eligible checkpoint at a few alphas (a soft window that no uniform one equals).
    """
    sizes = [val_window] + list(_SEARCH_WINDOWS) + list(range(2, count + 1))
    ordered = [k for i, k in enumerate(sizes) if 1 < k <= count and k not in sizes[:i]]
    emas = [("ema", count, a) for a in _SEARCH_EMA_ALPHAS] if count > 2 else []
    # Decay emulation (issue 24) over the windows most likely to matter: the val window, all, and a few between.
    decays = [(f"decay:{name}", k, 0.0) for name in _SEARCH_DECAYS
              for k in dict.fromkeys([val_window, count, *ordered[:4]]) if 2 < k <= count]
    smas = [("sma", k, 0.0) for k in ordered]
    return smas[:4] + decays + smas[4:] + emas


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
