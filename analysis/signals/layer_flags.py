"""Layers in an abnormal state, and which layers moved before a loss spike (issue 25).

Three flags, each naming a layer and the checkpoints (steps) it holds for:

1. growth: over a window of ``window`` checkpoints the layer's RMS (or max |w|) grew much faster than its
   peers' (robust z-score of the log growth across layers, median and MAD, the spread floored so that
   layers that all barely move are not told apart by noise); the flag starts where the layer's own
   per-checkpoint growth first stood out. Reported, not excluded: it is a trend, not one bad checkpoint.
2. max_abs: the layer's max |w| is ``max_abs_ratio`` times its trend (median of its previous checkpoints).
3. update_jump: the layer's relative update size is ``jump_ratio`` times its usual (median of its previous
   unflagged checkpoints): a spike in weight space, between two named steps.

Checkpoints under a max_abs or update_jump flag are abnormal: averages leave them out with the flag's
reason, and a recovery can cut before the first one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .layers import LayerSeries
from .spikes import LossSpike


@dataclass(frozen=True, slots=True)
class LayerFlagConfig:
    """Thresholds of the layer flags (parameters only)."""

    window: int = 3               # checkpoints over which growth rates are compared
    growth_z: float = 3.5         # robust z-score above the peers' growth that flags a layer
    rms_growth_floor: float = 0.01     # least spread of log RMS growth per window across layers
    max_growth_floor: float = 0.05     # ... of log max |w| growth (a few values move it: noisier)
    trend_checkpoints: int = 5    # previous checkpoints a layer's trend and usual update are the median of
    max_abs_ratio: float = 3.0    # max |w| this many times its trend is abnormal
    jump_ratio: float = 5.0       # a relative update this many times the usual is a spike in weight space
    lead_ratio: float = 2.0       # a layer "moved" before a loss spike at this ratio of its usual update
    lead_checkpoints: int = 5     # how many checkpoints before a loss spike are searched for movers


@dataclass(frozen=True, slots=True)
class LayerFlag:
    """One layer flagged over a run of checkpoints."""

    kind: str            # growth_rms, growth_max_abs, max_abs, update_jump
    layer: str
    start_step: int      # first checkpoint flagged
    end_step: int        # last checkpoint flagged (the same for one)
    previous_step: int   # the checkpoint before start_step (the update_jump is between the two)
    value: float         # the flagged quantity at its worst
    baseline: float      # what it was compared with
    reason: str          # one sentence, shown verbatim

    @property
    def excludes(self) -> bool:
        """True if the checkpoints it covers are abnormal (left out of averages)."""
        return self.kind in ("max_abs", "update_jump")


@dataclass(frozen=True, slots=True)
class LayerLead:
    """A layer that moved at or before a loss spike: how many checkpoints it led by."""

    layer: str
    step: int                  # the first checkpoint at which it moved
    lead_checkpoints: int      # checkpoints between that one and the first one the spike could hit (0: together)
    lead_steps: int
    ratio: float               # its relative update over its usual, at ``step``


@dataclass(frozen=True, slots=True)
class SpikeLeads:
    """The layers that moved around one loss spike, leaders first."""

    spike: LossSpike
    first_hit_step: int        # the first checkpoint saved after the spike began
    leaders: tuple[LayerLead, ...]


def layer_flags(layers: tuple[LayerSeries, ...], steps: list[int],
                config: LayerFlagConfig = LayerFlagConfig()) -> tuple[LayerFlag, ...]:
    """Every flag of every layer, in step order."""
    flags: list[LayerFlag] = []
    flags += _growth_flags(layers, steps, "rms", config.rms_growth_floor, config)
    flags += _growth_flags(layers, steps, "max_abs", config.max_growth_floor, config)
    for layer in layers:
        flags += _ratio_flags(layer, steps, "max_abs", config.max_abs_ratio, config)
        flags += _ratio_flags(layer, steps, "relative_update", config.jump_ratio, config)
    return tuple(sorted(flags, key=lambda f: (f.start_step, f.layer, f.kind)))


def _growth_flags(layers: tuple[LayerSeries, ...], steps: list[int], metric: str, floor: float,
                  config: LayerFlagConfig) -> list[LayerFlag]:
    """Layers whose log growth over ``window`` checkpoints stands ``growth_z`` robust z above their peers'."""
    values = np.log(np.array([getattr(layer, metric) for layer in layers], dtype=np.float64).clip(min=1e-30))
    if len(layers) < 4 or values.shape[1] <= config.window:
        return []
    window_z = _robust_z(values[:, config.window:] - values[:, :-config.window], floor)
    step_z = _robust_z(np.diff(values, axis=1), floor / config.window)
    flags = []
    for row, layer in enumerate(layers):
        hits = np.flatnonzero(window_z[row] > config.growth_z)
        if not len(hits):
            continue
        first = hits[0] + config.window            # checkpoint index where the window first stood out
        onset = _onset(step_z[row], first, config)
        end = hits[-1] + config.window
        growth = math.exp(values[row, end] - values[row, onset - 1]) - 1
        peers = math.exp(float(np.nanmedian(values[:, end] - values[:, onset - 1]))) - 1
        label = "RMS" if metric == "rms" else "max |w|"
        flags.append(LayerFlag(
            f"growth_{metric}", layer.name, steps[onset], steps[end], steps[onset - 1], growth, peers,
            f"{layer.name}: {label} grew {100 * growth:.1f}% from step {steps[onset - 1]} to {steps[end]}, its peers "
            f"a median {100 * peers:.1f}% (robust z > {config.growth_z:g} over {config.window} checkpoints)"))
    return flags


