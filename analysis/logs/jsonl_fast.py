"""The fast path of the JSONL reader: blocks of lines parsed by pyarrow, column-wise.

``json.loads`` per line plus a Python record per line costs ~5 us a line; a million-step
log would take seconds. pyarrow's JSON reader parses a block in C++ into columns, which
go to the builder as numpy arrays. The file is cut into blocks at line ends so that a
malformed line costs a line-by-line read of its own block only.
"""

from __future__ import annotations

import numpy as np

from .base import to_float, to_step
from .builder import MAX_STEP, TableBuilder
from .names import STEP_KEYS, find_wall_time_key

# Bytes per block: big enough for pyarrow's threads, small enough that a bad line's
# block is cheap to re-read line by line.
BLOCK_BYTES = 8 << 20
# Keys of an end-of-run summary record (HF/ms-swift ``train_runtime`` + run-mean
# ``train_loss``) go under this prefix so they are not read as a point of the curve.
SUMMARY_PREFIX = "summary/"


def block_bounds(data: bytes, size: int = BLOCK_BYTES) -> list[tuple[int, int]]:
    """(start, end) byte ranges of about ``size`` bytes, each ending at a line end."""
    bounds, start = [], 0
    while start < len(data):
        end = data.find(b"\n", min(start + size, len(data)))
        end = len(data) if end < 0 else end + 1
        bounds.append((start, end))
        start = end
    return bounds


def read_block(chunk: bytes, builder: TableBuilder) -> bool:
    """Read a block of well-formed JSON lines column-wise with pyarrow (C++, multithreaded).

    Returns False, having added nothing, when the block needs the line-by-line reader:
    a malformed line, a NaN literal, a type that changes between lines, no step key.
    """
    try:
        import pyarrow as pa
        import pyarrow.json as pa_json
    except ImportError:  # pragma: no cover - pyarrow comes with pandas' extras
        return False
    try:
        table = pa_json.read_json(pa.BufferReader(chunk), read_options=pa_json.ReadOptions(block_size=1 << 20))
        while any(pa.types.is_struct(f.type) for f in table.schema):
            table = table.flatten()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError, ValueError):
        return False
    names = [n.replace(".", "/") for n in table.column_names]
    columns = {name: _column(table.column(i), name.lower() in STEP_KEYS) for i, name in enumerate(names)}
    step_key, wall_key = _busiest_key(columns, STEP_KEYS), find_wall_time_key(names)
    if step_key is None or table.num_rows == 0:
        return False
    steps, step_ok = columns.pop(step_key)
    step_ok &= np.abs(np.nan_to_num(steps, nan=0.0)) <= MAX_STEP   # an int64 must hold it
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
        parse = to_step if is_step else to_float
        parsed = [parse(v) if v is not None else None for v in column.to_pylist()]
        mask = np.array([v is not None for v in parsed], dtype=bool)
        return np.array([np.nan if v is None else v for v in parsed], dtype=np.float64), mask
    return np.full(len(column), np.nan), np.zeros(len(column), dtype=bool)
