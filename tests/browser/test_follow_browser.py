"""The app follows a run while a child process writes it (issue 23): new checkpoints and rows appear in the
page without a reload, through the sidebar's run_every fragment."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.server import wait_healthy
from conftest import REPO, write_tiny_run

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
WRITER = REPO / "tests" / "follow_writer.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _count(page, pattern: str) -> int:
    """The number in the run page's caption before ``pattern`` ("12 checkpoints")."""
    text = page.get_by_test_id("stCaptionContainer").filter(has_text=re.compile(pattern)).first.inner_text()
    return int(re.search(r"([\d,]+) " + pattern, text).group(1).replace(",", ""))


def test_the_app_follows_a_run_being_written_issue23(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (make browser-deps) to run this test")
    pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import expect, sync_playwright

    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    port, log_path = _free_port(), tmp_path / "streamlit.log"
    env = dict(os.environ, CKPT_SELECT_RUN=str(run), CKPT_SELECT_ROOT=str(run))
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "streamlit_app.py"),
             "--server.headless=true", f"--server.port={port}", "--server.address=127.0.0.1",
             "--browser.gatherUsageStats=false", "--server.fileWatcherType=none"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    writer = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server, log_path, 60)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(url)
            page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=90_000)
            expect(page.get_by_text(re.compile(r"· 12 checkpoints ·"))).to_be_visible(timeout=60_000)
            rows_before = _count(page, "log rows")
            page.get_by_label("Look every (seconds)").fill("1")
            page.get_by_label("Look every (seconds)").press("Enter")
            page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=60_000)
            writer = subprocess.Popen([sys.executable, str(WRITER), str(run), "600", "700", "50", "0.5"])
            # No reload: the page's own fragment notices the new files and redraws.
            expect(page.get_by_text(re.compile(r"· 14 checkpoints ·"))).to_be_visible(timeout=120_000)
            assert _count(page, "log rows") >= rows_before + 100
            assert page.locator("[data-testid='stException']").count() == 0
            browser.close()
    finally:
        if writer is not None:
            writer.wait(60)
        server.terminate()
        server.wait(10)
