"""The layer view of a run: series, flags, spike leads, and whether the model is pre- or post-norm (issue 25).

Post-norm and pre-norm transformers fail differently (post-norm: early layers starve and training is
fragile at high LR; pre-norm: the residual stream and a few massive values grow with depth, and deep
layers stop contributing), so each flag kind comes with one line on what it usually means for the
model's kind, which is read from its ``config.json`` where one says, else from the key layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .layer_flags import LayerFlag, LayerFlagConfig, SpikeLeads, layer_flags, spike_leads
from .layer_names import tensor_role
from .layers import LayerSeries, LayerTracker
from .spikes import LossSpike

# model_type values of Hugging Face configs, by where their blocks normalise.
_PRE_NORM_TYPES = {"gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gpt_neox", "phi",
                   "phi3", "falcon", "gptj", "gpt_neo", "olmo", "olmo2", "starcoder2", "t5", "bloom", "mpt"}
_POST_NORM_TYPES = {"bert", "roberta", "electra", "albert", "distilbert", "xlm-roberta", "camembert", "marian"}

MEANINGS = {
    "pre-norm": {
        "growth": "pre-norm: a layer outgrowing its peers is the residual stream and its few massive values "
                  "growing with depth; deep layers then contribute less and less.",
        "max_abs": "pre-norm: a max |w| far above its trend is a massive value forming; an average across it "
                   "mixes an outlier state.",
        "update_jump": "pre-norm: a jump in relative update usually follows an LR excursion or a bad batch; "
                       "the run often absorbs it, but the weights saved right after carry it.",
    },
    "post-norm": {
        "growth": "post-norm: one layer outgrowing its peers while early layers' updates shrink is the "
                  "starving-early-layers pattern that precedes divergence at high LR.",
        "max_abs": "post-norm: a max |w| jump drives the normalised sublayers toward saturation, the usual "
                   "prelude to a post-norm divergence.",
        "update_jump": "post-norm: a large update is the fragile case (post-norm at high LR diverges from just "
                       "such updates); cut before it.",
    },
    "unknown": {
        "growth": "a layer outgrowing its peers: watch it for the loss spike that often follows.",
        "max_abs": "a max |w| far above its trend: the checkpoint's weights are in an outlier state.",
        "update_jump": "a jump in relative update: a spike in weight space, whatever the loss showed.",
    },
}


@dataclass(frozen=True, slots=True)
class NormPlacement:
    """Where the blocks normalise: pre-norm, post-norm or unknown, and what said so."""

    kind: str       # "pre-norm", "post-norm", "unknown"
    evidence: str   # one sentence


@dataclass(frozen=True, slots=True, eq=False)
class LayerReport:
    """Per-layer series, flags and spike leads of a run's checkpoints."""

    steps: tuple[int, ...]
    layers: tuple[LayerSeries, ...]
    flags: tuple[LayerFlag, ...]
    leads: tuple[SpikeLeads, ...]
    placement: NormPlacement
    exact: bool                  # every update statistic computed exactly (no tensor sketched)
    update_error: float          # relative standard error bound of an update size (0 when exact)
    cosine_error: float          # standard error bound of an update cosine (0 when exact)

    def meaning(self, kind: str) -> str:
        """What flags of ``kind`` (growth_rms, growth_max_abs, max_abs, update_jump) usually mean for this model."""
        return MEANINGS[self.placement.kind][kind.split("_")[0] if kind.startswith("growth") else kind]

    def abnormal(self) -> dict[int, str]:
        """Step -> reason of each checkpoint under a flag that excludes it (the first flag's reason)."""
        out: dict[int, str] = {}
        for flag in self.flags:
            if flag.excludes:
                for step in self.steps:
                    if flag.start_step <= step <= flag.end_step:
                        out.setdefault(step, flag.reason)
        return dict(sorted(out.items()))

    def layer(self, name: str) -> LayerSeries:
        """The series of layer ``name``."""
        return next(layer for layer in self.layers if layer.name == name)


def build_layer_report(tracker: LayerTracker, spikes: Iterable[LossSpike], placement: NormPlacement,
                       config: LayerFlagConfig = LayerFlagConfig()) -> LayerReport:
    """Series, flags and spike leads from a tracker that has seen every checkpoint."""
    layers = tracker.series()
    steps = list(tracker.steps)
    sketched = [layer.sketch_buckets for layer in layers if not layer.exact]
    smallest = min(sketched) if sketched else 0
    return LayerReport(tuple(steps), layers, layer_flags(layers, steps, config),
                       spike_leads(layers, steps, tuple(spikes), config), placement, not sketched,
                       math.sqrt(1 / (2 * smallest)) if smallest else 0.0,
                       math.sqrt(2 / smallest) if smallest else 0.0)


