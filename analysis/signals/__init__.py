"""Signals computed from a run: spikes, health, validation scores, step timing, per-checkpoint table."""

from .assessment import CheckpointSignals, RunSignals, assess_run, find_spikes
from .health import CheckpointHealth, check_health
from .spikes import LossSpike, SpikeConfig, detect_spikes
from .timing import SlowIteration, StepTiming, analyze_step_times
from .validation import ValScore, logged_val_scores

__all__ = [
    "CheckpointHealth",
    "CheckpointSignals",
    "LossSpike",
    "RunSignals",
    "SlowIteration",
    "SpikeConfig",
    "StepTiming",
    "ValScore",
    "analyze_step_times",
    "assess_run",
    "check_health",
    "detect_spikes",
    "find_spikes",
    "logged_val_scores",
]
