"""Log readers, one format per module, chosen by sniffing the file's content.

``LOG_READERS`` maps a stable name to a reader instance; :func:`read_log` sniffs the
format (or takes it from ``fmt``) and returns a :class:`LogTable`. Order matters:
specific formats come before the generic JSONL/CSV readers, which accept almost any
table. Sniffing sees the first and the last ~4 KB of a file: record logs often start
with a long preamble (a code dump, an argument list) that the tail skips past.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LogParseError, UnknownLogFormat
from ..remote import as_path
from .base import LogReader, LogTable
from .build_nanogpt import BuildNanoGPTLogTxtReader, BuildNanoGPTReader
from .csv_jsonl import CsvReader, JsonlReader
from .fairseq import FairseqReader
from .hf_stdout import HfStdoutReader
from .hf_trainer_state import HfTrainerStateReader
from .json_records import JsonRecordsReader
from .lightning_csv import LightningCsvReader
from .llmc import LlmcReader
from .megatron import MegatronReader
from .megatron_golden import MegatronGoldenReader
from .modded_nanogpt import ModdedNanoGPTReader
from .nanogpt import NanoGPTReader
from .nemo import NemoReader
from .tensorboard import TensorBoardReader
from .torchtitan import TorchtitanReader

LOG_READERS: dict[str, LogReader] = {
    r.name: r
    for r in (
        TensorBoardReader(), HfTrainerStateReader(), MegatronGoldenReader(), JsonRecordsReader(),
        HfStdoutReader(), TorchtitanReader(), MegatronReader(), NemoReader(), FairseqReader(),
        ModdedNanoGPTReader(), BuildNanoGPTReader(), BuildNanoGPTLogTxtReader(), LlmcReader(),
        NanoGPTReader(), LightningCsvReader(), JsonlReader(), CsvReader(),
    )
}

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


# Windows of SNIFF_BYTES sampled besides the head: some logs open with thousands of lines
# of preamble (a code dump, an argument list) and close with teardown noise.
SNIFF_WINDOWS = 5


def read_sample(path: Path, size: int = SNIFF_BYTES, windows: int = SNIFF_WINDOWS) -> str:
    """The head of ``path`` plus ``windows`` evenly spaced windows up to its tail ('' if binary).

    Reads at most ``(windows + 1) * size`` bytes whatever the file's size, so a huge file
    cannot hang detection. Windows start at a line boundary (their partial first line is
    dropped) and are joined with newlines.
    """
    head = read_head(path, size)
    if not head:
        return ""
    parts = [head]
    try:
        with path.open("rb") as handle:
            end = handle.seek(0, 2)
            spread = max(0, end - 2 * size)   # where windows may start, past the head
            for k in range(1, windows + 1) if end > size else ():
                if spread == 0 and k > 1:
                    break   # a short file: one window already reaches its end
                handle.seek(size + spread * k // windows)
                chunk = handle.read(size)
                if b"\x00" not in chunk:
                    parts.append(chunk.decode("utf-8", errors="replace").split("\n", 1)[-1])
    except OSError as e:
        raise LogParseError(path, None, e.strerror or str(e)) from e
    return "\n".join(parts)


# A text log whose records all sit past the sampled windows (a long code dump, then a
# short log) is found by scanning on, chunk by chunk, but never past this many bytes.
DEEP_SNIFF_BYTES = 32 << 20
_CHUNK = 1 << 20


def sniff_format(path: Path) -> str | None:
    """The name of the first reader that recognises ``path``, or None.

    First every reader sees a bounded sample (:func:`read_sample`); if none claims it,
    the stdout readers (those with ``deep_sniff = True``, whose patterns are specific
    enough to test on any stretch of text) scan up to ``DEEP_SNIFF_BYTES``.
    """
    sample = read_sample(path)
    for name, reader in LOG_READERS.items():
        if reader.sniff(path, sample):
            return name
    if not sample:
        return None
    return _deep_sniff(path)


def _deep_sniff(path: Path) -> str | None:
    """The first ``deep_sniff`` reader that recognises any 1 MB chunk of the file's first 32 MB."""
    deep = [(name, r) for name, r in LOG_READERS.items() if getattr(r, "deep_sniff", False)]
    try:
        with path.open("rb") as handle:
            for _ in range(DEEP_SNIFF_BYTES // _CHUNK):
                raw = handle.read(_CHUNK)
                if not raw or b"\x00" in raw:
                    return None
                # Chunks overlap by nothing; a record line cut in two is rare and the next chunk has more.
                text = raw.decode("utf-8", errors="replace")
                for name, reader in deep:
                    if reader.sniff(path, text):
                        return name
    except OSError as e:
        raise LogParseError(path, None, e.strerror or str(e)) from e
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
    path = as_path(path)   # a URL reads through the remote layer (issue 22)
    if not path.is_file():
        raise LogParseError(path, None, "no such file")
    name = fmt or sniff_format(path)
    if name is None or name not in LOG_READERS:
        raise UnknownLogFormat(path, list(LOG_READERS))
    return LOG_READERS[name].read(path)


__all__ = ["LOG_READERS", "LogReader", "LogTable", "SNIFF_BYTES", "read_log", "sniff_format"]
