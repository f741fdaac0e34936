"""A real Google Cloud Storage server on 127.0.0.1 for the ``gs://`` tests (issue 22): gcp-storage-emulator.

gcp-storage-emulator implements GCS's JSON API (listing, media downloads honouring ``Range``, simple and
resumable uploads, deletes) in pure Python, in memory. gcsfs talks to it over HTTP exactly as to
storage.googleapis.com, given ``endpoint_url``. Its request handler is subclassed here to count, at the
server, the requests by method, the ranged GETs and the body bytes of GET responses (so tests check
that a tensor read is one exact range), and to answer injected faults with GCS's own ``503`` JSON error.

Uploads in tests go through :func:`upload_tree` and :func:`put_object` (plain HTTP against the JSON API,
not our code). The server is single-threaded, as the emulator ships it; concurrent requests queue in
its listen backlog (raised here so that a burst of ranged reads is never refused).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from http import server
from pathlib import Path

from s3_server import ServerCounts

# GCS's answer to a client when a backend is unavailable (the JSON error real GCS sends with HTTP 503).
UNAVAILABLE_BODY = json.dumps({"error": {"code": 503, "message": "Backend Error",
                                         "errors": [{"reason": "backendError", "message": "Backend Error"}]}}).encode()
FORBIDDEN_BODY = json.dumps({"error": {"code": 403, "message": "anonymous caller does not have storage.objects.get "
                                       "access to the Google Cloud Storage object.",
                                       "errors": [{"reason": "forbidden"}]}}).encode()


@dataclass
class GcsFault:
    """Answer the next ``times`` requests of ``method`` whose path matches ``path`` with GCS's JSON error
    of HTTP ``status`` (503: Backend Error; 403: Forbidden)."""

    method: str
    path: re.Pattern
    times: int = 1
    status: int = 503
    hits: int = 0

    def body(self) -> bytes:
        return UNAVAILABLE_BODY if self.status == 503 else FORBIDDEN_BODY

    def takes(self, method: str, path: str) -> bool:
        """Whether this fault answers the request (and counts it), under the caller's lock."""
        if self.hits >= self.times or self.method not in ("*", method) or not self.path.search(path):
            return False
        self.hits += 1
        return True


@dataclass
class GcsCounts(ServerCounts):
    """The S3 server's counts, and "METHOD /path" of every request in order (GCS's paths say which API was used)."""

    paths: list[str] = field(default_factory=list)

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.paths.clear()


def _counting_handler(counts: GcsCounts, faults: list[GcsFault]):
    """The emulator's request handler, counting each request and answering injected faults."""
    from gcp_storage_emulator.server import RequestHandler

    class CountingHandler(RequestHandler):
        def _route(self, method: str) -> None:
            with counts._lock:
                counts.requests[method] = counts.requests.get(method, 0) + 1
                counts.paths.append(f"{method} {urllib.parse.unquote(self.path)}")
                if method == "GET" and self.headers.get("Range"):
                    counts.ranged_gets += 1
                fault = next((f for f in faults if f.takes(method, urllib.parse.unquote(self.path))), None)
            if fault is not None:
                body = fault.body()
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            getattr(super(), f"do_{method}")()

        def send_header(self, keyword: str, value: str) -> None:
            if self.command == "GET" and keyword.lower() == "content-length":
                with counts._lock:
                    counts.get_bytes += int(value)
            super().send_header(keyword, value)

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

        def do_DELETE(self) -> None:
            self._route("DELETE")

        def do_PATCH(self) -> None:
            self._route("PATCH")

    return CountingHandler


class _Server(server.HTTPServer):
    request_queue_size = 256   # a burst of concurrent ranged reads waits in the backlog, never refused


class GcsServer:
    """gcp-storage-emulator on a free loopback port, in memory, counting what it serves; start/stop once."""

    def __init__(self) -> None:
        self.counts = GcsCounts()
        self.faults: list[GcsFault] = []
        self.port = _free_port()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from gcp_storage_emulator.storage import Storage

        logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)   # one info line per request otherwise
        storage = Storage(use_memory_fs=True)
        self._httpd = _Server(("127.0.0.1", self.port), partial(_counting_handler(self.counts, self.faults), storage))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="gcs-emulator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)

    def inject(self, method: str = "GET", path: str = "", times: int = 1, status: int = 503) -> GcsFault:
        """Answer the next ``times`` requests of ``method`` (``"*"``: any) whose unquoted request path matches
        the regular expression ``path`` with GCS's JSON error for ``status`` (503 or 403)."""
        fault = GcsFault(method.upper() if method != "*" else "*", re.compile(path), times, status)
        with self.counts._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.counts._lock:
            self.faults.clear()

    # --- the JSON API over plain HTTP (not our code, not gcsfs) ---------------------------------------
    def create_bucket(self, name: str) -> None:
        self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode(), "application/json")

    def put_object(self, bucket: str, key: str, data: bytes) -> dict:
        """One media upload of ``data`` as ``gs://bucket/key``; the object's resource (generation, etag, size).
        An empty object (a console "folder" ``name/``) goes as a multipart upload: the emulator's media
        upload needs a body."""
        if not data:
            return self._put_empty(bucket, key)
        query = urllib.parse.urlencode({"uploadType": "media", "name": key})
        return json.loads(self._call("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data,
                                     "application/octet-stream"))

    def _put_empty(self, bucket: str, key: str) -> dict:
        boundary = "gcs-test-boundary"
        body = (f"--{boundary}\r\nContent-Type: application/json\r\n\r\n{json.dumps({'name': key})}\r\n"
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n\r\n--{boundary}--").encode()
        return json.loads(self._call("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=multipart", body,
                                     f"multipart/related; boundary={boundary}"))

    def get_object(self, bucket: str, key: str) -> bytes:
        return self._call("GET", f"/download/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}?alt=media")

    def delete_object(self, bucket: str, key: str) -> None:
        self._call("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}")

    def list_objects(self, bucket: str, prefix: str) -> dict[str, dict]:
        """The objects below ``prefix/``, keyed by their names relative to it."""
        query = urllib.parse.urlencode({"prefix": prefix + "/"})
        items = json.loads(self._call("GET", f"/storage/v1/b/{bucket}/o?{query}")).get("items") or []
        return {item["name"][len(prefix) + 1:]: item for item in items}

    def _call(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None) -> bytes:
        request = urllib.request.Request(self.endpoint + path, data=data, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()


def upload_tree(server: GcsServer, local: Path, bucket: str, prefix: str) -> str:
    """Upload a local folder to ``gs://bucket/prefix`` over plain HTTP (not our code); returns the URL."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        server.put_object(bucket, f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())
    return f"gs://{bucket}/{prefix}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
