"""One small I/O layer over fsspec: exact byte ranges, one listing per prefix, retries, counted.

Why our own layer and not ``fs.open``: s3fs reads ahead 50 MiB blocks by default, so a 2 MiB
tensor read through a file object fetches ~19 MB; ``cat_ranges`` fetches exactly the ranges
asked, concurrently. Why counted here: the request and byte budgets of issue 22 (a remote
``analyze`` reads at most 1.05x the bytes of a local one; a header costs at most 2 requests)
are checked by tests and reported by ``--json`` from these counters, not guessed.

Transient failures (5xx, throttling, connection resets) are retried here, with exponential
backoff and jitter, and counted; a missing object, a refused one (403) or a short read is a
:class:`~analysis.errors.RemoteError` naming the URL, which the CLI turns into exit code 2.
This is the one retrying layer for ``s3://`` and ``gs://`` (:func:`analysis.remote.urls.store_for` turns
botocore's, s3fs's and gcsfs's own retry loops off): measured against a real HTTP server, those two
multiplied (5 x 5 attempts of a persistent 503 in 37 s, 250 requests and 210 s for a dropped
connection) and none of it showed in ``--json``. See docs/remote-runs.md, "Retries".
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from ..errors import RemoteError

T = TypeVar("T")

# Attempts for one call before a transient failure is reported; delays grow 0.2, 0.4, 0.8 ... s (x 1-2 jitter):
# 6 attempts wait 6.2-12.4 s in all before a persistent failure is reported. Tests lower them.
MAX_ATTEMPTS = 6
BASE_DELAY_S = 0.2
# Part size of a server-side multipart copy (S3 allows 5 MiB to 5 GiB): s3fs copies parts one after another,
# so s3fs's default 50 MiB would cost 200 requests for a 10 GB shard; 1 GiB costs 10.
COPY_PART_BYTES = 1 << 30
# Words in an error's text that mark it transient (botocore/aiohttp/fsspec spell them in several ways;
# s3fs turns S3's SlowDown into "OSError [Errno 16] Please reduce your request rate.", botocore a dropped
# connection into "Connection was closed before we received a valid response").
_TRANSIENT_WORDS = ("slowdown", "slow down", "reduce your request rate", "throttl", "503", "500", "502", "504",
                    # a bare HTTP 500/502/504 (a proxy, an overloaded server): "[Errno 121] Internal Server Error"
                    "internalerror", "internal error", "internal server error", "bad gateway", "gateway timeout",
                    "serviceunavailable", "service unavailable",
                    "requesttimeout", "connection reset", "connectionreset", "server disconnected",
                    "connection was closed", "connectionclosed", "incompleteread", "clientpayloaderror",
                    "responseparsererror", "timeout", "temporarily", "broken pipe", "cannot connect",
                    # gcsfs: HttpError("Backend Error, 503"), 429 rate limits, 408 request timeouts
                    "429", "408", "too many requests", "ratelimit", "rate limit", "backend error")
# Words marking a refusal (S3's 403 AccessDenied; gcsfs's "Forbidden: PATH" for 403 and HttpError 401).
_REFUSED_WORDS = ("403", "accessdenied", "forbidden", "401", "unauthorized", "invalid credentials")


@dataclass
class IOStats:
    """What one store fetched and sent: requests, bytes and retries, thread-safe."""

    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    retries: int = 0
    listings: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, requests: int = 0, read: int = 0, written: int = 0, retries: int = 0, listings: int = 0) -> None:
        """Count one call's traffic."""
        with self._lock:
            self.requests += requests
            self.bytes_read += read
            self.bytes_written += written
            self.retries += retries
            self.listings += listings

    def snapshot(self) -> dict[str, int]:
        """The counters as plain numbers (what ``--json`` reports)."""
        with self._lock:
            return {"requests": self.requests, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                    "retries": self.retries, "listings": self.listings}


