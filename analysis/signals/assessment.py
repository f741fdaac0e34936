"""Every signal of every checkpoint of a run, in one table the recommender and UI read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..checkpoints import TensorInfo, open_checkpoint
from ..checkpoints.compare import compare_layouts
from ..run import CheckpointRef, Run
from .health import CheckpointHealth, check_health
from .spikes import LossSpike, SpikeConfig, detect_spikes
from .validation import ValScore, logged_val_scores

# Metrics whose spikes contaminate checkpoints. A grad-norm spike the loss never felt is
# reported but harmless (clipping absorbed it); one that comes with a loss spike widens it.
CONTAMINATING_METRICS = ("train_loss",)
Progress = Callable[[float, str], None]


@dataclass(frozen=True, slots=True)
class CheckpointSignals:
    """What is known about one checkpoint."""

    ref: CheckpointRef
    health: CheckpointHealth
    val: ValScore | None
    spike: LossSpike | None        # the contaminating event it was saved in, if any
    mismatch: str | None           # how its tensors differ from the newest checkpoint's, if they do

    @property
    def eligible(self) -> bool:
        """True if it may be averaged without the user forcing it."""
        return self.health.finite and self.spike is None and self.mismatch is None


@dataclass(frozen=True, slots=True)
class RunSignals:
    """Signals of every checkpoint of a run, in step order, and the spike events."""

    checkpoints: tuple[CheckpointSignals, ...]
    spikes: tuple[LossSpike, ...]

    def at(self, step: int) -> CheckpointSignals:
        """The signals of the checkpoint saved at ``step``."""
        for item in self.checkpoints:
            if item.ref.step == step:
                return item
        raise KeyError(step)


def find_spikes(run: Run, config: SpikeConfig = SpikeConfig()) -> tuple[LossSpike, ...]:
    """Spike events of the run's train loss and grad norm, in step order."""
    events: list[LossSpike] = []
    for metric in ("train_loss", "grad_norm"):
        series = run.metric(metric)
        if len(series):
            events.extend(detect_spikes(series["step"], series["value"], metric, config))
    return tuple(sorted(events, key=lambda e: (e.start_step, e.metric)))


def assess_run(run: Run, spike_config: SpikeConfig = SpikeConfig(), progress: Progress | None = None) -> RunSignals:
    """Health, validation, spike contamination and key agreement of every checkpoint.

    Reads every tensor of every checkpoint once (for health), one tensor at a time.
    """
    spikes = find_spikes(run, spike_config)
    contaminating = [s for s in spikes if s.metric in CONTAMINATING_METRICS]
    vals = logged_val_scores(run.metric("val_loss"), [c.step for c in run.checkpoints])
    reference = _layout_of(run.checkpoints[-1]) if run.checkpoints else []
    items = []
    total = max(len(run.checkpoints), 1)
    for index, (ref, val) in enumerate(zip(run.checkpoints, vals)):
        def step_progress(frac: float, msg: str, index: int = index) -> None:
            if progress is not None:
                progress((index + frac) / total, msg)

        health = check_health(ref, step_progress)
        spike = next((s for s in contaminating if s.contains(ref.step)), None)
        items.append(CheckpointSignals(ref, health, val, spike, _mismatch(reference, _layout_of(ref))))
    return RunSignals(tuple(items), spikes)


def _layout_of(ref: CheckpointRef) -> list[TensorInfo]:
    """Tensor headers only."""
    with open_checkpoint(ref.path, ref.layout) as handle:
        return handle.tensors()


def _mismatch(reference: list[TensorInfo], layout: list[TensorInfo]) -> str | None:
    """A sentence naming missing, extra and reshaped tensors versus the reference, or None."""
    diff = compare_layouts(reference, layout)
    return None if diff.same else diff.describe()
