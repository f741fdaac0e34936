"""The fast path of the CSV readers: pandas' C parser, column-wise.

Used only when it gives exactly what the row-by-row reader would: no quote characters
in the body (so a comma is always a separator) and every non-blank line with as many
fields as the header, checked with numpy on the raw bytes. Otherwise the caller reads
row by row, counting each malformed row.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from .builder import MAX_STEP, TableBuilder

# Below this size the row-by-row reader is as fast and simpler to reason about.
MIN_FAST_BYTES = 256 << 10


def uniform_fields(body: str, fields: int) -> bool:
    """True if every non-blank line of ``body`` has ``fields`` comma-separated fields and no quotes."""
    if '"' in body:
        return False
    raw = np.frombuffer(body.encode("utf-8"), dtype=np.uint8)
    ends = np.flatnonzero(raw == 10)
    if not len(raw) or raw[-1] != 10:
        ends = np.append(ends, len(raw))
    starts = np.concatenate([[0], ends[:-1] + 1])
    commas = np.flatnonzero(raw == 44)
    counts = np.searchsorted(commas, ends) - np.searchsorted(commas, starts)
    blank = (ends - starts) <= 1   # "" or a lone "\r"
    return bool(np.all(counts[~blank] == fields - 1))


def read_csv_columns(body: str, header_size: int, keep: list[int], names: list[str],
                     step_key: str | None, wall_key: str | None, builder: TableBuilder) -> None:
    """Parse ``body`` (the CSV without its header line) and add its records column-wise."""
    # Only "" is missing: a column holding "nan" stays text (and goes through _numbers), so a
    # NaN in a numeric column always means an empty cell.
    frame = pd.read_csv(io.StringIO(body), header=None, names=list(range(header_size)),
                        keep_default_na=False, na_values=[""], skip_blank_lines=True, engine="c")
    columns = {names[j]: frame[i] for j, i in enumerate(keep)}
    if step_key is None:
        steps = np.arange(len(frame), dtype=np.float64)
    else:
        raw = columns.pop(step_key)
        if not pd.api.types.is_numeric_dtype(raw):
            raw = raw.astype(str).str.split("/", n=1).str[0]
        steps = _numbers(raw)[0]
    step_ok = np.isfinite(steps) & (np.abs(np.nan_to_num(steps)) <= MAX_STEP)
    walls = _walls(columns.pop(wall_key)) if wall_key else None
    metrics = {}
    for name, raw in columns.items():
        values, present = _numbers(raw)
        if present.any():
            metrics[name] = (values, present & step_ok)
    builder.skip(int((~step_ok).sum()))
    builder.add_columns(np.where(step_ok, steps, 0).astype(np.int64), metrics, walls)


def _numbers(raw: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float values, present): like ``to_float`` per cell; 'nan'/'inf' are present."""
    if pd.api.types.is_numeric_dtype(raw):
        values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, ~np.isnan(values)
    text = raw.astype(str).str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    present = np.isfinite(values)
    if not present.all():
        words = text.str.lower().str.lstrip("+-").isin(["nan", "inf", "infinity"]).to_numpy(dtype=bool)
        present |= words
    return values, present & raw.notna().to_numpy(dtype=bool)


def _walls(raw: pd.Series) -> np.ndarray:
    """Unix seconds: numbers as they are, ISO-8601 strings as UTC (like the row reader)."""
    values, present = _numbers(raw)
    if present.any() or raw.isna().all():
        return np.where(present, values, np.nan)
    stamps = pd.to_datetime(raw.str.strip(), errors="coerce", utc=True, format="ISO8601")
    seconds = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return seconds.to_numpy(dtype=np.float64, na_value=np.nan)
