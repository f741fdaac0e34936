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

import gc
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LogParseError
from .builder import TableBuilder

# A number as trainers print it, including nan/inf (kept and flagged, never dropped).
NUMBER = r"[-+]?(?:\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|NaN|inf|Inf|INF|NAN)"
# A value token for the fixed-shape fast path: a cheap character class (4x faster to
# match than NUMBER); float() then decides, and a token it rejects marks the line skipped.
PLAIN_NUMBER = r"[-+\w.]+"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def read_text(path: Path) -> str:
    """The whole file decoded leniently (bad bytes never stop a read)."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise LogParseError(path, None, e.strerror or str(e)) from e


def read_json(path: Path) -> object:
    """A whole JSON log file, decoded as leniently as :func:`read_text`, parsed.

    Raises:
        LogParseError: the file cannot be read or is not JSON (the message says which).
    """
    try:
        return json.loads(path.read_bytes().decode("utf-8", errors="replace"))
    except (OSError, ValueError) as e:
        raise LogParseError(path, None, f"not valid JSON ({e})") from e


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
    """One line shape: a regex (anchored with ``^``) with a ``step`` group and one group per metric.

    ``pattern`` uses named groups only; group ``step`` is the step and every other group
    is a metric whose raw name is the group name (or ``names[group]``). ``literal`` is
    the text every line of this shape starts with: lines that start with it but do not
    match are counted as skipped, and a rule whose literal never occurs costs nothing.
    ``scale`` multiplies a group's value (units: seconds -> ms).
    """

    pattern: str
    literal: str
    names: dict[str, str] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    flags: tuple[str, ...] = ()   # groups whose presence means 1.0 (e.g. "checkpoint_saved")


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of small tuples are made.

    They hold no cycles, but their sheer number triggers collections that otherwise
    take as long as the parsing itself.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def scan_rules(text: str, rules: list[LineRule], builder: TableBuilder) -> None:
    """Match each rule over the whole text (``re.findall``, in C) and add the records in file order.

    Records of different rules are interleaved by step when every rule's steps only go
    up (the common case, no positions needed); otherwise by their offsets in the file,
    so that restarts are seen where they happen.
    """
    blocks = []
    # "\n" + pattern instead of "^" + pattern: a literal start lets the regex engine jump
    # between candidate lines (15x faster for a rare line shape in a big log).
    text = "\n" + text
    for rule in rules:
        if rule.literal not in text:
            continue
        compiled = re.compile("\n" + rule.pattern.removeprefix("^"), re.M)
        with no_gc():
            found = compiled.findall(text)
            builder.skip(max(0, _count_line_starts(text, rule.literal) - len(found)))
            if found:
                steps, columns, malformed = _columns(rule, compiled, found)
                blocks.append((rule, compiled, (steps, columns)))
                builder.skip(malformed)
            del found
    if not blocks:
        return
    steps = np.concatenate([b[2][0] for b in blocks])
    if len(blocks) == 1 and np.all(np.diff(steps) >= 0):
        builder.add_columns(steps, blocks[0][2][1])
        return
    if all(np.all(np.diff(b[2][0]) >= 0) for b in blocks):
        order = np.argsort(steps, kind="stable")
    else:
        offsets = np.concatenate([[m.start() for m in compiled.finditer(text)] for _, compiled, _ in blocks])
        order = np.argsort(offsets, kind="stable")
    metrics: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    start = 0
    for _, _, (rule_steps, columns) in blocks:
        for name, (values, present) in columns.items():
            full_values, mask = np.full(len(steps), np.nan), np.zeros(len(steps), dtype=bool)
            full_values[start:start + len(rule_steps)] = values
            mask[start:start + len(rule_steps)] = present
            _merge(metrics, name, full_values, mask)
        start += len(rule_steps)
    builder.add_columns(steps[order], {k: (v[order], m[order]) for k, (v, m) in metrics.items()})


Column = tuple[np.ndarray, np.ndarray]   # (float values, present mask)


def _columns(rule: LineRule, compiled: re.Pattern[str], found: list) -> tuple[np.ndarray, dict[str, Column], int]:
    """(steps, {metric: (values, present)}, malformed count) of one rule's matches.

    An optional group that did not take part is absent (masked out); a ``nan`` written
    in the log is present with value NaN, so it is kept and flagged. A record with a
    token that is not a number loses that value and counts as malformed.
    """
    names = list(compiled.groupindex)
    if len(names) == 1:
        found = [(x,) for x in found]
    by_group = dict(zip(names, zip(*found)))
    steps, malformed_step = _steps(by_group.pop("step"))
    malformed = malformed_step.copy()
    columns: dict[str, Column] = {}
    for group, raw in by_group.items():
        if group in rule.flags:
            present = np.array([bool(x) for x in raw], dtype=bool)
            values = np.ones(len(raw))
        else:
            values, present, bad = _floats(raw)
            values *= rule.scale.get(group, 1.0)
            malformed |= bad
        columns[rule.names.get(group, group)] = (values, present & ~malformed_step)
    return steps, columns, int(malformed.sum())


def _steps(raw: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(int64 steps, malformed mask): a step too big for int64 is malformed (its record dropped)."""
    try:
        return np.array(raw, dtype=np.int64), np.zeros(len(raw), dtype=bool)
    except (OverflowError, ValueError):
        ok = np.array([len(x) < 18 and x.isdigit() for x in raw], dtype=bool)
        return np.array([int(x) if good else 0 for x, good in zip(raw, ok)], dtype=np.int64), ~ok


def _floats(raw: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, present, malformed) of captured tokens; '' is absent, non-numbers malformed."""
    try:
        values = np.array(raw, dtype=np.float64)   # C loop; fails on '' or garbage
        return values, np.ones(len(raw), dtype=bool), np.zeros(len(raw), dtype=bool)
    except ValueError:
        pass
    parsed = [parse_number(x) if x else None for x in raw]
    present = np.array([v is not None for v in parsed], dtype=bool)
    bad = np.array([bool(x) for x in raw], dtype=bool) & ~present
    values = np.array([np.nan if v is None else v for v in parsed], dtype=np.float64)
    return values, present, bad


def _count_line_starts(text: str, literal: str) -> int:
    """Lines starting with ``literal`` (``text`` starts with a newline); with "" the non-blank lines."""
    if not literal:
        return len(re.findall(r"^[ \t]*\S", text, re.M))
    return text.count("\n" + literal)


def _merge(metrics: dict[str, tuple[np.ndarray, np.ndarray]], name: str, values: np.ndarray, mask: np.ndarray) -> None:
    """Add one column; two rules may feed the same metric."""
    if name in metrics:
        old_values, old_mask = metrics[name]
        values = np.where(mask, values, old_values)
        mask = mask | old_mask
    metrics[name] = (values, mask)


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
