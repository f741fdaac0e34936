"""One log file read incrementally: each look reads only the bytes written since the last one.

JSON Lines and CSV logs are read from the byte offset where the last read stopped; the partial last
line is held back until it ends (or the file stops changing between two looks: a writer that left no
final newline). Other formats are read again whole when their size or modification time changes.
A file that got shorter than the offset, or whose first bytes changed (rotated, truncated,
rewritten), is read again from the start. Either way the table equals one read of the file whole
(issue 23).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..errors import LogParseError
from .base import LogTable
from .builder import MetricPart, TableBuilder, continues, extend_parts, metric_parts, step_segments
from .csv_fast import MIN_FAST_BYTES
from .csv_jsonl import CsvLayout, JsonlReader, add_csv_body, csv_layout
from .jsonl_fast import block_bounds, read_block

# Bytes of the file's start remembered to notice a file replaced by another (log rotation).
HEAD_BYTES = 256
# Formats read from where the last read stopped; every other one is read again whole when it changes.
INCREMENTAL_FORMATS = ("jsonl", "csv")
# A file unchanged this long is finished writing its last line, even one without a line end.
SETTLED_NS = 5_000_000_000


class LogFollower:
    """A log file of one format, read again cheaply as it grows (:meth:`read`)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.format = Path(path), fmt
        self._reset()

    def _reset(self) -> None:
        """Forget everything read: the next read starts from the file's first byte."""
        self._offset = 0
        self._head = b""
        self._look: tuple[int, int] | None = None
        self._builder: TableBuilder | None = None
        self._layout: CsvLayout | None = None
        self._whole = self.format not in INCREMENTAL_FORMATS
        self._table: LogTable | None = None
        self._held = 0   # bytes of a partial last line held back at the last look
        self._parts: dict[str, MetricPart] | None = None   # the table's rows per metric (incremental formats)
        self._restarts = 0
        self._segments: tuple[tuple[int, int], ...] = ()
        self._blocks_read = 0
        self._last_step: int | None = None
        self._split: tuple[LogTable | None, dict[str, MetricPart]] = (None, {})

    def read(self) -> LogTable:
        """The table of the file as it is now (complete lines only), reading only what is new.

        Raises:
            LogParseError: the file cannot be read (vanished, no permission, no CSV header).
        """
        look = _look(self.path)
        if self._table is not None and look == self._look and not self._held:
            return self._table
        if self._table is not None and self._replaced(look[0]):
            self._reset()
        # A held-back tail is complete when the file did not change since the last look or for SETTLED_NS.
        settled = look == self._look or time.time_ns() - look[1] > SETTLED_NS
        self._look = look
        if self._whole:
            self._read_whole(look[0], settled)
        else:
            self._read_new(look[0], settled)
        return self._table

    def _read_whole(self, size: int, settled: bool) -> None:
        """Read the file whole, unless it ends in a partial line: then the last table stays until the line ends."""
        from . import LOG_READERS
        partial = size > 0 and not settled and _read_range(self.path, size - 1, 1) != b"\n"
        self._held = int(partial)
        if self._table is None or not partial:
            self._table = LOG_READERS[self.format].read(self.path)

    def _replaced(self, size: int) -> bool:
        """True when the file is shorter than what was read, or its first bytes are not those read."""
        if size < self._offset + self._held:
            return True
        return bool(self._head) and _read_range(self.path, 0, len(self._head)) != self._head

    def _read_new(self, size: int, settled: bool) -> None:
        """Add the complete lines written since the last read to the table."""
        data = _read_range(self.path, self._offset, size - self._offset)
        end = len(data) if settled else data.rfind(b"\n") + 1
        self._held = len(data) - end
        if self._offset < HEAD_BYTES:
            self._head = (self._head + data[:end])[:HEAD_BYTES]
        if end or self._table is None:
            self._add(data[:end])

    def _add(self, chunk: bytes) -> None:
        """Feed ``chunk`` (whole lines) to the format's reader; the table is built again from all blocks."""
        if self.format == "csv":
            if not self._add_csv(chunk):
                return
        else:
            self._builder = self._builder or TableBuilder(self.path, self.format)
            _add_jsonl(chunk, self._builder)
        self._offset += len(chunk)
        self._assemble()

    def _assemble(self) -> None:
        """The table from the builder's blocks: only the new blocks' rows are added when the steps go on."""
        blocks = self._builder.blocks()
        new = blocks[self._blocks_read:]
        if not blocks:
            self._parts, self._restarts, self._segments = {}, 0, ()
        elif self._blocks_read and continues(self._last_step, new):
            self._parts = extend_parts(self._parts, new)
            self._segments = _extend_segments(self._segments, new)
        else:   # the first read, or the step went back (a resumed run): everything again, as a whole read does
            self._parts, self._restarts = metric_parts(blocks)
            self._segments = step_segments(np.concatenate([b[0] for b in blocks]))
        last = [b[0][-1] for b in blocks if len(b[0])]
        self._last_step = int(last[-1]) if last else None
        self._blocks_read = len(blocks)
        self._table = self._builder.table(self._parts, self._restarts, self._segments)

    def metric_parts(self) -> dict[str, MetricPart]:
        """{canonical metric: (steps, values, wall times)} of the table read last (see builder.metric_parts)."""
        if not self._whole and self._parts is not None:
            return self._parts
        if self._table is None:
            return {}
        if self._split[0] is not self._table:   # split once per whole read
            from .base import split_by_metric
            self._split = (self._table, {name: (f["step"].to_numpy(), f["value"].to_numpy(), f["wall_time"].to_numpy())
                                         for name, f in split_by_metric(self._table.frame).items()})
        return self._split[1]

    def _add_csv(self, chunk: bytes) -> bool:
        """Feed CSV lines; False when this file is read whole instead (no rows yet, no step column, quotes)."""
        text = chunk.decode("utf-8", errors="replace")
        if self._layout is None:
            body = text[text.find("\n") + 1:] if "\n" in text else ""
            if not body.strip():   # no row yet: the header alone is read whole until rows come
                return self._read_whole_for_now(incremental=True)
            builder = TableBuilder(self.path, self.format)
            layout = csv_layout(self.path, text, builder)
            if layout.step_key is None or '"' in text or builder.notes:   # row numbers, quotes: read whole
                return self._read_whole_for_now(incremental=False)
            self._builder, self._layout, text = builder, layout, body
        elif '"' in text:   # a quoted cell may hold a line end: only a whole read can tell
            return self._read_whole_for_now(incremental=False)
        add_csv_body(text, self._layout, self._builder, len(text) >= MIN_FAST_BYTES)
        return True

    def _read_whole_for_now(self, incremental: bool) -> bool:
        """Read the file whole; ``incremental=False`` keeps doing so from now on."""
        from . import LOG_READERS
        self._whole = not incremental
        self._table = LOG_READERS[self.format].read(self.path)
        self._held = 0 if self._whole else self._held
        return False


