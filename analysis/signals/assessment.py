"""Every signal of every checkpoint of a run, in one table the recommender and UI read."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pandas as pd

from ..checkpoints import TensorInfo, open_checkpoint
from ..checkpoints.compare import compare_layouts
from ..checkpoints.optim import metadata_learning_rate
from ..run import CheckpointRef, Run, UnreadableFile
from ..run_groups import TrajectoryJump, trajectory_jumps
from .health import CheckpointHealth, health_from_sketch
from .layer_report import LayerReport, build_layer_report, norm_placement
from .layers import LayerTracker
from .noise import IterateNoise, newest_iterate_noise
from .similarity import update_cosine
from .sketch import CheckpointSketch, sketch_checkpoint
from .spikes import LossSpike, SpikeConfig, detect_spikes, sparse_config
from .validation import ValScore, checkpoint_aligned_val, logged_val_scores, train_interval_scores

# Metrics whose spikes contaminate checkpoints. A grad-norm spike the loss never felt is
# reported but harmless (clipping absorbed it); one that comes with a loss spike widens it.
# A val loss far above its neighbours' marks the checkpoint saved at that step as hit too
# (an LR excursion right before a save can leave the train loss calm and the weights not).
CONTAMINATING_METRICS = ("train_loss", "val_loss")
Progress = Callable[[float, str], None]


@dataclass(frozen=True, slots=True)
class ClearedSpike:
    """A train-loss event a checkpoint was saved in, that the checkpoint's own val loss shows it did not carry.

    A train loss measures a batch as much as the weights, and one hard batch can stand six noise
    units above its neighbours; a val loss logged at the checkpoint's own step measures its weights
    alone. When it is no higher than the val loss of the newest clean checkpoint before the event
    began, the weights were not hurt, and leaving the checkpoint out would only lose it (on the
    benchmark's runs this cleared one false alarm, a single-batch blip at the last step, and none of
    the 21 checkpoints the trainer's own LR excursions and corrupted batches hit).
    """

    event: LossSpike
    val: float            # the checkpoint's val loss, logged at its step
    before_step: int      # the newest clean checkpoint saved before the event began
    before_val: float     # ... and its val loss, logged at its step

    def describe(self) -> str:
        """One sentence for reasons."""
        return (f"Saved inside a {self.event.describe()}, but its val loss {self.val:.4f} (logged at this step) is "
                f"not above {self.before_val:.4f} at step {self.before_step} before the spike: its weights did not "
                f"carry it")


@dataclass(frozen=True, slots=True)
class CheckpointSignals:
    """What is known about one checkpoint."""

    ref: CheckpointRef
    health: CheckpointHealth
    val: ValScore | None
    spike: LossSpike | None        # the contaminating event it was saved in, if any
    mismatch: str | None           # how its tensors differ from the newest checkpoint's, if they do
    lr: float | None = None        # the learning rate logged at (or last before) its step, else its optimizer's
    cleared: ClearedSpike | None = None  # a train-loss event it was saved in that its own val loss clears
    lr_saved: bool = False         # ``lr`` came from its saved optimizer state: the logs hold no LR for it
    tokens: float | None = None    # tokens seen at its step, from the logs' token count (issue 24), if logged
    abnormal: str | None = None    # why a layer's weights are in an abnormal state here (issue 25), if they are
    update_cosine: float | None = None   # cos(update into it, update before that), from the sketches: > 0 drifts

    @property
    def eligible(self) -> bool:
        """True if it may be averaged without the user forcing it."""
        return self.health.finite and self.spike is None and self.mismatch is None and self.abnormal is None


@dataclass(frozen=True, slots=True)
class RunSignals:
    """Signals of every checkpoint of a run, in step order, and the spike events."""

    checkpoints: tuple[CheckpointSignals, ...]
    spikes: tuple[LossSpike, ...]
    noise: IterateNoise | None = None   # from the Adam state of the newest eligible checkpoint that saved one
    unreadable: tuple[UnreadableFile, ...] = ()   # the run's files that could not be read (issue 19)
    logged_saves: tuple[int, ...] = ()   # steps at which the logs say a checkpoint was saved (nanoGPT's stdout)
    layers: LayerReport | None = None   # per-layer statistics and flags, from the same read pass (issue 25)

    @property
    def loss_spikes(self) -> tuple[LossSpike, ...]:
        """The events that contaminate checkpoints (train- or val-loss spikes), in step order."""
        return tuple(s for s in self.spikes if s.metric in CONTAMINATING_METRICS)

    @property
    def grad_norm_spikes(self) -> tuple[LossSpike, ...]:
        """Grad-norm events: reported, never contaminating."""
        return tuple(s for s in self.spikes if s.metric not in CONTAMINATING_METRICS)

    def first_abnormal(self, before_step: int | None = None, lead: int = 5) -> CheckpointSignals | None:
        """The first checkpoint whose weights a layer flag calls abnormal (issue 25): among all of them, or, given
        ``before_step`` (a loss spike's first hit), among the ``lead`` checkpoints saved just before it."""
        if before_step is None:
            return next((c for c in self.checkpoints if c.abnormal is not None), None)
        earlier = [c for c in self.checkpoints if c.ref.step < before_step][-lead:]
        return next((c for c in earlier if c.abnormal is not None), None)

    def at(self, step: int) -> CheckpointSignals:
        """The signals of the checkpoint saved at ``step``."""
        for item in self.checkpoints:
            if item.ref.step == step:
                return item
        raise KeyError(step)


def find_spikes(run: Run, config: SpikeConfig = SpikeConfig()) -> tuple[LossSpike, ...]:
    """Spike events of the run's train loss, val loss and grad norm, in step order."""
    events: list[LossSpike] = []
    for metric in ("train_loss", "val_loss", "grad_norm"):
        series = run.metric(metric)
        if len(series):
            metric_config = {"grad_norm": replace(config, min_ratio=config.grad_norm_min_ratio),
                             "val_loss": sparse_config(config)}.get(metric, config)
            events.extend(detect_spikes(series["step"], series["value"], metric, metric_config))
    return tuple(sorted(events, key=lambda e: (e.start_step, e.metric)))


def assess_run(run: Run, spike_config: SpikeConfig = SpikeConfig(), progress: Progress | None = None) -> RunSignals:
    """Health, validation, spike contamination and key agreement of every checkpoint, and the iterate noise.

    Reads every tensor of every checkpoint once, one tensor at a time, in the sketch pass (cached on disk, so
    the similarity signals then read nothing): health and the per-layer statistics and flags come from it.
    Then the Adam second moments of the newest eligible checkpoint that saved them (``progress`` restarts
    from 0 for those).
    """
    spikes = find_spikes(run, spike_config)
    contaminating = [s for s in spikes if s.metric in CONTAMINATING_METRICS]
    steps = [c.step for c in run.checkpoints]
    logged_val = checkpoint_aligned_val(run.logs) if run.logs else run.metric("val_loss")
    vals = (logged_val_scores(logged_val, steps) if len(logged_val)
            else train_interval_scores(run.metric("train_loss"), steps,   # no val logged: the train loss stands in
                                       [(e.onset_after_step, e.end_step) for e in contaminating]))
    lrs = learning_rates(run.metric("lr"), steps)
    tokens = tokens_seen(run.metric("tokens"), steps)
    # (step, val loss) of the checkpoints outside every event whose eval was logged at their own step.
    clean_vals = [(c.step, v.value) for c, v in zip(run.checkpoints, vals)
                  if v is not None and v.source == "logged" and not any(e.contains(c.step) for e in contaminating)]
    headers = [_headers(ref) for ref in run.checkpoints]   # every checkpoint opened once for its layout and LR
    reference = headers[-1][0] if headers else []
    items = []
    tracker = LayerTracker()
    distances: list[float | None] = []   # save-to-save |Δθ| from the sketches, for rule 4 of run_groups (issue 21)
    cosines: list[float | None] = []     # ... and cos(θ_i, θ_(i+1))
    update_cosines: list[float | None] = []   # cos(θ_i − θ_(i−1), θ_(i−1) − θ_(i−2)): drift or noise (the val band's)
    previous = before = None
    total = max(len(run.checkpoints), 1)
    for index, (ref, val, lr, (layout, saved_lr), seen) in enumerate(zip(run.checkpoints, vals, lrs, headers, tokens)):
        def step_progress(frac: float, msg: str, index: int = index) -> None:
            if progress is not None:
                progress((index + frac) / total, msg)

        sketch = sketch_checkpoint(ref, progress=step_progress)
        tracker.add(sketch)
        if previous is not None:
            distance, cosine = sketch_geometry(previous, sketch)
            distances.append(distance)
            cosines.append(cosine)
        update_cosines.append(update_cosine(before, previous, sketch) if before is not None else None)
        before, previous = previous, sketch
        health = health_from_sketch(sketch)
        spike, cleared = _contamination(ref.step, val, contaminating, clean_vals)
        items.append(CheckpointSignals(ref, health, val, spike, _mismatch(reference, layout),
                                       lr if lr is not None else saved_lr,
                                       cleared, lr is None and saved_lr is not None, seen))
    jumps = trajectory_jumps([item.ref.step for item in items], distances, cosines)
    if jumps:   # the layer flags compare the newest run's saves only, not the jump into it (issue 21)
        tracker = _tracker([ref for ref in run.checkpoints if ref.step > jumps[-1].before_step])
    layers = _layer_report(run, tracker, contaminating, reference)
    abnormal = layers.abnormal()
    items = [replace(item, abnormal=abnormal.get(item.ref.step), update_cosine=cos)
             for item, cos in zip(items, update_cosines)]
    items = _apart_from_newest_run(items, jumps[-1]) if jumps else items
    eligible = [item for item in items if item.eligible]
    noise = newest_iterate_noise([item.ref for item in eligible], progress)
    return RunSignals(tuple(items), spikes, noise, run.unreadable, logged_saves(run), layers)


def sketch_geometry(a: CheckpointSketch, b: CheckpointSketch) -> tuple[float | None, float | None]:
    """(|θ_a − θ_b|, cos(θ_a, θ_b)) over the tensors both hold with one shape (a CountSketch keeps both);
    (None, None) if they share none."""
    shared = [n for n in a.weights if n in b.weights and a.weights[n].shape == b.weights[n].shape]
    if not shared:
        return None, None
    dot = sum(float(a.weights[n] @ b.weights[n]) for n in shared)
    aa = sum(float(a.weights[n] @ a.weights[n]) for n in shared)
    bb = sum(float(b.weights[n] @ b.weights[n]) for n in shared)
    cosine = dot / math.sqrt(aa * bb) if aa > 0 and bb > 0 else None
    return math.sqrt(max(aa + bb - 2 * dot, 0.0)), cosine


def _apart_from_newest_run(items: list[CheckpointSignals], jump: TrajectoryJump) -> list[CheckpointSignals]:
    """Checkpoints before the newest weight-space jump belong to another run: left out like a mismatch (issue 21)."""
    return [replace(item, mismatch=jump.describe()) if item.ref.step <= jump.before_step and item.mismatch is None
            else item for item in items]


def _tracker(refs: list[CheckpointRef]) -> LayerTracker:
    """A layer tracker fed ``refs``' sketches (cached on disk by the pass that just made them)."""
    tracker = LayerTracker()
    for ref in refs:
        tracker.add(sketch_checkpoint(ref))
    return tracker


def _layer_report(run: Run, tracker: LayerTracker, spikes: list[LossSpike],
                  reference: list[TensorInfo]) -> LayerReport:
    """The layer view: config.json beside the newest checkpoint or in the run folder says pre- or post-norm."""
    newest = run.checkpoints[-1].path if run.checkpoints else run.path
    folders = [newest if newest.is_dir() else newest.parent, run.path, run.path / "model_config"]
    return build_layer_report(tracker, spikes, norm_placement(folders, [info.name for info in reference]))


def logged_saves(run: Run) -> tuple[int, ...]:
    """The steps at which the run's logs say a checkpoint was saved (``checkpoint_saved`` rows), in order."""
    saved = run.metric("checkpoint_saved")
    return tuple(int(step) for step in saved["step"][saved["value"] > 0].drop_duplicates())


def _contamination(step: int, val: ValScore | None, events: list[LossSpike],
                   clean_vals: list[tuple[int, float]]) -> tuple[LossSpike | None, ClearedSpike | None]:
    """The event that contaminates the checkpoint saved at ``step`` (None if none does), and a train-loss event
    its own val loss clears. ``clean_vals``: (step, val loss) of the checkpoints outside every event whose eval
    was logged at their own step, in step order."""
    cleared = None
    for event in events:
        if not event.contains(step):
            continue
        clear = _cleared_by_val(event, val, clean_vals)
        if clear is None:
            return event, None
        cleared = cleared or clear
    return None, cleared


def _cleared_by_val(event: LossSpike, val: ValScore | None,
                    clean_vals: list[tuple[int, float]]) -> ClearedSpike | None:
    """The clearance of a train-loss ``event`` by a checkpoint's own-step ``val``, if that val says so."""
    if event.metric != "train_loss" or val is None or val.source != "logged":
        return None
    before = [(s, v) for s, v in clean_vals if s <= event.onset_after_step]
    if not before or val.value > before[-1][1]:
        return None
    return ClearedSpike(event, val.value, *before[-1])


def learning_rates(lr: pd.DataFrame, ckpt_steps: list[int]) -> list[float | None]:
    """The LR logged at each checkpoint's step, or the last one logged before it (None if none was)."""
    if lr.empty:
        return [None] * len(ckpt_steps)
    lr = lr.sort_values("step").drop_duplicates("step", keep="last")
    steps, values = lr["step"].to_numpy(), lr["value"].to_numpy(dtype=np.float64)
    at = np.searchsorted(steps, np.asarray(ckpt_steps, dtype=np.int64), side="right") - 1
    return [float(values[i]) if i >= 0 and np.isfinite(values[i]) else None for i in at]


def tokens_seen(tokens: pd.DataFrame, ckpt_steps: list[int]) -> list[float | None]:
    """Tokens seen at each checkpoint's step, interpolated from the logged count (issue 24).

    Extrapolated at the logged tokens per step beyond the logged range (a count logged every few steps
    misses the last save); None for all when fewer than two finite counts at distinct steps were logged.
    """
    frame = tokens.sort_values("step").drop_duplicates("step", keep="last")
    frame = frame[np.isfinite(frame["value"].to_numpy(dtype=np.float64))]
    if len(frame) < 2:
        return [None] * len(ckpt_steps)
    x, y = frame["step"].to_numpy(dtype=np.float64), frame["value"].to_numpy(dtype=np.float64)
    at = np.asarray(ckpt_steps, dtype=np.float64)
    inside = np.interp(at, x, y)
    low = y[0] + (at - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
    high = y[-1] + (at - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return [float(v) for v in np.where(at < x[0], low, np.where(at > x[-1], high, inside))]


def _headers(ref: CheckpointRef) -> tuple[list[TensorInfo], float | None]:
    """Tensor headers, and the learning rate its optimizer state was saved at (None if it kept none)."""
    with open_checkpoint(ref.path, ref.layout) as handle:
        return handle.tensors(), metadata_learning_rate(handle.metadata())


def _mismatch(reference: list[TensorInfo], layout: list[TensorInfo]) -> str | None:
    """A sentence naming missing, extra and reshaped tensors versus the reference, or None."""
    diff = compare_layouts(reference, layout)
    return None if diff.same else diff.describe()
