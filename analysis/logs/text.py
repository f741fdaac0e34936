"""Shared machinery of the text (stdout) log readers.

Two engines, so that each format module is mostly its regular expressions:

* :func:`scan_rules` runs one combined regular expression over the whole text
  (``re.findall`` in C, then numpy): the fast path for logs with a fixed line shape
  (nanoGPT, llm.c, build-nanogpt), a million lines in about a second.
* :func:`scan_lines` hands every line that looks like a record to a per-format
  ``parse`` function: for ``key: value`` logs whose set of keys varies (Megatron,
  fairseq, torchtitan...). A line that looks like a record but fails to parse is
  counted as skipped, never fatal.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LogParseError
from .builder import TableBuilder

# A number as trainers print it, including nan/inf (kept and flagged, never dropped).
NUMBER = r"[-+]?(?:\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|NaN|inf|Inf|INF|NAN)"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def read_text(path: Path) -> str:
    """The whole file decoded leniently (bad bytes never stop a read)."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise LogParseError(path, None, e.strerror or str(e)) from e


def parse_number(text: str) -> float | None:
    """``'1,234.5'`` -> 1234.5, ``'nan'`` -> nan; None for anything else."""
    try:
        return float(text.replace(",", ""))
    except (ValueError, AttributeError):
        return None


def strip_ansi(text: str) -> str:
    """Text without terminal colour/cursor escapes (rich tables, tqdm)."""
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class LineRule:
    """One line shape: a regex with a ``step`` group and one group per metric.

    ``pattern`` must use named groups only; group ``step`` is the step and every other
    group is a metric whose raw name is the group name (or ``names[group]``).
    ``scale`` multiplies a group's value (units: seconds -> ms). ``prefix`` is a regex
    matching the start of lines that SHOULD have this shape; those that don't are
    counted as skipped.
    """

    pattern: str
    prefix: str
    names: dict[str, str] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    flags: tuple[str, ...] = ()   # groups whose presence means 1.0 (e.g. "checkpoint_saved")


def scan_rules(text: str, rules: list[LineRule], builder: TableBuilder) -> None:
    """Match every rule over the whole text at once and add the records in file order."""
    groups: list[tuple[int, str]] = []
    parts = []
    for r_index, rule in enumerate(rules):
        renamed = re.sub(r"\(\?P<(\w+)>", lambda m: f"(?P<r{r_index}_{m.group(1)}>", rule.pattern)
        parts.append(f"(?:{renamed})")
        groups.extend((r_index, name) for name in re.findall(r"\(\?P<(\w+)>", rule.pattern))
    combined = re.compile("|".join(parts), re.M)
    found = combined.findall(text)
    if len(groups) == 1:
        found = [(x,) for x in found]
    table = np.array(found, dtype=object).reshape(len(found), len(groups)) if found else np.empty((0, len(groups)), object)
    steps = np.zeros(len(found), dtype=np.int64)
    metrics: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for col, (r_index, name) in enumerate(groups):
        rule = rules[r_index]
        column = table[:, col]
        mask = column != ""
        if name == "step":
            steps[mask] = column[mask].astype(np.int64)
            continue
        values = np.full(len(found), np.nan)
        if name in rule.flags:
            values[mask] = 1.0
        else:
            values[mask] = _to_floats(column[mask]) * rule.scale.get(name, 1.0)
        _merge(metrics, rule.names.get(name, name), values, mask)
    builder.add_columns(steps, metrics)
    expected = sum(len(re.findall(rule.prefix, text, re.M)) for rule in rules)
    builder.skip(max(0, expected - len(found)))


def _merge(metrics: dict[str, tuple[np.ndarray, np.ndarray]], name: str, values: np.ndarray, mask: np.ndarray) -> None:
    """Add one column; two rules may feed the same metric."""
    if name in metrics:
        old_values, old_mask = metrics[name]
        values = np.where(mask, values, old_values)
        mask = mask | old_mask
    metrics[name] = (values, mask)


def _to_floats(column: np.ndarray) -> np.ndarray:
    """Strings to floats; thousands separators allowed, unparsable -> NaN."""
    try:
        return column.astype(np.float64)
    except ValueError:
        return np.array([v if (v := parse_number(s)) is not None else np.nan for s in column], dtype=np.float64)


Parse = Callable[[str], "tuple[int, dict[str, float]] | tuple[int, dict[str, float], float | None] | None"]


def scan_lines(text: str, candidate: str, parse: Parse, builder: TableBuilder) -> None:
    """Feed every line matching ``candidate`` (a regex) to ``parse``; None -> skipped.

    ``parse`` returns ``(step, metrics)`` or ``(step, metrics, wall_time)``; a record
    with no metrics is dropped silently (a progress line without numbers).
    """
    for match in re.finditer(f"^.*(?:{candidate}).*$", text, re.M):
        try:
            record = parse(match.group(0))
        except (ValueError, IndexError, OverflowError):
            record = None
        if record is None:
            builder.skip()
            continue
        wall = record[2] if len(record) > 2 else None
        builder.add(record[0], record[1], wall)


def key_values(text: str, pattern: re.Pattern[str]) -> dict[str, float]:
    """Every ``key<sep>number`` pair that ``pattern`` (groups: key, value) finds."""
    out: dict[str, float] = {}
    for key, value in pattern.findall(text):
        number = parse_number(value)
        if number is not None:
            out[key.strip()] = number
    return out
