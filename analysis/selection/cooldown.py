"""What would a cooldown give? Decay-emulating merges of the stable phase, per schedule and window (issue 24).

For a run at constant LR, each (schedule, window) merge of the stable phase's checkpoints is the run's own
answer to "decay now, or merge?": its loss is predicted from the logs and Adam's second moments (the
model of ``eligibility.predicted_excess``) and measured with an evaluator when one is given. Where the run
also holds a real decay (the LR of its newest checkpoints fell below half the peak), the merges take the
stable phase only, and each row says how far its loss lies from the real decay's end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import NotEnoughCheckpoints
from ..evaluate import Evaluator
from ..signals import CheckpointSignals, RunSignals
from .decay import decay_weights, parse_schedule
from .eligibility import predicted_excess, why_none_eligible
from .span import format_tokens, positions

COOLDOWN_SCHEDULES = ("linear", "1-sqrt", "cosine")
COOLDOWN_FRACTIONS = (0.1, 0.2, 0.4)   # windows as fractions of the stable phase's tokens (steps) so far
STABLE_LR_FRACTION = 0.8    # a checkpoint at ≥ this x the peak LR is in the stable phase
DECAYED_LR_FRACTION = 0.5   # a newest checkpoint at ≤ this x the peak LR ends a real decay


@dataclass(frozen=True, slots=True)
class CooldownRow:
    """One emulated decay: a schedule over a window of the stable phase, and what it gives."""

    schedule: str
    window: float               # the window's length asked, in ``unit``
    unit: str                   # tokens | steps
    steps: tuple[int, ...]      # the checkpoints merged, oldest first
    weights: tuple[float, ...]
    predicted_loss: float | None    # from the logs and Adam's state (None without them)
    measured_loss: float | None     # the evaluator's score, where one was given
    describe: str               # "1-sqrt over 576K tokens: steps 2400–2880, 4 checkpoints"
    vs_stable: float | None = None  # predicted loss minus the newest stable checkpoint's (negative: the merge is lower)
    vs_decay: float | None = None   # predicted loss minus the real decay's end, where the run has one


@dataclass(frozen=True, slots=True)
class CooldownReport:
    """Rows per schedule and window, the stable phase's newest loss, and the real decay's end if the run has one."""

    rows: tuple[CooldownRow, ...]
    stable_step: int                    # the newest checkpoint of the stable phase
    stable_loss: float | None           # its logged loss: what the merges are predicted against
    stable_measured: float | None       # its evaluator score
    decay_step: int | None              # the newest checkpoint, when it ends a real decay
    decay_loss: float | None            # its logged loss
    decay_measured: float | None        # its evaluator score
    basis: str                          # how the losses were obtained, in a sentence


def cooldown_report(signals: RunSignals, evaluator: Evaluator | None = None, *, dtype: str = "same",
                    schedules: tuple[str, ...] = COOLDOWN_SCHEDULES,
                    fractions: tuple[float, ...] = COOLDOWN_FRACTIONS) -> CooldownReport:
    """Emulated-decay losses of the stable phase's checkpoints, per schedule and window."""
    eligible = [s for s in signals.checkpoints if s.eligible]
    if not eligible:
        raise NotEnoughCheckpoints(why_none_eligible(signals))
    stable, decayed = stable_phase(eligible)
    where, unit = positions(stable)
    rows = []
    end = _val(decayed) if decayed is not None else None
    for fraction in fractions:
        length = fraction * float(where[-1])
        span = [s for s, p in zip(stable, where) if p >= where[-1] - length * (1 + 1e-9)]
        for name in schedules:
            rows.append(_row(parse_schedule(name), span, length, unit, signals, evaluator, dtype, end))
    score = (lambda item: evaluator.score([item.ref], (1.0,), dtype)) if evaluator is not None else (lambda _: None)
    return CooldownReport(tuple(rows), stable[-1].ref.step, _val(stable[-1]), score(stable[-1]),
                          decayed.ref.step if decayed else None, _val(decayed) if decayed else None,
                          score(decayed) if decayed else None, _basis(signals, evaluator, decayed))


def stable_phase(eligible: list[CheckpointSignals]) -> tuple[list[CheckpointSignals], CheckpointSignals | None]:
    """The stable phase's checkpoints (the newest stretch at ≥ 0.8 x the peak LR), and the newest checkpoint
    when it ends a real decay (at ≤ 0.5 x the peak) — else None. Without logged LRs every one is stable."""
    lrs = [s.lr for s in eligible]
    if not eligible or any(lr is None or not lr > 0 for lr in lrs):
        return eligible, None
    peak = max(lrs)
    last = max(i for i, lr in enumerate(lrs) if lr >= STABLE_LR_FRACTION * peak)
    first = last
    while first > 0 and lrs[first - 1] >= STABLE_LR_FRACTION * peak:
        first -= 1
    decayed = eligible[-1] if last < len(eligible) - 1 and lrs[-1] <= DECAYED_LR_FRACTION * peak else None
    return eligible[first:last + 1], decayed


def _row(schedule, span: list[CheckpointSignals], length: float, unit: str, signals: RunSignals,
         evaluator: Evaluator | None, dtype: str, end: float | None) -> CooldownRow:
    """The merge of ``span`` with ``schedule``'s coefficients, predicted and (with an evaluator) measured."""
    weights = decay_weights(schedule, span)
    predicted = None
    if signals.noise is not None and _val(span[-1]) is not None:
        excess = predicted_excess(span, weights, signals.noise)
        predicted = _val(span[-1]) + excess if excess is not None else None
    measured = evaluator.score([s.ref for s in span], weights, dtype) if evaluator is not None else None
    shown = format_tokens(length) if unit == "tokens" else f"{length:g}"
    describe = (f"{schedule.spec} over {shown} {unit}: steps {span[0].ref.step}–{span[-1].ref.step}, "
                f"{len(span)} checkpoint{'s' if len(span) != 1 else ''}")
    newest = _val(span[-1])
    return CooldownRow(schedule.spec, length, unit, tuple(s.ref.step for s in span), weights, predicted, measured,
                       describe, predicted - newest if predicted is not None else None,
                       predicted - end if predicted is not None and end is not None else None)


def _val(item: CheckpointSignals) -> float | None:
    """The checkpoint's logged loss (val, or the train-loss stand-in), when finite."""
    return item.val.value if item.val is not None and math.isfinite(item.val.value) else None


def _basis(signals: RunSignals, evaluator: Evaluator | None, decayed: CheckpointSignals | None) -> str:
    """How the rows' losses were obtained, and what the real decay is, in a sentence or two."""
    how = ("Predicted from the logged losses, LRs and Adam's second moments"
           f" (step {signals.noise.step})" if signals.noise is not None else
           "No checkpoint kept Adam's second moments, so no loss is predicted (keep the optimizer state with the "
           "newest checkpoint)")
    measured = f"; measured with {evaluator.name}" if evaluator is not None else ""
    real = (f" The run holds a real decay ending at step {decayed.ref.step} (LR {decayed.lr:.3g}): the merges take "
            "its stable phase only and are compared with that end." if decayed is not None else
            " The run holds no real decay to compare with.")
    return f"{how}{measured}.{real}"
