"""Dashboard speed benchmark (not a test): the real app in headless Chromium, timed.

Targets (ISSUE 7): opening the bundled sample run renders in under 3 s, and a run with
1,000,000 log rows and 200 checkpoints stays interactive (every interaction under ~1 s warm).

    python benchmarks/app_speed.py [--repeat 3] [--rows 1000000] [--checkpoints 200]
                                   [--only sample|big] [--big-run DIR]

What is timed, each the best of ``--repeat`` tries:

* Sample run (``sample_runs/stdlib-gpt``), every page: **cold** = a fresh ``streamlit run``
  server with empty Streamlit caches and an empty sketch cache (scratch
  ``CKPT_SELECT_CACHE_DIR`` / ``CKPT_SELECT_STATE_DIR``), the page opened first;
  **warm** = the same page opened again in a new browser tab (a new session, caches full).
* A synthetic big run (generated once into ``--big-run``, reused): the Run page cold and
  warm, then, in one session, the smoothing slider, the x axis (tokens / wall time / step),
  log-y, opening the Checkpoints page (first and second time), ticking a checkpoint in the
  table (a click on the grid's canvas, checked to have changed the selection), clearing the
  selection and resetting it to the recommendation (buttons).

"Rendered" means: the Streamlit script finished (``stApp`` has
``data-test-script-state="notRunning"``), no skeleton placeholder is left, and the page's
main elements are drawn (every plotly chart has its SVG, every data grid its canvas, at
least as many as the page always shows). An interaction is timed from the input (key
press or click) to the end of the rerun it caused, then the same drawn-elements check.
The server is started outside the timing; a cold open includes the script's first imports.
Prints a README-ready markdown table (machine, date) and writes benchmarks/out/app_speed.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.server import wait_healthy  # noqa: E402

APP = REPO / "app" / "streamlit_app.py"
SAMPLE_RUN = REPO / "sample_runs" / "stdlib-gpt"
OUT = REPO / "benchmarks" / "out"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Page -> (url path, {test id: minimum count always drawn on it}).
PAGES = {
    "Run": ("", {"stPlotlyChart": 2}),
    "Checkpoints": ("checkpoints", {"stDataFrame": 1, "stPlotlyChart": 2}),
    "Merge": ("merge", {"stPlotlyChart": 1}),
    "Storage": ("storage", {"stPlotlyChart": 2}),
}
TIMEOUT_MS = 600_000
NO_RERUN_MS = 120_000  # an input that caused no rerun in this long is reported as n/a
# Counts finished script runs: a transition of stApp's script state back to notRunning.
OBSERVER_JS = """() => {
  const app = document.querySelector("[data-testid='stApp']");
  window.__runsDone = 0; window.__sawBusy = false;
  new MutationObserver(() => {
    const s = app.getAttribute("data-test-script-state");
    if (s !== "notRunning") { window.__sawBusy = true; }
    else if (window.__sawBusy) { window.__sawBusy = false; window.__runsDone += 1; }
  }).observe(app, {attributes: true, attributeFilter: ["data-test-script-state"]});
}"""
DRAWN_JS = """(minimum) => {
  const app = document.querySelector("[data-testid='stApp']");
  if (!app || app.getAttribute("data-test-script-state") !== "notRunning") return false;
  if (document.querySelector("[data-testid='stSkeleton']")) return false;
  if (document.querySelector("[data-testid='stException']")) return "exception";
  const charts = document.querySelectorAll("[data-testid='stPlotlyChart']");
  const grids = document.querySelectorAll("[data-testid='stDataFrame']");
  if (charts.length < (minimum.stPlotlyChart || 0) || grids.length < (minimum.stDataFrame || 0)) return false;
  for (const c of charts) if (!c.querySelector(".main-svg")) return false;
  for (const g of grids) if (!g.querySelector("canvas")) return false;
  return true;
}"""


# ---------------------------------------------------------------- the synthetic big run


def loss_curve(steps: np.ndarray, rng: np.random.Generator, spikes: tuple[int, ...]) -> np.ndarray:
    """A power-law pre-training loss with noise and a few spikes that decay back."""
    loss = 1.9 + 4.0 * (1.0 + steps / 2000.0) ** -0.45
    loss *= 1.0 + 0.015 * rng.standard_normal(len(steps))
    for start in spikes:
        after = steps - start
        hit = after >= 0
        loss[hit] += 1.2 * np.exp(-after[hit] / 400.0)
    return loss


def write_big_run(folder: Path, rows: int, checkpoints: int, seed: int = 0) -> None:
    """metrics.jsonl with ``rows`` train rows (+ a val row at every checkpoint) and the checkpoints.

    The layout is the sample run's (see sample_runs/make_sample_run.py): train rows
    {step, train_loss, lr, grad_norm, step_time_ms, tokens, wall_time}, val rows
    {step, val_loss, wall_time}, checkpoints/step_N.safetensors with step/tokens metadata.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    steps = np.arange(1, rows + 1)
    spikes = (int(rows * 0.31), int(rows * 0.72))
    warmup, peak = max(rows // 500, 1), 6e-4
    lr = np.where(steps < warmup, peak * steps / warmup,
                  peak * 0.5 * (1 + np.cos(np.pi * np.clip((steps - warmup) / (rows - warmup), 0, 1))))
    grad = 0.3 + 0.02 * rng.standard_normal(rows)
    for start in spikes:
        grad[start:start + 50] *= 8.0
    every = max(rows // checkpoints, 1)
    ckpt_steps = np.arange(every, every * checkpoints + 1, every)
    step_ms = 120.0 + 4.0 * rng.standard_normal(rows)
    step_ms[np.isin(steps, ckpt_steps)] += 2500.0   # a synchronous save stalls the step
    wall = 1_795_000_000.0 + np.cumsum(step_ms) / 1000.0
    train = pd.DataFrame({"step": steps, "train_loss": loss_curve(steps, rng, spikes).round(6), "lr": lr,
                          "grad_norm": grad.round(5), "step_time_ms": step_ms.round(3), "tokens": steps * 524_288,
                          "wall_time": wall.round(4)})
    lines = train.to_json(orient="records", lines=True).splitlines()
    val_loss = loss_curve(ckpt_steps, rng, spikes) + 0.05
    for step, value in zip(ckpt_steps[::-1], val_loss[::-1]):   # from the end, so indexes stay valid
        lines.insert(int(step), json.dumps({"step": int(step), "val_loss": round(float(value), 6),
                                            "wall_time": round(float(wall[step - 1]) + 1.0, 4)}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    write_checkpoints(folder / "checkpoints", ckpt_steps, rng)


def write_checkpoints(folder: Path, steps: np.ndarray, rng: np.random.Generator) -> None:
    """A tiny GPT-2-shaped state dict per step (about 50 KB each), drifting like SGD iterates."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    d, vocab, block = 32, 128, 64
    shapes = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (block, d),
              "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    for layer in range(2):
        shapes |= {f"transformer.h.{layer}.attn.c_attn.weight": (3 * d, d),
                   f"transformer.h.{layer}.attn.c_proj.weight": (d, d),
                   f"transformer.h.{layer}.mlp.c_fc.weight": (4 * d, d),
                   f"transformer.h.{layer}.mlp.c_proj.weight": (d, 4 * d)}
    state = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    for index, step in enumerate(steps):
        scale = 0.01 / math.sqrt(1 + index)   # smaller moves late in training, as the LR decays
        state = {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}
        save_file(state, str(folder / f"step_{int(step):07d}.safetensors"),
                  metadata={"step": str(int(step)), "tokens": str(int(step) * 524_288), "format": "pt"})


def big_run(folder: Path, rows: int, checkpoints: int) -> Path:
    """The big run at ``folder``, written once and reused while its parameters stay the same."""
    marker = folder / ".complete"
    wanted = f"{rows} {checkpoints}"
    if marker.exists() and marker.read_text() == wanted:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    print(f"writing a {rows:,}-row, {checkpoints}-checkpoint run into {folder} ...", file=sys.stderr, flush=True)
    write_big_run(folder, rows, checkpoints)
    marker.write_text(wanted)
    print(f"  done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return folder


# ---------------------------------------------------------------- server and browser


try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # reported in main()
    PlaywrightTimeout = TimeoutError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(run: Path):
    """A fresh ``streamlit run`` of the app on ``run``, with empty caches; yields its URL."""
    scratch = Path(tempfile.mkdtemp(prefix="ckpt-app-bench-"))
    port = _free_port()
    env = dict(os.environ, CKPT_SELECT_RUN=str(run), CKPT_SELECT_CACHE_DIR=str(scratch / "cache"),
               CKPT_SELECT_STATE_DIR=str(scratch / "state"), PYTHONPATH=str(REPO))
    log_path = scratch / "streamlit.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless=true", f"--server.port={port}",
             "--server.address=127.0.0.1", "--browser.gatherUsageStats=false", "--server.fileWatcherType=none",
             "--client.toolbarMode=minimal"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path, 90)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(scratch, ignore_errors=True)


def _wait_drawn(page, minimum: dict[str, int]) -> None:
    handle = page.wait_for_function(DRAWN_JS, arg=minimum, timeout=TIMEOUT_MS, polling=25)
    if handle.json_value() == "exception":
        text = page.locator("[data-testid='stException']").first.inner_text()
        raise RuntimeError(f"the app raised: {text[:1000]}")


def open_page(browser, url: str, name: str) -> tuple[float, object]:
    """Seconds from navigation to the page fully drawn, and the (open) page."""
    path, minimum = PAGES[name]
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    start = time.perf_counter()
    page.goto(f"{url}/{path}")
    page.wait_for_selector("[data-testid='stApp']", timeout=TIMEOUT_MS)
    _wait_drawn(page, minimum)
    return time.perf_counter() - start, page


def timed_input(page, action, minimum: dict[str, int]) -> float:
    """Seconds from ``action()`` (one input) to the end of the rerun it caused, page drawn."""
    page.evaluate(OBSERVER_JS)
    start = time.perf_counter()
    action()
    try:
        page.wait_for_function("() => window.__runsDone >= 1", timeout=NO_RERUN_MS, polling=10)
    except PlaywrightTimeout:   # the input missed (e.g. a grid cell moved): report it, don't hang
        print("  (no rerun followed the input)", file=sys.stderr, flush=True)
        return math.nan
    _wait_drawn(page, minimum)
    return time.perf_counter() - start


# ---------------------------------------------------------------- the measurements


def bench_sample(playwright_browser, repeat: int) -> dict[str, dict[str, float]]:
    """{page: {"cold": s, "warm": s}} on the bundled sample run, best of ``repeat``."""
    results: dict[str, dict[str, float]] = {}
    for name in PAGES:
        cold, warm = math.inf, math.inf
        for _ in range(repeat):
            with served(SAMPLE_RUN) as url:
                seconds, page = open_page(playwright_browser, url, name)
                cold = min(cold, seconds)
                page.close()
                for _ in range(2):
                    seconds, page = open_page(playwright_browser, url, name)
                    warm = min(warm, seconds)
                    page.close()
        results[name] = {"cold": cold, "warm": warm}
        print(f"sample {name:12} cold {cold:6.2f} s  warm {warm:6.2f} s", file=sys.stderr, flush=True)
    return results


def _click_use_cell(page, row: int):
    """Tick/untick the 'use' checkbox of table row ``row`` (the grid is a canvas: click by position).

    The checkbox is drawn centred in the narrow first column: x + 25 px hits it (x + 18 px, at
    its left edge, moved the grid's cursor without toggling anything, so no rerun followed).
    Rows are 35 px under a 35 px header.
    """
    def action() -> None:
        grid = page.get_by_test_id("stDataFrame").first
        box = grid.locator("canvas").first.bounding_box()
        page.mouse.click(box["x"] + 25, box["y"] + 35 * (row + 1) + 17)
    return action


def _selection_caption(page) -> str:
    """The Checkpoints page's "N selected: ..." line, to check an input changed the selection."""
    return page.get_by_text("selected:").first.inner_text()


def bench_big(browser, run: Path, repeat: int) -> dict[str, float]:
    """{what: best seconds} on the big run: cold/warm open, then each interaction warm."""
    best: dict[str, float] = {}

    def keep(what: str, seconds: float) -> None:
        best[what] = min(best.get(what, math.inf), seconds) if seconds == seconds else best.get(what, math.nan)
        print(f"big    {what:40} {seconds:7.2f} s", file=sys.stderr, flush=True)

    run_min = PAGES["Run"][1]
    ckpt_min = PAGES["Checkpoints"][1]
    for _ in range(repeat):
        with served(run) as url:
            seconds, page = open_page(browser, url, "Run")
            keep("Run page, cold", seconds)
            page.close()
            seconds, page = open_page(browser, url, "Run")
            keep("Run page, warm", seconds)
            slider = page.get_by_role("slider").first
            for key in ("ArrowRight", "ArrowLeft"):
                keep("smoothing slider (one notch)", timed_input(page, lambda: (slider.focus(), slider.press(key)), run_min))
            for label in ("tokens", "wall time (h)", "step"):
                button = page.get_by_test_id("stButtonGroup").get_by_role("radio", name=label, exact=True)
                keep(f"x axis -> {label}", timed_input(page, button.click, run_min))
            toggle = page.get_by_text("Log-scale loss", exact=True)
            for _ in range(2):
                keep("log-y toggle", timed_input(page, toggle.click, run_min))
            link = page.get_by_role("link", name="Checkpoints")
            keep("open Checkpoints page (first time)", timed_input(page, link.click, ckpt_min))
            page.get_by_role("link", name="Run").click()
            _wait_drawn(page, run_min)
            keep("open Checkpoints page (again)", timed_input(page, link.click, ckpt_min))
            for _ in range(2):
                before = _selection_caption(page)
                seconds = timed_input(page, _click_use_cell(page, 3), ckpt_min)
                if seconds == seconds and _selection_caption(page) == before:
                    print("  (the click reran the page but changed no selection)", file=sys.stderr, flush=True)
                    seconds = math.nan
                keep("tick a checkpoint in the table", seconds)
            # The buttons change the selection too (the table, heat map and trajectory follow),
            # and need no pixel positions: the robust measure of a selection change.
            clear = page.get_by_role("button", name="Clear the selection")
            keep("clear the selection (button)", timed_input(page, clear.click, ckpt_min))
            reset = page.get_by_role("button", name="Reset to the recommendation")
            keep("reset the selection (button)", timed_input(page, reset.click, ckpt_min))
            page.close()
    return best


# ---------------------------------------------------------------- report


def machine() -> str:
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    import streamlit

    return (f"{os.cpu_count()}-core {platform.machine()}, {mem_kb / 2**20:.0f} GB RAM, Python "
            f"{platform.python_version()}, streamlit {streamlit.__version__}, Chromium (headless)")


def markdown(sample: dict | None, big: dict | None, big_shape: str, repeat: int) -> str:
    lines = [f"Measured on {date.today()} ({machine()}), best of {repeat}."]
    if sample:
        lines += ["", "| sample run, page | cold (fresh server, empty caches) | warm (opened again) |", "|---|---|---|"]
        lines += [f"| {name} | {r['cold']:.2f} s | {r['warm']:.2f} s |" for name, r in sample.items()]
    if big:
        lines += ["", f"| {big_shape}: what | time |", "|---|---|"]
        lines += [f"| {what} | {seconds:.2f} s |" if seconds == seconds else f"| {what} | n/a (no rerun) |"
                  for what, seconds in big.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--only", choices=("sample", "big"))
    parser.add_argument("--big-run", type=Path, default=OUT / "app_speed_run",
                        help="where the synthetic run is written once and reused")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"no Chromium at {CHROMIUM}: install Debian's chromium (make browser-deps)")
    from playwright.sync_api import sync_playwright

    big_shape = f"{args.rows:,} log rows, {args.checkpoints} checkpoints"
    run = big_run(args.big_run, args.rows, args.checkpoints) if args.only != "sample" else None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage",
                                          "--disable-background-networking", "--disable-component-update"])
        sample = bench_sample(browser, args.repeat) if args.only != "big" else None
        big = bench_big(browser, run, args.repeat) if run is not None else None
        browser.close()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "app_speed.json").write_text(json.dumps(
        {"date": str(date.today()), "machine": machine(), "repeat": args.repeat, "sample": sample,
         "big": big, "big_shape": big_shape}, indent=2))
    print(markdown(sample, big, big_shape, args.repeat))


if __name__ == "__main__":
    main()
