"""Generic metric logs: JSON Lines (one object per line) and CSV (a header row).

These are what most hand-written training loops emit. Column names are mapped to
canonical metrics by :mod:`analysis.logs.names`; nested objects are flattened with
``/`` (``{"extras": {"mfu": 0.4}}`` -> ``extras/mfu``); non-numeric values are ignored.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import LogParseError
from .base import LogTable, to_float, to_step
from .builder import TableBuilder
from .csv_fast import MIN_FAST_BYTES, read_csv_columns, uniform_fields
from .jsonl_fast import SUMMARY_PREFIX, block_bounds, read_block
from .names import CANONICAL_ALIASES, canonical_metric, find_step_key, find_wall_time_key


def _flatten(obj: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts flattened to ``a/b`` keys."""
    flat: dict[str, object] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _wall_number(value: object) -> float | None:
    """A wall time as unix seconds: numbers as they are, ISO-8601 strings parsed (as UTC)."""
    number = to_float(value)
    if number is not None or not isinstance(value, str):
        return number
    try:
        stamp = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()


def _split_record(
    record: dict[str, object], step_key: str | None, wall_key: str | None
) -> tuple[int | None, dict[str, float], float | None]:
    """(step, numeric metrics, wall time) of one flat record; step None if unusable."""
    step_value = to_step(record.get(step_key)) if step_key else None
    if step_key and (step_value is None or not math.isfinite(step_value)):
        return None, {}, None
    wall = _wall_number(record.get(wall_key)) if wall_key else None
    metrics: dict[str, float] = {}
    prefix = SUMMARY_PREFIX if "train_runtime" in record else ""
    for key, value in record.items():
        if key in (step_key, wall_key):
            continue
        number = to_float(value)
        if number is not None:
            metrics[prefix + key] = number
    return (int(step_value) if step_value is not None else None), metrics, wall


def add_json_record(obj: object, builder: TableBuilder) -> None:
    """Add one JSON object as a record (flattened, canonical keys); count it skipped if unusable."""
    if not isinstance(obj, dict):
        builder.skip()
        return
    flat = _flatten(obj)
    keys = list(flat)
    step, metrics, wall = _split_record(flat, find_step_key(keys), find_wall_time_key(keys))
    if step is None:
        builder.skip()
        return
    builder.add(step, metrics, wall)


class JsonlReader:
    """One JSON object per line, with a step key (``step``, ``global_step``, ``iter``...)."""

    name = "jsonl"
    description = "JSON Lines metric log: one object per line with a step key"

    def sniff(self, path: Path, head: str) -> bool:
        for line in head.splitlines():
            line = line.strip()
            if not line:
                continue
            if not line.startswith("{"):
                return False
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return False
            return isinstance(obj, dict) and find_step_key(list(_flatten(obj))) is not None
        return False

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise LogParseError(path, None, e.strerror or str(e)) from e
        # Well-formed blocks go through pyarrow; only a block with a bad line is read line by line.
        for start, end in block_bounds(data):
            if not read_block(data[start:end], builder):
                for line in data[start:end].decode("utf-8", errors="replace").splitlines():
                    self._read_line(line, builder)
        return builder.build()

    @staticmethod
    def _read_line(line: str, builder: TableBuilder) -> None:
        line = line.strip()
        if not line:
            return
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            builder.skip()
            return
        add_json_record(obj, builder)


class CsvReader:
    """A CSV with a header row; a step column if there is one, else the row number is the step."""

    name = "csv"
    description = "CSV metric log with a header row (step column optional)"

    def sniff(self, path: Path, head: str) -> bool:
        lines = [ln for ln in head.splitlines() if ln.strip()]
        if len(lines) == 1:
            return is_header_only(lines[0])
        if len(lines) < 2 or lines[0].lstrip().startswith("{"):
            return False
        try:
            header = next(csv.reader([lines[0]]))
            first = next(csv.reader([lines[1]]))
        except (csv.Error, StopIteration):
            return False
        if len(header) != len(first):
            return False
        return any(to_float(cell) is not None for cell in first)

    def read(self, path: Path) -> LogTable:
        return read_csv_records(path, self.name)


