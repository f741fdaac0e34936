"""A real S3 HTTP server on 127.0.0.1 for the remote-run tests (issue 22): moto's server mode.

moto's in-process mock does not reach s3fs (aiobotocore), its server mode does: the tests talk
to it over HTTP exactly as to S3. The WSGI app is wrapped in a counter so that tests check the
request and byte budgets at the server, not only at our own I/O layer.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


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
    """WSGI middleware counting each request and the body bytes of each GET response."""

    def __init__(self, app, counts: ServerCounts) -> None:
        self.app, self.counts = app, counts

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "?")
        with self.counts._lock:
            self.counts.requests[method] = self.counts.requests.get(method, 0) + 1
            if method == "GET" and environ.get("HTTP_RANGE"):
                self.counts.ranged_gets += 1
        for chunk in self.app(environ, start_response):
            if method == "GET":
                with self.counts._lock:
                    self.counts.get_bytes += len(chunk)
            yield chunk


class S3Server:
    """moto's S3 on a free loopback port, counting what it serves; ``start``/``stop`` once per session."""

    def __init__(self) -> None:
        self.counts = ServerCounts()
        self._server = None
        self._thread: threading.Thread | None = None
        self.port = _free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = _Counting(DomainDispatcherApplication(create_backend_app), self.counts)
        self._server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
