"""Runs, checkpoints and outputs in object storage (``s3://``, ``gs://``, ``hf://``, any fsspec URL).

One small I/O layer (:mod:`.store`: exact ranges, one listing per prefix, retries, counters), the
URL rules and per-process storage options (:mod:`.urls`), and ``RemotePath`` (:mod:`.path`), which
the readers use where they use a ``pathlib.Path``. Design: ``docs/remote-runs.md``.
"""

from __future__ import annotations

from pathlib import Path

from .path import RangedFile, RemotePath, RemoteStat
from .store import IOStats, Store, is_transient
from .urls import all_stats, is_url, local_part, protocol_of, reset_stores, set_storage_options, store_for


def as_path(value: "str | Path | RemotePath") -> "Path | RemotePath":
    """A ``RemotePath`` for a remote URL (or one already), else a local ``Path`` (``file://`` stripped)."""
    if isinstance(value, (RemotePath, Path)):
        return value
    text = str(value)
    return RemotePath(text) if is_url(text) else Path(local_part(text))


def file_look(path: "Path | RemotePath") -> tuple[str, int, str]:
    """(name, size, version) of a file, what caches key on: a changed file gets a new key.

    A local file's version is its mtime in ns (its name resolved); an object's is its ETag (issue 22):
    object stores keep no inode, and an overwritten object gets a new ETag whatever its time says.

    Raises:
        OSError: a local file that cannot be looked at; RemoteError: an object that is gone.
    """
    if isinstance(path, RemotePath):
        stat = path.stat()
        return path.url, stat.st_size, f"etag:{stat.etag}" if stat.etag else f"mtime:{stat.st_mtime}"
    stat = path.stat()
    return str(path.resolve()), stat.st_size, str(stat.st_mtime_ns)


def is_remote(value: object) -> bool:
    """True for a ``RemotePath`` or a remote URL string."""
    return isinstance(value, RemotePath) or (isinstance(value, str) and is_url(value))


__all__ = ["IOStats", "RangedFile", "RemotePath", "RemoteStat", "Store", "all_stats", "as_path", "file_look", "is_remote",
           "is_transient", "is_url", "local_part", "protocol_of", "reset_stores", "set_storage_options", "store_for"]
