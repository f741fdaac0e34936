"""torchtitan stdout: ``[rank0]:[titan] 2026-08-13 22:49:19,421 - root - INFO - step:  1  loss:  8.1 ...``.

Fields are ``name: value`` separated by two spaces; ``memory: 0.16GiB(0.27%)`` becomes
``memory_gib``, ``tps`` (tokens per second, with thousands separators) ``tokens_per_sec``.
The time stamp becomes the wall time. Validation lines (``validate step: N loss: X`` or
``Validation ... step: N ... loss: X``) give ``val_loss``.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from .base import LogTable
from .builder import TableBuilder
from .text import NUMBER, parse_number, read_text, scan_lines, strip_ansi

_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:,(\d{3}))?")
_STEP = re.compile(r"\bstep:\s*(\d+)\s+(.*)$")
_KV = re.compile(rf"(\w+):\s+({NUMBER})(GiB)?")
_SNIFF = re.compile(r"\[titan\].*\bstep:\s*\d+\s+loss:")
_CANDIDATE = r"\[titan\].*\bstep:\s*\d+"
_RENAME = {"memory": "memory_gib", "tps": "tokens_per_sec"}


def _wall(line: str) -> float | None:
    """The log line's time stamp as unix seconds (taken as UTC: torchtitan logs local time)."""
    match = _STAMP.search(line)
    if match is None:
        return None
    stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    return stamp.timestamp() + int(match.group(2) or 0) / 1000


def _parse(line: str) -> tuple[int, dict[str, float], float | None] | None:
    line = strip_ansi(line)
    match = _STEP.search(line)
    if match is None:
        return None
    prefix = "val/" if re.search(r"validat", line, re.I) else ""
    metrics = {}
    for key, value, _unit in _KV.findall(match.group(2)):
        number = parse_number(value)
        if number is not None:
            name = _RENAME.get(key, key)
            metrics["val_loss" if prefix and key == "loss" else f"{prefix}{name}"] = number
    return int(match.group(1)), metrics, _wall(line)


class TorchtitanReader:
    """torchtitan training stdout."""

    name = "torchtitan"
    deep_sniff = True  # its line pattern is specific: safe to test on any stretch of text
    description = "torchtitan stdout ([titan] ... step: N  loss: X  grad_norm: ...  tps: ...)"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF.search(head) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        scan_lines(read_text(path), _CANDIDATE, _parse, builder)
        return builder.build()