def _extend_segments(segments: tuple[tuple[int, int], ...], blocks: list) -> tuple[tuple[int, int], ...]:
    """``segments`` with the records of ``blocks`` (which do not restart) added to the last one."""
    steps = [b[0] for b in blocks if len(b[0])]
    if not steps:
        return segments
    first, last = int(steps[0][0]), int(steps[-1][-1])
    return segments[:-1] + ((segments[-1][0], last),) if segments else ((first, last),)


def _add_jsonl(chunk: bytes, builder: TableBuilder) -> None:
    """Whole JSON lines into ``builder``, the way JsonlReader.read does (pyarrow per block, lines where it fails)."""
    for start, end in block_bounds(chunk):
        if not read_block(chunk[start:end], builder):
            for line in chunk[start:end].decode("utf-8", errors="replace").splitlines():
                JsonlReader._read_line(line, builder)


def _look(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of ``path``.

    Raises:
        LogParseError: it cannot be looked at.
    """
    try:
        stat = os.stat(path)
    except OSError as e:
        raise LogParseError(path, None, e.strerror or str(e)) from e
    return stat.st_size, stat.st_mtime_ns


def _read_range(path: Path, start: int, count: int) -> bytes:
    """``count`` bytes of ``path`` from ``start`` (fewer at its end)."""
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            return handle.read(max(count, 0))
    except OSError as e:
        raise LogParseError(path, None, e.strerror or str(e)) from e
