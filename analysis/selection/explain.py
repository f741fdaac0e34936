"""The words of a recommendation: a reason for every checkpoint, the summary, and how the weights were chosen.

Every sentence a user reads about a choice is written here, from the choice, the window that
bounded it and the run's signals; nothing here decides anything.
"""

from __future__ import annotations

import numpy as np

from ..evaluate import Evaluator
from ..signals import CheckpointSignals, RunSignals
from .eligibility import Cutoff, Window, loss_kind
from .recommendation import RecommendConfig


def describe_basis(signals: RunSignals, config: RecommendConfig, window: Window, evaluator: Evaluator | None,
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
    if window.span is not None:
        return "window", f"The eligible checkpoints of the {window.span}, as asked (--window-tokens/--window-steps)."
    losses = ("train losses (the run logs no val loss)"
              if any(c.val is not None and c.val.source == "train" for c in signals.checkpoints) else "val losses")
    luck = _stand_in_luck(stand_in_error, window.noise)
    if window.weights is not None:
        asked = "" if method == "predicted" else f" The {method} weights over that window were asked for (--method)."
        moments = f" ({signals.noise.source()})" if signals.noise is not None else ""
        return "predicted", (f"From logged {losses}, LRs and the optimizer's second moments{moments}, a model's prediction."
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


def only_checkpoint(signals: RunSignals) -> tuple[str, str] | None:
    """(summary, note) for a run with one checkpoint, which nothing can be averaged with; None otherwise.

    nanoGPT overwrites ``out/ckpt.pt`` at every eval that improves: its log shows several saves and one
    file is left. Saying "the next older one" or offering an average's gain would describe checkpoints
    that do not exist (issue 21); what the user can do is keep one file per save.
    """
    if len(signals.checkpoints) != 1:
        return None
    step = signals.checkpoints[0].ref.step
    saves = signals.logged_saves
    how = ("keep one file per save (e.g. save to ckpt_{iter}.pt instead of ckpt.pt, or copy it after each save) "
           "so that later runs can be averaged")
    if len(saves) > 1:
        shown = ", ".join(str(s) for s in saves[:8]) + (", ..." if len(saves) > 8 else "")
        return (f"Keep the only checkpoint (step {step}): the logs show {len(saves)} saves (steps {shown}) but one "
                f"file is kept, each save having overwritten the one before, so there is nothing to average.",
                f"One checkpoint file holds the newest of {len(saves)} saves. To average checkpoints, {how}.")
    return (f"Keep the only checkpoint (step {step}): the run has one checkpoint, so there is nothing to average.",
            f"One checkpoint: nothing to choose. To average checkpoints, {how}.")


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


def explain_decision(item: CheckpointSignals, weight_of: dict[int, float], oldest_taken: int, window: Window,
                     config: RecommendConfig, evaluated: bool, predicted: bool, cutoff: Cutoff | None = None) -> str:
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
    if item.abnormal is not None and not config.include_contaminated:
        return f"Left out: a layer's weights are in an abnormal state: {item.abnormal}."
    if item.ref.step in weight_of:
        weight = weight_of[item.ref.step]
        forced = " Forced in despite a spike." if item.spike is not None else ""
        cleared = f" {item.cleared.describe()}." if item.cleared is not None else ""
        return f"Taken with weight {weight:.3f}{val}.{forced}{cleared}"
    unweighted = dict(window.unweighted).get(item.ref.step) if predicted else None
    if unweighted is not None:
        return f"Left out: {unweighted}."
    if window.span is not None and item.ref.step < oldest_taken and not evaluated:
        return f"Left out: older than the {window.span}{val}."
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


def summarize(method: str, chosen: list[CheckpointSignals], weights: tuple[float, ...], score: float | None,
              last_score: float | None, window: Window, evaluator: Evaluator | None, asked_window: bool = False) -> str:
    """The one-paragraph summary of a choice: what is averaged, and the evidence for it."""
    steps = f"{chosen[0].ref.step}-{chosen[-1].ref.step}" if len(chosen) > 1 else f"{chosen[0].ref.step}"
    if len(chosen) == 1 and evaluator is not None:
        return (f"Keep the last checkpoint (step {steps}) alone: no average scored better than its "
                f"{last_score:.4f} with {evaluator.name}.")
    if len(chosen) == 1 and evaluator is None:
        return (f"Keep the last checkpoint (step {steps}) alone: the next older one was left out because "
                f"{window.why_stop or 'the window holds one checkpoint'}.")
    head = (f"Predicted weights over {len(chosen)} checkpoints (steps {steps})" if method == "predicted"
            else f"Decay-emulating weights ({method[6:]}, WSM) over {len(chosen)} checkpoints (steps {steps})"
            if method.startswith("decay:") else f"{method.upper()} of {len(chosen)} checkpoints (steps {steps})")
    if score is not None and last_score is not None:
        return f"{head}: {evaluator.name} scores {score:.4f} vs {last_score:.4f} for the last checkpoint alone."
    if method == "predicted" and window.predicted_gain is not None:
        return (f"Predicted weights over {len(chosen)} checkpoints (steps {steps}; newest {weights[-1]:.3f}, "
                f"oldest {weights[0]:.3f}): predicted {window.predicted_gain:.4f} nats below the last checkpoint "
                f"alone; averaging cancels most of the iterate noise ({window.noise:.4f} nats at the newest LR, "
                f"from Adam's second moments) while their logged {loss_kind(chosen)}es lie {window.lag_cost:.4f} nats above "
                f"the newest on (weighted) average.")
    if window.level is not None and window.descent is not None and window.stop_step is not None:
        return (f"{head}: their logged {loss_kind(chosen)}es lie within noise of the newest level "
                f"{window.level:.4f}; step {window.stop_step} and older are left out, as the loss still falls "
                f"{window.descent:.4f} per checkpoint, a descent that averaging would undo.")
    if window.level is not None:
        return (f"{head}: their logged {loss_kind(chosen)}es lie within noise ({window.sigma:.4f}) of the newest "
                f"level {window.level:.4f}.")
    if window.why_stop is None:
        return f"{head}: " + ("the window given by the user." if asked_window else "every eligible checkpoint.")
    if window.stop_step is None:
        return f"{head}: {window.why_stop}."
    return f"{head}; step {window.stop_step} and older are left out, step {window.stop_step} because {window.why_stop}."