def is_transient(error: BaseException) -> bool:
    """True for an error worth retrying: throttling, a 5xx, a reset or a timeout; never 403/404 or a bad range."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if type(error).__name__ == "OfflineModeIsEnabled":   # HF_HUB_OFFLINE=1: a ConnectionError no retry can mend
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(error).__name__} {error}".lower()
    if any(word in text for word in _REFUSED_WORDS) or "404" in text or "nosuchkey" in text or "nosuchbucket" in text:
        return False
    return any(word in text for word in _TRANSIENT_WORDS)


class Store:
    """An fsspec file system with counted, retried calls. One per (protocol, storage options)."""

    def __init__(self, fs: Any, protocol: str, sleep: Callable[[float], None] = time.sleep) -> None:
        self.fs = fs
        self.protocol = protocol
        self.stats = IOStats()
        self._sleep = sleep

    def url(self, path: str) -> str:
        """The full URL of a store path (what every message and recipe names)."""
        return path if self.protocol in ("file", "local") else f"{self.protocol}://{path}"

    def call(self, url: str, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` with retries on transient failures; anything else becomes a RemoteError naming ``url``."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return fn()
            except Exception as e:   # noqa: BLE001 - classified right below, re-raised as ours
                self._retry_or_raise(url, what, e, attempt, retried=1)
        raise AssertionError("unreachable")

    def _retry_or_raise(self, url: str, what: str, error: BaseException, attempt: int, retried: int) -> None:
        """After a failed ``attempt``: count ``retried`` requests to send again and wait, or raise the RemoteError.

        Raises:
            RemoteError: ``error`` is not transient, or it was the last attempt (the message says how many).
        """
        if not is_transient(error) or attempt >= MAX_ATTEMPTS:
            raise RemoteError(url, _problem(error, what, attempt)) from error
        self.stats.add(retries=retried)
        self._sleep(BASE_DELAY_S * 2 ** (attempt - 1) * (1 + random.random()))

    def read_ranges(self, path: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``[start, end)`` range of one object, fetched exactly and concurrently.

        A range the object cannot fill (truncated since it was listed) is an error, never short data.
        """
        return self.read_spans([(path, start, end) for start, end in ranges])

    def read_spans(self, spans: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """The bytes of each ``(path, start, end)`` span, over several objects, in one concurrent batch.

        What a merge block needs: the same range of every input, fetched at once (``cat_ranges``
        runs them concurrently), so a block costs the slowest request, not the sum. Only the spans
        that failed transiently are sent again (each counted as a retry), never the whole batch. A
        span an object cannot fill is a :class:`RemoteError` naming that object's URL.
        """
        blobs: list = [None] * len(spans)
        todo = list(range(len(spans)))
        attempt = 0
        while todo:
            attempt += 1
            failed = self._fetch_spans(spans, todo, blobs)
            if failed:
                index, error = failed[0]
                self._retry_or_raise(self.url(spans[index][0]), "read", error, attempt, retried=len(failed))
            todo = [index for index, _ in failed]
        for blob, (path, start, end) in zip(blobs, spans):
            if len(blob) != end - start:
                raise RemoteError(self.url(path), f"truncated object: bytes {start}-{end} asked, {len(blob)} returned")
        self.stats.add(requests=len(spans), read=sum(e - s for _, s, e in spans))
        return blobs

    def _fetch_spans(self, spans: Sequence[tuple[str, int, int]], todo: list[int], blobs: list) -> list[tuple[int, BaseException]]:
        """One concurrent ``cat_ranges`` of the spans numbered ``todo`` into ``blobs``; the (number, error) of each that failed."""
        if not todo:
            return []
        try:
            got = self.fs.cat_ranges([spans[i][0] for i in todo], [spans[i][1] for i in todo],
                                     [spans[i][2] for i in todo], on_error="return")
        except Exception as e:   # noqa: BLE001 - the whole batch failed: every span of it, classified by the caller
            got = [e] * len(todo)
        failed = []
        for index, blob in zip(todo, got):
            if isinstance(blob, BaseException):
                failed.append((index, blob))
            else:
                blobs[index] = blob
        return failed

    def read_range(self, path: str, start: int, end: int) -> bytes:
        """One exact ``[start, end)`` range."""
        return self.read_ranges(path, [(start, end)])[0]

    def list_prefix(self, path: str) -> dict[str, dict]:
        """Every object below ``path`` (recursively) with its size, ETag and time: one listing, not one call per file.

        Folders are implied by the keys (object stores have none); the result is keyed by store path.
        """
        found = self.call(self.url(path), "list", lambda: self.fs.find(path, withdirs=False, detail=True))
        self.stats.add(requests=1, listings=1)
        # a name ending in "/" is a folder placeholder (GCS's console and gsutil make them, as do S3 tools):
        # gcsfs lists it as a file of 0 bytes, and a file with an empty name would join the run
        return {name: info for name, info in found.items()
                if info.get("type", "file") == "file" and not name.endswith("/")}

    def info(self, path: str) -> dict:
        """One object's size, ETag and time (a HEAD request)."""
        result = self.call(self.url(path), "stat", lambda: self.fs.info(path))
        self.stats.add(requests=1)
        return result

    def put_file(self, local: str, path: str) -> None:
        """Upload a local file as one object; on object stores it appears only once complete (multipart)."""
        import os

        size = os.path.getsize(local)
        self.call(self.url(path), "upload", lambda: self.fs.put_file(local, path))
        self.stats.add(requests=1, written=size)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a small object (an index, a recipe) in one request."""
        self.call(self.url(path), "write", lambda: self.fs.pipe_file(path, data))
        self.stats.add(requests=1, written=len(data))

    def copy(self, path: str, dest: str, size: int) -> None:
        """Copy one object of ``size`` bytes to ``dest`` in the same store, server-side: no byte of it comes here.

        What ``prune`` moves to a trash with (object stores have no rename). Each request is
        counted; no body passes through this machine, so nothing counts as read or written.
        """
        sent = self.call(self.url(path), "copy", lambda: _server_side_copy(self.fs, path, dest, size))
        self.stats.add(requests=sent)

    def remove(self, paths: Sequence[str]) -> None:
        """Delete objects we wrote (a failed output's shards); missing ones are fine."""
        for path in paths:
            try:
                self.call(self.url(path), "delete", lambda p=path: self.fs.rm_file(p))
            except RemoteError as e:
                if not isinstance(e.__cause__, FileNotFoundError):
                    raise
            self.stats.add(requests=1)


def _server_side_copy(fs: Any, path: str, dest: str, size: int) -> int:
    """Copy ``path`` to ``dest`` inside the store; returns the requests sent.

    s3fs: one CopyObject up to its managed-copy threshold, above it a multipart copy of
    :data:`COPY_PART_BYTES` UploadPartCopy parts (S3 allows 5 MiB-5 GiB) between a create and a complete,
    called directly with the size we listed: ``cp_file`` would first ask the size again (a HEAD,
    or s3fs's listing cache, so the count could not be told). Any other fsspec store: its ``cp_file``.
    """
    basic, managed = getattr(fs, "_copy_basic", None), getattr(fs, "_copy_managed", None)
    if basic is None or managed is None:
        fs.cp_file(path, dest)
        return 1
    import importlib

    from fsspec.asyn import sync

    threshold = getattr(importlib.import_module(type(fs).__module__), "MANAGED_COPY_THRESHOLD", 5 << 30)
    if size <= threshold:
        sync(fs.loop, basic, path, dest)
        return 1
    sync(fs.loop, managed, path, dest, size, block=COPY_PART_BYTES)
    return 2 + -(-size // COPY_PART_BYTES)


def _problem(error: BaseException, what: str, attempts: int) -> str:
    """One line for an I/O failure: what was tried, the kind of failure, and the retries spent."""
    if isinstance(error, FileNotFoundError):
        return "no such object or prefix"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, PermissionError) or any(word in text.lower() for word in _REFUSED_WORDS):
        return f"access denied ({text}); check the credentials in the environment or --storage-options"
    if "not satisfiable" in text or "InvalidRange" in text:   # HTTP 416: the object ended before the range asked
        return f"truncated object: a range past its end ({text})"
    tail = f" after {attempts} attempts ({attempts - 1} retries)" if attempts > 1 else ""
    return f"{what} failed{tail}: {text}"
