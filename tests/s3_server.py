"""A real S3 HTTP server on 127.0.0.1 for the remote-run tests (issue 22): moto's server mode.

moto's in-process mock does not reach s3fs (aiobotocore), its server mode does: the tests talk
to it over HTTP exactly as to S3. The WSGI app is wrapped in a counter so that tests check the
request and byte budgets at the server, not only at our own I/O layer, and in a fault injector
(``S3Server.inject``): the next N requests matching a method and a key pattern are answered with
S3's own ``503 SlowDown`` error, or their connection is closed with no response at all, so the
retry tests exercise the real HTTP stack (aiohttp, botocore, s3fs, our store), mocking nothing.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

# S3's answer to a client over its request rate (the body real S3 sends with HTTP 503).
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message><RequestId>FAULT</RequestId>"
                 b"<HostId>fault-injection</HostId></Error>")


@dataclass
class Fault:
    """Answer the next ``times`` requests of ``method`` whose path (``/bucket/key``) matches ``path`` with ``kind``.

    ``kind``: ``"503"`` (SlowDown, S3's XML error body), ``"500"`` (a bare Internal Server Error, as a failing
    server or proxy sends it, no S3 XML) or ``"drop"`` (the connection closed, no response).
    ``times=None``: every matching request, until cleared. ``after``: let the first ``after`` matching
    requests through (a header read, say) before answering. ``hits``: how many requests it answered.
    """

    method: str
    path: re.Pattern
    kind: str = "503"
    times: int | None = 1
    after: int = 0
    hits: int = 0
    passed: int = 0

    def takes(self, method: str, path: str) -> bool:
        """Whether this fault answers the request (and counts it), under the caller's lock."""
        if (self.times is not None and self.hits >= self.times) or self.method not in ("*", method):
            return False
        if not self.path.search(path):
            return False
        if self.passed < self.after:
            self.passed += 1
            return False
        self.hits += 1
        return True


@dataclass
class ServerCounts:
    """Requests by HTTP method and response body bytes sent for GETs, as the server saw them."""

    requests: dict[str, int] = field(default_factory=dict)
    get_bytes: int = 0
    ranged_gets: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.get_bytes = self.ranged_gets = 0

    @property
    def gets(self) -> int:
        return self.requests.get("GET", 0)


class _Counting:
    """WSGI middleware counting each request and the body bytes of each GET response, and injecting faults."""

    def __init__(self, app, counts: ServerCounts, faults: list[Fault],
                 latency: Callable[[], float] = lambda: 0.0) -> None:
        self.app, self.counts, self.faults, self.latency = app, counts, faults, latency

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "?")
        if (delay := self.latency()) > 0:   # an object store's first-byte latency; concurrent requests wait together
            time.sleep(delay)
        with self.counts._lock:
            self.counts.requests[method] = self.counts.requests.get(method, 0) + 1
            if method == "GET" and environ.get("HTTP_RANGE"):
                self.counts.ranged_gets += 1
            fault = next((f for f in self.faults if f.takes(method, environ.get("PATH_INFO", ""))), None)
        if fault is not None:
            yield from _answer(fault, environ, start_response)
            return
        for chunk in self.app(environ, start_response):
            if method == "GET":
                with self.counts._lock:
                    self.counts.get_bytes += len(chunk)
            yield chunk


def _answer(fault: Fault, environ, start_response):
    """The injected answer: S3's 503 SlowDown, a bare 500, or the connection closed before any response byte."""
    if fault.kind == "drop":
        sock = environ["werkzeug.socket"]
        sock.shutdown(socket.SHUT_RDWR)
        # werkzeug takes a ConnectionError from the app as a dropped connection and sends nothing more
        raise ConnectionResetError("fault injection: connection dropped")
    if fault.kind == "500":
        body = b"<!doctype html><title>500 Internal Server Error</title><h1>Internal Server Error</h1>"
        start_response("500 INTERNAL SERVER ERROR", [("Content-Type", "text/html"), ("Content-Length", str(len(body)))])
        yield body
        return
    start_response("503 Slow Down", [("Content-Type", "application/xml"), ("Content-Length", str(len(SLOWDOWN_BODY))),
                                      ("x-amz-request-id", "FAULT")])
    yield SLOWDOWN_BODY


class S3Server:
    """moto's S3 on a free loopback port, counting what it serves; ``start``/``stop`` once per session.

    ``latency_s``: seconds every request waits before it is answered (0: none), a real store's first-byte
    latency for the benchmarks (``benchmarks/remote_analyze.py``); tests leave it at 0 (they never time).
    """

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.counts = ServerCounts()
        self.faults: list[Fault] = []
        self._server = None
        self._thread: threading.Thread | None = None
        self.port = _free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = _Counting(DomainDispatcherApplication(create_backend_app), self.counts, self.faults,
                        lambda: self.latency_s)
        self._server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()

    def inject(self, method: str = "GET", path: str = "", kind: str = "503", times: int | None = 1,
               after: int = 0) -> Fault:
        """Answer the next ``times`` requests of ``method`` (``"*"``: any) whose ``/bucket/key`` path matches the
        regular expression ``path`` with ``kind`` (``"503"``, ``"500"`` or ``"drop"``), once ``after`` of them went
        through; ``times=None``: until cleared."""
        fault = Fault(method.upper() if method != "*" else "*", re.compile(path), kind, times, after)
        with self.counts._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """No more injected faults (the ``s3_bucket`` fixture clears them after each test)."""
        with self.counts._lock:
            self.faults.clear()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_quiet_server(**kwargs) -> S3Server:
    """A started server for the benchmarks: dummy credentials in the environment (where none are set) and
    werkzeug's one-line-per-request log silenced. ``kwargs`` go to :class:`S3Server`."""
    import logging
    import os

    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = S3Server(**kwargs)
    server.start()
    return server
