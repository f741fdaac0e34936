"""Fingerprints of a checkpoint's files: the full sha256 and the cheap quick hash.

Its own module, below both the recipe (which records them) and the merge (which checks them, and
computes them in its read pass): neither has to import the other for them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

from .remote import RemotePath

_HASH_CHUNK = 8 * 1024 * 1024
# Quick hash (version 1): size, the first MiB (the safetensors header and more), 16 evenly spaced
# 64 KiB blocks and the last 64 KiB of every file. Reads about 2 MiB per file whatever its size.
_QUICK_HEAD = 1 << 20
_QUICK_BLOCK = 1 << 16
_QUICK_SAMPLES = 16


def checkpoint_sha256(files: tuple[Path, ...] | list[Path], progress: Callable[[float, str], None] | None = None) -> str:
    """sha256 of a checkpoint: of the file itself, or of ``sha256sum``-style lines for several files.

    A single file's value equals ``sha256sum FILE`` so users can check it by hand.
    """
    return combine_sha256({f: _file_sha256(f, progress) for f in files})


def combine_sha256(digests: dict[Path, str]) -> str:
    """A checkpoint's sha256 from its files' (the file's own for one file, see :func:`checkpoint_sha256`)."""
    files = sorted(digests)
    if len(files) == 1:
        return digests[files[0]]
    lines = "".join(f"{digests[f]}  {f.name}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _file_sha256(path: Path, progress: Callable[[float, str], None] | None) -> str:
    digest = hashlib.sha256()
    total = max(path.stat().st_size, 1)
    done = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done / total, f"sha256 {path.name}")
    return digest.hexdigest()


def checkpoint_quick_hash(files: tuple[Path, ...] | list[Path]) -> str:
    """A cheap fingerprint of a checkpoint's files: catches a rewritten, truncated or swapped file.

    It reads ~2 MiB per file (see ``_QUICK_*``), so ``--verify quick`` costs milliseconds where
    sha256 costs a read of every byte; a change confined to unsampled bytes needs ``--verify full``.
    """
    samples = {}
    for path in files:
        size = path.stat().st_size
        if isinstance(path, RemotePath):   # the 18 ranges in one concurrent batch, not 18 round trips
            samples[path] = (size, _remote_samples(path, quick_ranges(size)))
            continue
        with path.open("rb") as handle:
            samples[path] = (size, [_read_at(handle, start, stop) for start, stop in quick_ranges(size)])
    return combine_quick_hash(samples)


def _remote_samples(path: RemotePath, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each range, fetched once per overlapping run of ranges (a small file: its bytes once)."""
    merged: list[list[int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    blobs = path.store.read_ranges(path.key, [(s, e) for s, e in merged])
    out = []
    for start, stop in ranges:
        low, blob = next((m[0], b) for m, b in zip(merged, blobs) if m[0] <= start and stop <= m[1])
        out.append(blob[start - low:stop - low])
    return out


def checkpoint_etag(files: "Sequence[Path | RemotePath]") -> str:
    """The object store's fingerprint of a remote checkpoint: its object's ETag, or for several objects
    a sha256 of ``ETAG  NAME`` lines; "" when a file is local or its store gives no ETag.

    Free (from the listing), so a recipe records it for every remote input and ``--verify`` checks it
    before reading a byte: an object rewritten under the same name gets a new ETag (issue 22).
    """
    tags = {}
    for path in files:
        tag = path.stat().etag if isinstance(path, RemotePath) else None
        if not tag:
            return ""
        tags[path.name] = tag
    if len(tags) == 1:
        return next(iter(tags.values()))
    return hashlib.sha256("".join(f"{t}  {n}\n" for n, t in sorted(tags.items())).encode()).hexdigest()


def quick_ranges(size: int) -> list[tuple[int, int]]:
    """The byte ranges the quick hash takes from a file of ``size`` bytes: the head, then 17 samples."""
    last = max(size - _QUICK_BLOCK, 0)
    starts = [last * index // _QUICK_SAMPLES for index in range(_QUICK_SAMPLES + 1)]
    return [(0, min(_QUICK_HEAD, size))] + [(start, min(start + _QUICK_BLOCK, size)) for start in starts]


def combine_quick_hash(samples: dict[Path, tuple[int, list[bytes]]]) -> str:
    """The quick hash from each file's size and :func:`quick_ranges` bytes, files in sorted order."""
    digest = hashlib.sha256(b"ckpt-select quick hash v1\n")
    for path in sorted(samples):
        size, chunks = samples[path]
        digest.update(f"{path.name} {size}\n".encode())
        for chunk in chunks:
            digest.update(chunk)
    return digest.hexdigest()


def _read_at(handle: BinaryIO, start: int, stop: int) -> bytes:
    handle.seek(start)
    return handle.read(stop - start)


class StreamDigest:
    """One file's sha256 and quick-hash samples, computed from the bytes a read pass hands it.

    The merge's reader hands over each range it reads (:meth:`feed`); ranges come mostly in
    file order. A range that starts past what was hashed so far first has the gap read here
    (a header, padding, a tensor the merge does not read or reads later), a range already
    hashed is skipped, and :meth:`finish` reads what is left after the last range (or the whole
    file, for a file the merge never read, like a config). So every byte is hashed in order, and
    the value equals ``sha256sum``; the merge's own bytes are read once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self._sha = hashlib.sha256()
        self._done = 0
        self._ranges = quick_ranges(self.size)
        self._samples = [bytearray() for _ in self._ranges]

    def feed(self, offset: int, data: memoryview) -> None:
        """Hash ``data``, the file's bytes from ``offset``, in order (reading any gap before it)."""
        if offset > self._done:
            self._fill(offset)
        skip = self._done - offset
        if skip < len(data):
            self._take(data[skip:])

    def finish(self) -> tuple[str, tuple[int, list[bytes]]]:
        """(sha256 hex, quick-hash samples) once the bytes after the last range are hashed too."""
        self._fill(self.size)
        return self._sha.hexdigest(), (self.size, [bytes(b) for b in self._samples])

    def _take(self, data: memoryview) -> None:
        """Hash the bytes at the cursor and keep those that fall in a quick-hash range."""
        start, stop = self._done, self._done + len(data)
        self._sha.update(data)
        for (low, high), kept in zip(self._ranges, self._samples):
            if low < stop and high > start:
                kept += data[max(low, start) - start:min(high, stop) - start]
        self._done = stop

    def _fill(self, upto: int) -> None:
        """Read and hash ``[cursor, upto)`` from the file itself (a remote object by exact ranges)."""
        if isinstance(self.path, RemotePath):
            while self._done < upto:
                self._take(memoryview(self.path.read_range(self._done, min(upto, self._done + _HASH_CHUNK))))
            return
        with self.path.open("rb", buffering=0) as handle:
            while self._done < upto:
                chunk = os.pread(handle.fileno(), min(_HASH_CHUNK, upto - self._done), self._done)
                if not chunk:
                    raise OSError(f"{self.path}: ended at byte {self._done}, expected {upto} (the file changed)")
                self._take(memoryview(chunk))
