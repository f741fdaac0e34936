"""Waiting for a `streamlit run` server of this app to answer: shared by the browser test and the dashboard benchmark."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    """Return once ``url``'s ``/_stcore/health`` answers ``ok``.

    Raises:
        RuntimeError: the server exited or stayed silent for ``timeout_s``; the message holds the
        end of its log, since that is where Streamlit says why.
    """
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=1) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"streamlit did not become healthy: {log_path.read_text()[-2000:]}")
