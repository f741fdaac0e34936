"""Signals computed from a run: spikes, health, validation scores, step timing, per-checkpoint table."""

from .assessment import CheckpointSignals, ClearedSpike, RunSignals, assess_run, find_spikes
from .axes import AXES, available_axes, step_to_axis
from .decimate import MAX_POINTS, DisplaySeries, display_series, minmax_decimate, minmax_indices
from .health import CheckpointHealth, check_health
from .layer_flags import LayerFlag, LayerFlagConfig, LayerLead, SpikeLeads
from .layer_names import TensorRole, tensor_role
from .layer_report import HEATMAP_METRICS, LayerHeatmap, LayerReport, NormPlacement, layer_heatmap
from .layers import LayerSeries
from .noise import IterateNoise, iterate_noise, newest_iterate_noise
from .similarity import CheckpointSimilarity, SimilarityReport, compare_checkpoints, layer_of
from .sketch import CheckpointSketch, sketch_checkpoint, sketch_run
from .smoothing import debiased_ema
from .spikes import LossSpike, SpikeConfig, detect_spikes
from .timing import SlowIteration, StepTiming, analyze_step_times
from .validation import ValScore, logged_val_scores

__all__ = [
    "AXES",
    "CheckpointHealth",
    "CheckpointSignals",
    "CheckpointSimilarity",
    "CheckpointSketch",
    "ClearedSpike",
    "DisplaySeries",
    "HEATMAP_METRICS",
    "IterateNoise",
    "LayerFlag",
    "LayerFlagConfig",
    "LayerHeatmap",
    "LayerLead",
    "LayerReport",
    "LayerSeries",
    "LossSpike",
    "MAX_POINTS",
    "NormPlacement",
    "RunSignals",
    "SimilarityReport",
    "SlowIteration",
    "SpikeConfig",
    "SpikeLeads",
    "StepTiming",
    "TensorRole",
    "ValScore",
    "analyze_step_times",
    "assess_run",
    "available_axes",
    "check_health",
    "compare_checkpoints",
    "debiased_ema",
    "detect_spikes",
    "display_series",
    "find_spikes",
    "iterate_noise",
    "layer_heatmap",
    "layer_of",
    "logged_val_scores",
    "minmax_decimate",
    "minmax_indices",
    "newest_iterate_noise",
    "sketch_checkpoint",
    "sketch_run",
    "step_to_axis",
    "tensor_role",
]