def _onset(step_z: np.ndarray, first: int, config: LayerFlagConfig) -> int:
    """The checkpoint where a growth flagged at ``first`` began: the earliest in its window whose own growth
    stood out (``step_z[k - 1]`` is the growth into checkpoint k), extended back while it keeps standing out."""
    window = range(max(1, first - config.window + 1), first + 1)
    onset = next((k for k in window if step_z[k - 1] > config.growth_z), window.start)
    while onset > 1 and step_z[onset - 2] > config.growth_z:
        onset -= 1
    return onset


def _robust_z(growth: np.ndarray, floor: float) -> np.ndarray:
    """(x − median) / max(1.4826 · MAD, floor) down each column (across layers)."""
    median = np.nanmedian(growth, axis=0)
    mad = np.nanmedian(np.abs(growth - median), axis=0) * 1.4826
    return (growth - median) / np.maximum(np.nan_to_num(mad, nan=floor), floor)


def _ratio_flags(layer: LayerSeries, steps: list[int], metric: str, ratio: float,
                 config: LayerFlagConfig) -> list[LayerFlag]:
    """Checkpoints where ``metric`` is ``ratio`` times the median of its previous unflagged values, merged
    into runs of consecutive checkpoints."""
    series = list(getattr(layer, metric))
    hit = _ratio_hits(series, ratio, config.trend_checkpoints)
    flags = []
    for start, end, baseline in _runs(hit):
        worst = max(series[start:end + 1])
        flags.append(LayerFlag("max_abs" if metric == "max_abs" else "update_jump", layer.name, steps[start],
                               steps[end], steps[start - 1], worst, baseline,
                               _ratio_reason(layer.name, metric, steps, start, end, worst, baseline)))
    return flags


def _ratio_hits(series: list[float], ratio: float, span: int) -> dict[int, float]:
    """Index -> baseline of each value ``ratio`` times the median of up to ``span`` previous unflagged ones
    (at least 2 of them needed)."""
    hits: dict[int, float] = {}
    usual: list[float] = []
    for index, value in enumerate(series):
        if not math.isfinite(value):
            continue
        baseline = float(np.median(usual[-span:])) if len(usual) >= 2 else math.nan
        if math.isfinite(baseline) and baseline > 0 and value > ratio * baseline:
            hits[index] = baseline
        else:
            usual.append(value)
    return hits


def _runs(hits: dict[int, float]) -> list[tuple[int, int, float]]:
    """(start, end, baseline at start) of each run of consecutive indices."""
    runs: list[tuple[int, int, float]] = []
    for index in sorted(hits):
        if runs and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index, runs[-1][2])
        else:
            runs.append((index, index, hits[index]))
    return runs


def _ratio_reason(name: str, metric: str, steps: list[int], start: int, end: int, worst: float,
                  baseline: float) -> str:
    where = f"step {steps[start]}" if start == end else f"steps {steps[start]}-{steps[end]}"
    if metric == "max_abs":
        return (f"{name}: max |w| {worst:.4g} at {where} is {worst / baseline:.1f}x its trend {baseline:.4g} "
                f"(median of the checkpoints before)")
    return (f"{name}: relative update {worst:.3g} from step {steps[start - 1]} to {where} is "
            f"{worst / baseline:.1f}x its usual {baseline:.3g}: a spike in weight space")


def spike_leads(layers: tuple[LayerSeries, ...], steps: list[int], spikes: tuple[LossSpike, ...],
                config: LayerFlagConfig = LayerFlagConfig()) -> tuple[SpikeLeads, ...]:
    """For each loss spike, the layers whose relative update moved (``lead_ratio`` times its usual) within
    ``lead_checkpoints`` before the first checkpoint the spike could hit, earliest first."""
    out = []
    for spike in spikes:
        hit = next((i for i, s in enumerate(steps) if s > spike.onset_after_step), None)
        if hit is None or hit == 0:
            continue
        leaders = [lead for layer in layers if (lead := _lead(layer, steps, hit, config)) is not None]
        leaders.sort(key=lambda lead: (-lead.lead_checkpoints, -lead.ratio))
        out.append(SpikeLeads(spike, steps[hit], tuple(leaders)))
    return tuple(out)


def _lead(layer: LayerSeries, steps: list[int], hit: int, config: LayerFlagConfig) -> LayerLead | None:
    """The first checkpoint in the lead window where the layer's relative update was ``lead_ratio`` times usual."""
    series = list(layer.relative_update)
    for index in range(max(1, hit - config.lead_checkpoints), hit + 1):
        usual = [v for v in series[max(0, index - config.trend_checkpoints):index] if math.isfinite(v)]
        if len(usual) < 2 or not math.isfinite(series[index]):
            continue
        ratio = series[index] / float(np.median(usual)) if np.median(usual) > 0 else math.nan
        if ratio >= config.lead_ratio:
            return LayerLead(layer.name, steps[index], hit - index, steps[hit] - steps[index], ratio)
    return None
