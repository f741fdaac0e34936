"""NeMo 2 / BioNeMo (Lightning + Megatron) stdout.

Lines read::

    Training epoch 0, iteration 1/99 | lr: 2e-05 | global_batch_size: 4 | global_step: 1 |
        reduced_train_loss: 1.31 | train_step_timing in s: 2.262 | consumed_samples: 8 | val_loss: 1.2

The step is ``global_step``. NeMo repeats the last ``val_loss`` on every line after a
validation, so it is recorded only when it changes. ``train_step_timing in s`` becomes
``step_time_ms``.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import LogTable
from .builder import TableBuilder
from .text import NUMBER, key_values, read_text, scan_lines, strip_ansi

_LINE = re.compile(r"Training epoch \d+, iteration \d+/\d+ \|(.*)$")
_KV = re.compile(rf"\|?\s*([^|:]+?)\s*:\s*({NUMBER})\s*(?=\||$)")
_SNIFF = re.compile(r"Training epoch \d+, iteration \d+/\d+ \|.*global_step")


class _Parser:
    """Remembers the last val_loss so that repeats are not new evaluations."""

    def __init__(self) -> None:
        self.last_val: float | None = None

    def __call__(self, line: str) -> tuple[int, dict[str, float]] | None:
        match = _LINE.search(strip_ansi(line))
        if match is None:
            return None
        values = key_values(match.group(1), _KV)
        if "global_step" not in values:
            return None
        step = int(values.pop("global_step"))
        if "train_step_timing in s" in values:
            values["step_time_ms"] = values.pop("train_step_timing in s") * 1000.0
        if "val_loss" in values:
            val = values.pop("val_loss")
            if val != self.last_val:
                values["val_loss"] = val
            self.last_val = val
        return step, values


class NemoReader:
    """NeMo 2 training stdout (``Training epoch E, iteration i/N | key: value | ...``)."""

    name = "nemo"
    deep_sniff = True  # its line pattern is specific: safe to test on any stretch of text
    description = "NeMo 2 / BioNeMo stdout (Training epoch E, iteration i/N | global_step | reduced_train_loss)"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF.search(head) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        scan_lines(read_text(path), r"Training epoch \d+, iteration", _Parser(), builder)
        return builder.build()
