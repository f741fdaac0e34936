"""modded-nanogpt record logs (KellerJordan/modded-nanogpt) and openai/parameter-golf.

Lines read (the file usually starts with the training script's source code)::

    step:1/6000 train_loss:11.0091 train_time:24179ms step_avg:nanms
    step:125/6000 val_loss:4.2135 train_time:32109ms step_avg:256.87ms
    step:1/4875 train_time:5.418s step_avg:5418.26ms          (track 3: seconds)
    4500/20000 train_loss: 2.2830 train_time: 8.8m tok/s: ...   (parameter-golf: minutes)

``train_time`` is cumulative training time (the timer stops during validation); it is
kept in ms as ``train_time_ms`` and its difference between successive training lines,
per step, is the ``step_time_ms``.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import LogTable
from .builder import TableBuilder
from .text import NUMBER, parse_number, read_text, scan_lines

_LINE = re.compile(r"^(?:step:)?(\d+)/(\d+) +(\w+:.*)$")
_KV = re.compile(rf"([A-Za-z_/]+):\s*({NUMBER})(ms|s|m|h)?\b")
_UNIT_MS = {"ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3, None: 1.0, "": 1.0}
_SNIFF = re.compile(r"^(?:step:)?\d+/\d+ +(?:train_loss|val_loss|train_time):", re.M)
_CANDIDATE = r"^(?:step:)?\d+/\d+ +\w+:"


class _Parser:
    """Stateful line parser: remembers the last train_time to derive step time."""

    def __init__(self) -> None:
        self.last: tuple[int, float] | None = None

    def __call__(self, line: str) -> tuple[int, dict[str, float]] | None:
        match = _LINE.match(line.strip())
        if match is None:
            return None
        step = int(match.group(1))
        metrics: dict[str, float] = {}
        for key, value, unit in _KV.findall(match.group(3)):
            number = parse_number(value)
            if number is None:
                continue
            if key in ("train_time", "step_avg"):
                metrics[f"{key}_ms"] = number * _UNIT_MS[unit or None]
            elif key == "tok/s":
                metrics["tokens_per_sec"] = number
            else:
                metrics[key] = number
        if "train_time_ms" in metrics and "val_loss" not in metrics:
            self._step_time(step, metrics)
        return step, metrics

    def _step_time(self, step: int, metrics: dict[str, float]) -> None:
        now = metrics["train_time_ms"]
        if self.last is not None and step > self.last[0]:
            metrics["step_time_ms"] = (now - self.last[1]) / (step - self.last[0])
        self.last = (step, now)


class ModdedNanoGPTReader:
    """modded-nanogpt ``step:N/M key:value ...`` lines (and parameter-golf's ``N/M key: value``)."""

    name = "modded_nanogpt"
    deep_sniff = True  # its line pattern is specific: safe to test on any stretch of text
    description = "modded-nanogpt / parameter-golf record logs (step:N/M train_loss:X train_time:Yms)"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF.search(head) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        scan_lines(read_text(path), _CANDIDATE, _Parser(), builder)
        return builder.build()
