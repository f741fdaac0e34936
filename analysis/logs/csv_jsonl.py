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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import LogParseError
from .base import LogTable, to_float
from .builder import TableBuilder
from .names import STEP_KEYS, find_step_key, find_wall_time_key


# Keys of an end-of-run summary record (HF/ms-swift ``train_runtime`` + run-mean
# ``train_loss``) go under this prefix so they are not read as a point of the curve.
SUMMARY_PREFIX = "summary/"


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


def _step_number(value: object) -> float | None:
    """A step as a number; ``"12/2353"`` (ms-swift's ``global_step/max_steps``) -> 12."""
    if isinstance(value, str) and "/" in value:
        value = value.split("/", 1)[0]
    return to_float(value)


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
    step_value = _step_number(record.get(step_key)) if step_key else None
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
        if not _read_fast(path, builder):
            try:
                handle = path.open("r", encoding="utf-8", errors="replace")
            except OSError as e:
                raise LogParseError(path, None, e.strerror or str(e)) from e
            with handle:
                for line in handle:
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


class CsvReader:
    """A CSV with a header row; a step column if there is one, else the row number is the step."""

    name = "csv"
    description = "CSV metric log with a header row (step column optional)"

    def sniff(self, path: Path, head: str) -> bool:
        lines = [ln for ln in head.splitlines() if ln.strip()]
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


# W&B panel "Export CSV" adds min/max envelope columns beside each metric.
_WANDB_ENVELOPE = ("__MIN", "__MAX")


def _metric_name(column: str) -> str:
    """A CSV column as a metric name: W&B's ``"<run> - <metric>"`` loses the run prefix."""
    return column.rsplit(" - ", 1)[-1] if " - " in column else column


def read_csv_records(path: Path, fmt: str) -> LogTable:
    """Read a header-row CSV (sparse cells allowed) into a table named ``fmt``.

    The step is the step column if there is one, else the row number. A single column
    whose header is a number or empty (a pandas Series dump) is taken as the train loss.
    """
    builder = TableBuilder(path, fmt)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise LogParseError(path, None, e.strerror or str(e)) from e
    reader = csv.reader(io.StringIO(text.replace("\x00", "")))
    try:
        header = [h.strip() for h in next(reader)]
    except (StopIteration, csv.Error) as e:
        raise LogParseError(path, 1, "no header row") from e
    if len(header) == 1 and (header[0] == "" or to_float(header[0]) is not None):
        header = ["train_loss"]
        builder.note(f"{path.name}: one unnamed column, read as train_loss by row number")
    keep = [i for i, h in enumerate(header) if not h.endswith(_WANDB_ENVELOPE)]
    names = [_metric_name(header[i]) for i in keep]
    step_key, wall_key = find_step_key(names), find_wall_time_key(names)
    for row_no, row in enumerate(_safe_rows(reader, builder)):
        if len(row) != len(header):
            if any(cell.strip() for cell in row):
                builder.skip()
            continue
        record = {names[j]: row[i] for j, i in enumerate(keep) if row[i].strip() != ""}
        if step_key is None:
            record["step"] = str(row_no)
        step, metrics, wall = _split_record(record, step_key or "step", wall_key)
        if step is None:
            builder.skip()
            continue
        builder.add(step, metrics, wall)
    return builder.build()


def _safe_rows(reader, builder: TableBuilder):
    """Rows of a csv.reader, skipping (and counting) rows the csv module rejects."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error:
            builder.skip()


def _read_fast(path: Path, builder: TableBuilder) -> bool:
    """Read a well-formed JSONL file column-wise with pyarrow (C++, multithreaded).

    Returns False, having added nothing, when the file needs the line-by-line reader:
    a malformed line, a NaN literal, a type that changes between lines, no step key.
    """
    try:
        import pyarrow as pa
        import pyarrow.json as pa_json
    except ImportError:  # pragma: no cover - pyarrow comes with pandas' extras
        return False
    try:
        table = pa_json.read_json(str(path), read_options=pa_json.ReadOptions(block_size=1 << 20))
        while any(pa.types.is_struct(f.type) for f in table.schema):
            table = table.flatten()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError):
        return False
    names = [n.replace(".", "/") for n in table.column_names]
    columns = {name: _column(table.column(i), name.lower() in STEP_KEYS) for i, name in enumerate(names)}
    step_key, wall_key = _busiest_key(columns, STEP_KEYS), find_wall_time_key(names)
    if step_key is None or table.num_rows == 0:
        return False
    steps, step_ok = columns.pop(step_key)
    if not step_ok.any() or (step_key and not np.all(np.isfinite(steps[step_ok]))):
        return False
    walls = columns.pop(wall_key)[0] if wall_key else None
    summary = columns["train_runtime"][1] if "train_runtime" in columns else np.zeros(len(steps), dtype=bool)
    metrics: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (values, mask) in columns.items():
        # An end-of-run summary row (train_runtime, run-mean train_loss) is not a curve point.
        if (mask & summary).any():
            metrics[f"{SUMMARY_PREFIX}{name}"] = (values, mask & summary & step_ok)
        if (mask & ~summary).any():
            metrics[name] = (values, mask & ~summary & step_ok)
    builder.skip(int((~step_ok).sum()))
    builder.add_columns(np.where(step_ok, steps, 0).astype(np.int64), metrics, walls)
    return True


def _busiest_key(columns: dict[str, tuple[np.ndarray, np.ndarray]], candidates: tuple[str, ...]) -> str | None:
    """The candidate step column present in the most rows (ties: the earlier candidate)."""
    lowered = {name.lower(): name for name in columns}
    best, best_count = None, 0
    for candidate in candidates:
        name = lowered.get(candidate)
        if name is not None and (count := int(columns[name][1].sum())) > best_count:
            best, best_count = name, count
    return best


def _column(column, is_step: bool) -> tuple[np.ndarray, np.ndarray]:
    """(float values, present mask) of one Arrow column; strings parsed like to_float."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        mask = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        return np.where(mask, values, np.nan), mask
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        parse = _step_number if is_step else to_float
        parsed = [parse(v) if v is not None else None for v in column.to_pylist()]
        mask = np.array([v is not None for v in parsed], dtype=bool)
        return np.array([np.nan if v is None else v for v in parsed], dtype=np.float64), mask
    return np.full(len(column), np.nan), np.zeros(len(column), dtype=bool)
