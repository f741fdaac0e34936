"""Log readers, one format per module, chosen by sniffing the file's first bytes.

``LOG_READERS`` maps a stable name to a reader instance; :func:`read_log` sniffs the
format (or takes it from ``fmt``) and returns a :class:`LogTable`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LogParseError, UnknownLogFormat
from .base import LogReader, LogTable
from .csv_jsonl import CsvReader, JsonlReader

LOG_READERS: dict[str, LogReader] = {r.name: r for r in (JsonlReader(), CsvReader())}

# Bytes read to sniff a format: enough for a header and a few records, bounded so
# that a binary or huge file never hangs detection.
SNIFF_BYTES = 4096


def read_head(path: Path, size: int = SNIFF_BYTES) -> str:
    """The first ``size`` bytes of ``path`` decoded leniently; '' for binary files."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(size)
    except OSError as e:
        raise LogParseError(path, None, e.strerror or str(e)) from e
    if b"\x00" in raw:
        return ""
    return raw.decode("utf-8", errors="replace")


def sniff_format(path: Path) -> str | None:
    """The name of the first reader that recognises ``path``, or None."""
    head = read_head(path)
    for name, reader in LOG_READERS.items():
        if reader.sniff(path, head):
            return name
    return None


def read_log(path: str | Path, fmt: str | None = None) -> LogTable:
    """Read one log file into a tidy :class:`LogTable`.

    Args:
        path: the log file.
        fmt: a key of ``LOG_READERS``; sniffed from the content when None.

    Raises:
        UnknownLogFormat: no reader recognises the file (the message lists those tried).
        LogParseError: the file cannot be read at all.
    """
    path = Path(path)
    if not path.is_file():
        raise LogParseError(path, None, "no such file")
    name = fmt or sniff_format(path)
    if name is None or name not in LOG_READERS:
        raise UnknownLogFormat(path, list(LOG_READERS))
    return LOG_READERS[name].read(path)


__all__ = ["LOG_READERS", "LogReader", "LogTable", "read_log", "sniff_format"]
