"""Megatron-LM functional-test golden values JSON.

Shape: ``{"lm loss": {"start_step": 1, "end_step": 100000, "step_interval": 5,
"values": {"1": 10.35, "5": 10.34, ...}}, "iteration-time": {...}, ...}``. Values may
be the STRING ``"nan"`` (kept as NaN and flagged). ``iteration-time`` is in seconds
and becomes ``step_time_ms``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import LogParseError
from .base import LogTable, to_float
from .builder import TableBuilder
from .text import read_json

_SNIFF = re.compile(r'\A\s*\{\s*"[^"]+"\s*:\s*\{\s*"start_step"')
_SCALE = {"iteration-time": ("step_time_ms", 1000.0)}


class MegatronGoldenReader:
    """Megatron-LM golden_values_*.json (per-metric step -> value maps)."""

    name = "megatron_golden"
    description = "Megatron-LM functional-test golden values JSON ({metric: {start_step, values}})"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF.match(head) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        doc = read_json(path)
        if not isinstance(doc, dict):
            raise LogParseError(path, None, "expected an object of metrics")
        series = {}
        for metric, spec in doc.items():
            values = spec.get("values") if isinstance(spec, dict) else None
            if not isinstance(values, dict):
                builder.skip()
                continue
            name, scale = _SCALE.get(metric, (metric, 1.0))
            points = {}
            for key, raw in values.items():
                step, value = to_float(key), to_float(raw)
                if step is None or value is None:
                    builder.skip()
                    continue
                points[int(step)] = value * scale
            series[name] = points
        _add_by_step(series, builder)
        return builder.build()


def _add_by_step(series: dict[str, dict[int, float]], builder: TableBuilder) -> None:
    """Add every metric in step order (one record per step), so metrics are not restarts."""
    steps = np.array(sorted(set().union(*series.values())) if series else [], dtype=np.int64)
    position = {int(s): i for i, s in enumerate(steps)}
    columns = {}
    for name, points in series.items():
        values, mask = np.full(len(steps), np.nan), np.zeros(len(steps), dtype=bool)
        for step, value in points.items():
            values[position[step]] = value
            mask[position[step]] = True
        columns[name] = (values, mask)
    builder.add_columns(steps, columns)
