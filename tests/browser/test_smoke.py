"""One real-browser test: serve the app with `streamlit run`, drive Debian's Chromium with Playwright.

Checks what AppTest cannot: the page renders in a browser (plotly, the data grid),
the Merge button works through the real server, and no exception element appears.
Screenshots land in test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.server import wait_healthy
from conftest import REPO, write_tiny_run

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_run(tmp_path_factory: pytest.TempPathFactory):
    """A tiny run served by a real Streamlit server on a free loopback port."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (make browser-deps) to run this test")
    pytest.importorskip("playwright.sync_api")
    run = write_tiny_run(tmp_path_factory.mktemp("served") / "run", list(range(50, 650, 50)), spike_steps=(298,))
    port = _free_port()
    log_path = tmp_path_factory.mktemp("log") / "streamlit.log"
    env = dict(os.environ, CKPT_SELECT_RUN=str(run), CKPT_SELECT_ROOT=str(run))
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "streamlit_app.py"),
             "--server.headless=true", f"--server.port={port}", "--server.address=127.0.0.1",
             "--browser.gatherUsageStats=false", "--server.fileWatcherType=none", "--client.toolbarMode=minimal"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path, 60)
        yield url, run
    finally:
        proc.terminate()
        proc.wait(10)


def test_every_page_renders_and_a_merge_runs_in_chromium(served_run) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, run = served_run
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                                          "--disable-background-networking", "--disable-component-update"])
        page = browser.new_context(viewport={"width": 1400, "height": 2400}).new_page()
        # The selection travels in the URL, as in a shared link: the two newest checkpoints.
        page.goto(f"{url}/?sel=550,600")
        _wait_idle(page, expect)
        expect(page.get_by_test_id("stPlotlyChart").locator(".main-svg").first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "page_run.png"))
        expected = {"Checkpoints": "stDataFrame", "Storage": "stMetric", "Merge": "stPlotlyChart"}
        for name, element in expected.items():
            page.get_by_role("link", name=name).click()
            expect(page.get_by_role("heading", name=name if name != "Storage" else "Storage planner")).to_be_visible()
            expect(page.get_by_test_id(element).first).to_be_visible(timeout=30_000)
            _wait_idle(page, expect)
            page.screenshot(path=str(ARTIFACTS / f"page_{name.lower()}.png"))
            assert page.locator("[data-testid='stException']").count() == 0, name
        expect(page.get_by_test_id("stPlotlyChart").first).to_be_visible()
        page.get_by_role("button", name="Merge", exact=True).click()
        done = page.get_by_test_id("stAlert").filter(has_text="checkpoints into")
        expect(done).to_be_visible(timeout=60_000)
        _wait_idle(page, expect)
        page.screenshot(path=str(ARTIFACTS / "page_merge_done.png"))
        assert page.locator("[data-testid='stException']").count() == 0
        browser.close()
    merged = list((run / "merges").glob("*/model.safetensors"))
    assert [m.parent.name for m in merged] == ["sma-550-600"]


def _wait_idle(page, expect) -> None:
    """Wait until the script finished and no skeleton placeholders remain."""
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=60_000)
    expect(page.get_by_test_id("stSkeleton")).to_have_count(0, timeout=30_000)
