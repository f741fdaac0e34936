"""URLs and the stores behind them: which strings are remote, and one counted store per protocol.

Credentials never travel in a recipe or a message: fsspec and the cloud SDKs read them from the
environment and profiles (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``HF_TOKEN``), and
``--storage-options JSON`` adds per-protocol options (an endpoint, a profile, anonymous access)
for the process. ``FSSPEC_<PROTOCOL>_<OPTION>`` environment variables work as fsspec documents.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
import types
from typing import Any

from ..errors import InvalidArgument
from .store import Store

# "s3://bucket/key", "gs://...", "hf://...", "memory://...": a scheme of 2+ letters (so "C:\\x" stays a path).
_URL = re.compile(r"^(?P<protocol>[a-zA-Z][a-zA-Z0-9+.-]+)://")
# Protocols read as local paths (memory-mapped, preadv) rather than through the remote layer.
LOCAL_PROTOCOLS = frozenset({"file", "local"})
# Google Cloud Storage's names in fsspec (gcsfs): their file systems are made by _gcs_filesystem.
GCS_PROTOCOLS = frozenset({"gs", "gcs"})

_options: dict[str, dict[str, Any]] = {}
_stores: dict[str, Store] = {}
_lock = threading.Lock()


def protocol_of(text: str) -> str | None:
    """The URL's protocol (``"s3"``), or None for a plain path."""
    match = _URL.match(str(text))
    return match.group("protocol").lower() if match else None


def is_url(text: object) -> bool:
    """True for a remote URL (``s3://``, ``gs://``, ``hf://``, ``memory://`` ...); ``file://`` and paths are local."""
    protocol = protocol_of(str(text)) if isinstance(text, str) else None
    return protocol is not None and protocol not in LOCAL_PROTOCOLS


def local_part(text: str) -> str:
    """A ``file://`` URL's path; anything else unchanged."""
    return text[len("file://"):] if text.lower().startswith("file://") else text


def set_storage_options(options: dict[str, Any] | str | None) -> None:
    """Options for the process's stores: ``{"s3": {"endpoint_url": ...}}`` or flat options for every protocol.

    Raises:
        InvalidArgument: the text is not a JSON object.
    """
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError as e:
            raise InvalidArgument(f"--storage-options: not valid JSON ({e})") from None
    if options is not None and not isinstance(options, dict):
        raise InvalidArgument("--storage-options: must be a JSON object")
    with _lock:
        _options.clear()
        _options.update(options or {})
        _stores.clear()


def store_for(url: str) -> tuple[Store, str]:
    """The counted store that serves ``url`` and the URL's path inside it (``bucket/key``).

    Raises:
        InvalidArgument: no fsspec implementation for the protocol is installed.
    """
    protocol = protocol_of(url) or "file"
    with _lock:
        store = _stores.get(protocol)
        if store is None:
            try:
                fs = _filesystem(protocol, _options_for(protocol))
            except (ImportError, ValueError) as e:
                raise InvalidArgument(f"{url}: cannot open {protocol}:// URLs ({e}); install its fsspec package "
                                      f"(s3fs for s3://, gcsfs for gs://, huggingface_hub for hf://)") from None
            store = _stores[protocol] = Store(fs, protocol)
    return store, store.fs._strip_protocol(url).rstrip("/")


def _filesystem(protocol: str, options: dict[str, Any]) -> Any:
    """The fsspec file system for ``protocol`` with its own retry loops off (see :func:`one_retry_layer`)."""
    import fsspec

    if protocol in GCS_PROTOCOLS:
        return _gcs_filesystem(options)
    fs = fsspec.filesystem(protocol, **one_retry_layer(protocol, options))
    if protocol in ("s3", "s3a"):
        fs.retries = 1   # s3fs's own retry loop (5 attempts of SlowDown and read errors): one attempt
    return fs