def is_header_only(line: str) -> bool:
    """Whether a file's only line is a metric log's header: a CSV just created, before its first row.

    It is an empty log of this format, not an unknown file (issue 19). Names only (no number), at
    least two, one of them a step key or a metric CkptSelect knows, so a one-line note is not taken.
    """
    if line.lstrip().startswith("{"):
        return False
    try:
        header = [h.strip() for h in next(csv.reader([line]))]
    except (csv.Error, StopIteration):
        return False
    if len(header) < 2 or any(not h or to_float(h) is not None for h in header):
        return False
    return find_step_key(header) is not None or any(canonical_metric(h) in CANONICAL_ALIASES for h in header)


# W&B panel "Export CSV" adds min/max envelope columns beside each metric.
_WANDB_ENVELOPE = ("__MIN", "__MAX")


def _metric_name(column: str) -> str:
    """A CSV column as a metric name: W&B's ``"<run> - <metric>"`` loses the run prefix."""
    return column.rsplit(" - ", 1)[-1] if " - " in column else column


def read_csv_records(path: Path, fmt: str, fast: bool = True) -> LogTable:
    """Read a header-row CSV (sparse cells allowed) into a table named ``fmt``.

    The step is the step column if there is one, else the row number. A single column
    whose header is a number or empty (a pandas Series dump) is taken as the train loss.
    Big well-formed files take the column-wise path of :mod:`.csv_fast` (``fast=False``
    forces the row-by-row reader, which counts malformed rows).
    """
    builder = TableBuilder(path, fmt)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise LogParseError(path, None, e.strerror or str(e)) from e
    layout = csv_layout(path, text, builder)
    body = text[text.find("\n") + 1:] if "\n" in text else ""
    if not body.strip():
        builder.note(f"{path.name}: a header and no rows yet")
    add_csv_body(body, layout, builder, fast and len(text) >= MIN_FAST_BYTES)
    return builder.build()


@dataclass(frozen=True)
class CsvLayout:
    """What a CSV's header says: its width, the columns kept, their metric names, the step and time columns."""

    width: int
    keep: list[int]
    names: list[str]
    step_key: str | None
    wall_key: str | None


def csv_layout(path: Path, text: str, builder: TableBuilder) -> CsvLayout:
    """The layout of the CSV whose text starts with ``text`` (its first line is the header).

    Raises:
        LogParseError: there is no header row.
    """
    reader = csv.reader(io.StringIO(text[:text.find("\n") + 1 or None].replace("\x00", "")))
    try:
        header = [h.strip() for h in next(reader)]
    except (StopIteration, csv.Error) as e:
        raise LogParseError(path, 1, "no header row") from e
    if len(header) == 1 and (header[0] == "" or to_float(header[0]) is not None):
        header = ["train_loss"]
        builder.note(f"{path.name}: one unnamed column, read as train_loss by row number")
    keep = [i for i, h in enumerate(header) if not h.endswith(_WANDB_ENVELOPE)]
    names = [_metric_name(header[i]) for i in keep]
    return CsvLayout(len(header), keep, names, find_step_key(names), find_wall_time_key(names))


def add_csv_body(body: str, layout: CsvLayout, builder: TableBuilder, fast: bool) -> None:
    """Add the rows of ``body`` (CSV text after the header): column-wise when ``fast`` and it is safe, else row by row.

    A follower (analysis.follow) calls it once per stretch of new complete lines, so a table read in
    pieces equals one read whole (issue 23).
    """
    names = layout.names
    if (fast and "train_runtime" not in names and len(set(names)) == len(names)
            and uniform_fields(body, layout.width)):
        read_csv_columns(body, layout.width, layout.keep, names, layout.step_key, layout.wall_key, builder)
        return
    reader = csv.reader(io.StringIO(body.replace("\x00", "")))
    for row_no, row in enumerate(_safe_rows(reader, builder)):
        if len(row) != layout.width:
            if any(cell.strip() for cell in row):
                builder.skip()
            continue
        record = {names[j]: row[i] for j, i in enumerate(layout.keep) if row[i].strip() != ""}
        if layout.step_key is None:
            record["step"] = str(row_no)
        step, metrics, wall = _split_record(record, layout.step_key or "step", layout.wall_key)
        if step is None:
            builder.skip()
            continue
        builder.add(step, metrics, wall)


def _safe_rows(reader, builder: TableBuilder):
    """Rows of a csv.reader, skipping (and counting) rows the csv module rejects."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error:
            builder.skip()

