"""Signals computed from a run: spikes, health, validation scores, per-checkpoint table."""

from .assessment import CheckpointSignals, RunSignals, assess_run, find_spikes
from .axes import AXES, available_axes, step_to_axis
from .decimate import minmax_decimate
from .health import CheckpointHealth, check_health
from .smoothing import debiased_ema
from .spikes import LossSpike, SpikeConfig, detect_spikes
from .validation import ValScore, logged_val_scores

__all__ = [
    "AXES",
    "CheckpointHealth",
    "CheckpointSignals",
    "LossSpike",
    "RunSignals",
    "SpikeConfig",
    "ValScore",
    "assess_run",
    "available_axes",
    "check_health",
    "debiased_ema",
    "detect_spikes",
    "find_spikes",
    "logged_val_scores",
    "minmax_decimate",
    "step_to_axis",
]