def norm_placement(folders: Iterable[Path], tensor_names: Iterable[str]) -> NormPlacement:
    """Pre- or post-norm from the first ``config.json`` in ``folders`` that says, else from the key layout."""
    for folder in folders:
        config = _read_json(folder / "config.json")
        found = _placement_from_config(config) if config is not None else None
        if found is not None:
            return NormPlacement(found[0], f"{folder / 'config.json'}: {found[1]}")
    return _placement_from_keys(list(tensor_names))


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None if there is none, it is large or it does not parse (the layout decides then)."""
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _placement_from_config(config: Any) -> tuple[str, str] | None:
    """(kind, why) from the keys a config says it with, searched through nested objects."""
    for key, value in _items(config):
        if key == "norm" and value in ("pre", "post"):
            return f"{value}-norm", f'"norm": "{value}"'
        if key in ("normalize_before", "pre_norm", "prenorm", "do_layer_norm_before") and isinstance(value, bool):
            return ("pre-norm" if value else "post-norm"), f'"{key}": {str(value).lower()}'
        if key == "post_norm" and isinstance(value, bool):
            return ("post-norm" if value else "pre-norm"), f'"post_norm": {str(value).lower()}'
        if key == "model_type" and value in _PRE_NORM_TYPES | _POST_NORM_TYPES:
            kind = "pre-norm" if value in _PRE_NORM_TYPES else "post-norm"
            return kind, f'"model_type": "{value}" ({kind} blocks)'
    return None


def _items(node: Any) -> Iterable[tuple[str, Any]]:
    """Every (key, value) of a JSON document, outer objects first."""
    if isinstance(node, dict):
        yield from node.items()
        for value in node.values():
            yield from _items(value)
    elif isinstance(node, list):
        for value in node:
            yield from _items(value)


def _placement_from_keys(names: list[str]) -> NormPlacement:
    """A norm after the last block (ln_f, model.norm, final_layernorm) marks pre-norm; block norms named after
    an output (BERT's attention.output.LayerNorm) with no final norm mark post-norm."""
    roles = [(name, tensor_role(name)) for name in names]
    final = [name for name, role in roles if role.group == "final norm"]
    if final:
        return NormPlacement("pre-norm", f"key layout: a norm after the last block ({final[0]})")
    if any(role.role == "norm" and "output" in name.lower() for name, role in roles):
        return NormPlacement("post-norm", "key layout: block norms applied to sublayer outputs and no final norm")
    return NormPlacement("unknown", "no config.json says, and the key layout does not tell")


HEATMAP_METRICS = {
    "relative_update": "relative update size |Δ| / |θ|",
    "rms_growth": "RMS growth since the previous checkpoint",
    "max_abs_growth": "max |w| growth since the previous checkpoint",
}


@dataclass(frozen=True, slots=True)
class LayerHeatmap:
    """A layer × checkpoint grid of one metric, with the steps to mark on its axis."""

    metric: str                               # a key of HEATMAP_METRICS
    title: str
    layers: tuple[str, ...]                   # rows
    steps: tuple[int, ...]                    # columns
    values: tuple[tuple[float, ...], ...]     # rows × columns, NaN where undefined
    flagged: tuple[tuple[str, int], ...]      # (layer, step) of every flagged cell
    spike_steps: tuple[int, ...]              # first checkpoint each loss spike could hit


def layer_heatmap(report: LayerReport, metric: str = "relative_update") -> LayerHeatmap:
    """The grid the app draws: relative update size as is, growth as value_i / value_(i−1) − 1."""
    rows = []
    for layer in report.layers:
        if metric == "relative_update":
            rows.append(layer.relative_update)
        else:
            series = layer.rms if metric == "rms_growth" else layer.max_abs
            rows.append(tuple(math.nan if i == 0 or not b else v / b - 1 for i, (v, b) in
                              enumerate(zip(series, (math.nan, *series[:-1])))))
    flagged = tuple((f.layer, step) for f in report.flags for step in report.steps
                    if f.start_step <= step <= f.end_step)
    return LayerHeatmap(metric, HEATMAP_METRICS[metric], tuple(layer.name for layer in report.layers),
                        report.steps, tuple(rows), flagged, tuple(lead.first_hit_step for lead in report.leads))
