"""Recommend checkpoints to average: the package's entry, ``recommend``, and the assembly of its result.

It applies the eligibility and window rules, then either weights the window by a policy (or by the
predicted weights), or hands the eligible checkpoints to the evaluator search; ``_finish`` writes a
reason for every checkpoint of the run and the summary.
"""

from __future__ import annotations

from typing import Callable

from ..errors import InvalidArgument, NotEnoughCheckpoints
from ..evaluate import Evaluator
from ..signals import RunSignals
from .eligibility import Cutoff, Window, choose_window, is_eligible, predicted_choice, recovery_cutoff, why_none_eligible
from .explain import describe_basis, explain_decision, only_checkpoint, stand_in_sampling_error, summarize
from .recommendation import METHODS, Choice, Decision, Recommendation, RecommendConfig
from .search import search_with_evaluator
from .decay import decay_weights, parse_schedule
from .weights import policy_weights


def recommend(signals: RunSignals, config: RecommendConfig = RecommendConfig(), evaluator: Evaluator | None = None,
              progress: Callable[[float, str], None] | None = None) -> Recommendation:
    """Recommend checkpoints to average.

    Raises:
        NotEnoughCheckpoints: no checkpoint may be averaged.
        InvalidArgument: unknown method, or soup without an evaluator.
    """
    if config.method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    if config.method == "decay":
        parse_schedule(config.schedule)   # a bad schedule is said before any checkpoint is read
    if config.method == "soup" and evaluator is None:
        raise InvalidArgument("the soup method adds checkpoints only when an evaluator says it helps: pass --eval")
    cutoff = recovery_cutoff(signals, config) if config.method == "recovery" else None
    eligible = [s for s in signals.checkpoints
                if is_eligible(s, config) and (cutoff is None or s.ref.step < cutoff.step)]
    if not eligible:
        raise NotEnoughCheckpoints(why_none_eligible(signals, cutoff))
    window = choose_window(eligible, config, signals.noise)
    if evaluator is None:
        if window.weights is not None and config.method in ("auto", "recovery"):
            chosen, weights = predicted_choice(eligible, window)
            choice = Choice(method="predicted", checkpoints=tuple(chosen), weights=weights)
            return _finish(signals, config, choice, window=window, cutoff=cutoff)
        span = eligible[len(eligible) - window.size:]
        if config.method == "decay":
            schedule = parse_schedule(config.schedule)
            choice = Choice(method="decay", checkpoints=tuple(span), weights=decay_weights(schedule, span),
                            schedule=schedule.spec)
            return _finish(signals, config, choice, window=window, cutoff=cutoff)
        method = config.method if config.method in ("sma", "ema", "wma") else "sma"
        weights = policy_weights(method, len(span), config.ema_alpha)
        return _finish(signals, config, Choice(method=method, checkpoints=tuple(span), weights=weights),
                       window=window, cutoff=cutoff)
    choice = search_with_evaluator(signals, eligible, window, config, evaluator, progress)
    return _finish(signals, config, choice, window=window, cutoff=cutoff)


def _finish(signals: RunSignals, config: RecommendConfig, choice: Choice, *, window: Window,
            cutoff: Cutoff | None = None) -> Recommendation:
    """Assemble the recommendation and a reason for every checkpoint.

    ``choice.method`` is how the weights were made (sma, ema, wma, soup, predicted); a recovery is reported
    as ``recovery`` while its summary still names that averaging.
    """
    method, chosen, weights = choice.method, choice.checkpoints, choice.weights
    score, last_score, calls, evaluator = choice.score, choice.last_score, choice.evaluations, choice.evaluator
    weight_of = {s.ref.step: w for s, w in zip(chosen, weights)}
    oldest_taken = chosen[0].ref.step
    decisions = _with_unreadable(signals, tuple(
        Decision(s.ref.step, str(s.ref.path), s.ref.step in weight_of, weight_of.get(s.ref.step, 0.0),
                 explain_decision(s, weight_of, oldest_taken, window, config, evaluator is not None,
                                  method == "predicted", cutoff))
        for s in signals.checkpoints
    ))
    label = f"decay:{choice.schedule}" if method == "decay" else method
    summary = summarize(label, chosen, weights, score, last_score, window, evaluator, config.window is not None)
    if method == "decay":
        summary += _recomputed(signals, chosen)
    if cutoff is not None:
        summary = f"Recovery from before step {cutoff.step}: {summary}"
    name = "recovery" if cutoff is not None else method
    noise = signals.noise.excess_at(chosen[-1].lr) if signals.noise is not None and chosen[-1].lr else None
    # The prediction is for the predicted weights; other weights or an evaluator's choice have none.
    gain = window.predicted_gain if evaluator is None and method == "predicted" else None
    stand_in_error = stand_in_sampling_error(signals)
    basis, note = describe_basis(signals, config, window, evaluator, method, calls, stand_in_error)
    single = only_checkpoint(signals)
    if single is not None:   # one file: no "next older one", no gain on offer (issue 21)
        summary, note = single
    return Recommendation(name, tuple(s.ref for s in chosen), tuple(weights), decisions, calls, score,
                          last_score, summary, noise, gain, evaluations_cached=choice.evaluations_cached,
                          basis=basis, basis_note=note, stand_in_error=stand_in_error,
                          settings=_settings(config, choice))


def _settings(config: RecommendConfig, choice: Choice) -> dict[str, object]:
    """What a recipe records besides the weights (issue 24): the decay schedule, the window length asked."""
    settings: dict[str, object] = {}
    if choice.schedule is not None:
        settings["schedule"] = choice.schedule
    if config.window_tokens is not None:
        settings["window_tokens"] = float(config.window_tokens)
    if config.window_steps is not None:
        settings["window_steps"] = int(config.window_steps)
    return settings


def _recomputed(signals: RunSignals, chosen: tuple) -> str:
    """For decay weights, a sentence naming the checkpoints inside their span that were left out, whose
    coefficients were recomputed over the positions of those that remain (empty when none was)."""
    first, last = chosen[0].ref.step, chosen[-1].ref.step
    taken = {s.ref.step for s in chosen}
    out = [s.ref.step for s in signals.checkpoints if first < s.ref.step < last and s.ref.step not in taken]
    if not out:
        return ""
    return (f" Step{'s' if len(out) > 1 else ''} {', '.join(map(str, out))} inside that span "
            f"{'were' if len(out) > 1 else 'was'} left out (see its reason), so the coefficients were recomputed "
            f"over the positions of the {len(chosen)} that remain.")


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