def _gcs_filesystem(options: dict[str, Any]) -> Any:
    """A gcsfs file system for ``gs://`` whose only retrying, counted layer is our :class:`Store`.

    Three choices, each measured against a real GCS JSON API server (gcp-storage-emulator, issue 22):

    1. gcsfs retries every HTTP call itself (6 attempts, waits of 1, 2, 4, 8, 16 s), a count fixed when
       the class is defined, so no option turns it off: one persistent 503 cost 6 requests and 34 s per
       call, 36 requests under our store's 6 attempts, none counted. Its undecorated ``_request`` is
       bound on our own instance (``skip_instance_cache``: no other user of gcsfs in the process is
       touched), so each of our attempts is one request and ``io.retries`` counts every one sent again
       (the same fault now: 6 requests, 9 s, ``retries`` 5).
    2. gcsfs's listing cache is off (``use_listings_cache=False``): :class:`~analysis.remote.path.RemotePath`
       keeps the one listing per prefix, and gcsfs's cache below it answered ``info`` from its earlier
       listing after an object was rewritten (the old size, 1000 bytes, for a 2000-byte object).
    3. With a custom ``endpoint_url`` (or ``STORAGE_EMULATOR_HOST``) the plain JSON API class is used:
       gcsfs's default class asks the Storage Control gRPC API for each bucket's layout (zonal or
       hierarchical), which an emulator or a proxy does not serve; every call then waited 60 s.
    """
    import gcsfs
    from fsspec.config import apply_config
    from gcsfs.core import GCSFileSystem as JsonApiFileSystem

    custom_endpoint = options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST", "default") != "default"
    cls = JsonApiFileSystem if custom_endpoint else gcsfs.GCSFileSystem
    # FSSPEC_GS_<OPTION> environment variables apply as through fsspec.filesystem
    fs = cls(**apply_config(cls, {"use_listings_cache": False, **options, "skip_instance_cache": True}))
    fs._request = types.MethodType(inspect.unwrap(type(fs)._request), fs)   # one attempt per call
    return fs


def one_retry_layer(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with botocore's retries off for ``s3://`` unless the user set them: :class:`Store` retries, counted.

    Why: botocore (5 attempts), s3fs (5) and our store (6) each retried a transient error, so a
    persistent 503 cost up to 150 requests and minutes, and ``io.retries`` showed none of the
    retries below it (docs/remote-runs.md, "Retries"). A user's ``config_kwargs.retries`` is kept.
    """
    if protocol not in ("s3", "s3a"):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    return {**options, "config_kwargs": config}


def _options_for(protocol: str) -> dict[str, Any]:
    """The options set for ``protocol``: its own entry, else the flat options (entries named after protocols
    left out). The caller holds the lock."""
    own = _options.get(protocol)
    return dict(own) if isinstance(own, dict) else {k: v for k, v in _options.items() if not isinstance(v, dict)}


def all_stats() -> dict[str, dict[str, int]]:
    """Every store's counters by protocol (what ``--json`` reports as ``io``)."""
    with _lock:
        return {protocol: store.stats.snapshot() for protocol, store in _stores.items()}


def add_stats(counts: dict[str, dict[str, int]]) -> None:
    """Add I/O done in another process (a Ray worker's unit) to this process's counters, per protocol.

    Why: ``--json`` reports :func:`all_stats` of the driver; a Ray unit's requests and retries happen on
    the workers and would otherwise be missing from it (issue 22).
    """
    for protocol, done in counts.items():
        store, _ = store_for(f"{protocol}://")
        store.stats.add(requests=done.get("requests", 0), read=done.get("bytes_read", 0),
                        written=done.get("bytes_written", 0), retries=done.get("retries", 0),
                        listings=done.get("listings", 0))


def stats_since(before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The counters' growth since ``before`` (an :func:`all_stats` taken earlier), per protocol."""
    now = all_stats()
    return {protocol: {key: value - before.get(protocol, {}).get(key, 0) for key, value in counts.items()}
            for protocol, counts in now.items()}


def reset_stores() -> None:
    """Forget the stores (and their counters and listing caches): tests and a new command start clean."""
    with _lock:
        _stores.clear()


def current_storage_options() -> dict[str, Any]:
    """A copy of the options :func:`set_storage_options` set: what an executor hands its workers (issue 22)."""
    with _lock:
        return json.loads(json.dumps(_options))
