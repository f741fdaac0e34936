"""Following a run while it trains (issue 23): incremental log reads equal full reads, RunFollower equals
open_run, checkpoints being written join when complete, and ``watch`` against a run written by a child process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
from safetensors.torch import save, save_file

from analysis.follow import RunFollower, Watcher
from analysis.logs import read_log
from analysis.logs.base import LogTable
from analysis.logs.follow import LogFollower
from analysis.run import open_run
from conftest import REPO, tiny_state, write_tiny_run

WRITER = Path(__file__).with_name("follow_writer.py")


def _same(got: LogTable, want: LogTable) -> None:
    """Two tables equal in everything a reader returns but the path."""
    pd.testing.assert_frame_equal(got.frame, want.frame)
    assert (got.format, got.rows, got.skipped_lines, got.restarts, got.notes, got.segments) == \
           (want.format, want.rows, want.skipped_lines, want.restarts, want.notes, want.segments)


def _full_read_of_complete_lines(path: Path, tmp: Path, fmt: str) -> LogTable:
    """A full read of ``path`` cut after its last line end (what a follower shows while a line is half written)."""
    data = path.read_bytes()
    copy = tmp / "complete" / path.name
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes(data[:data.rfind(b"\n") + 1])
    return read_log(copy, fmt)


def _follow_pieces(path: Path, pieces: list[str], fmt: str, tmp: Path) -> LogFollower:
    """Write ``pieces`` one by one (some end mid-line); after each the follower equals a full read."""
    path.write_text("")
    follower = None
    for piece in pieces:
        with path.open("a") as handle:
            handle.write(piece)
        follower = follower or LogFollower(path, fmt)
        _same(follower.read(), _full_read_of_complete_lines(path, tmp, fmt))
    return follower


def _jsonl_rows(first: int, last: int) -> str:
    return "".join(json.dumps({"step": s, "train_loss": 3.0 - s / 1000, "lr": 1e-3, "wall_time": 1.7e9 + s}) + "\n"
                   for s in range(first, last))


def test_jsonl_read_in_pieces_equals_a_full_read_issue23(tmp_path: Path) -> None:
    rows = _jsonl_rows(1, 400)
    pieces = [rows[:1000], rows[1000:1037], rows[1037:5000] + '{"step": 5, "train_', 'loss": "bad"}\nnot json\n',
              rows[5000:], _jsonl_rows(200, 300) + '{"step": 300, "val_loss": 2.5}\n',   # a restart at step 200
              '{"step": 301, "val_loss": 2.4}']   # a last line without its line end: held back, then taken
    path = tmp_path / "metrics.jsonl"
    follower = _follow_pieces(path, pieces, "jsonl", tmp_path)
    os.utime(path, ns=(1, 1))   # long unchanged: the last line is complete
    table = follower.read()
    _same(table, read_log(path, "jsonl"))
    assert table.restarts == 1 and table.skipped_lines >= 1 and 301 in table.series("val_loss")["step"].tolist()


def test_csv_read_in_pieces_equals_a_full_read_issue23(tmp_path: Path) -> None:
    header = "step,train_loss,lr\n"
    body = "".join(f"{s},{3.0 - s / 1e5:.6f},0.001\n" for s in range(1, 30_000))   # > 256 KB: the column-wise path too
    pieces = [header, body[:40], body[40:100], body[100:], "30000,1.5,0.001\n30001,1.4"]
    path = tmp_path / "metrics.csv"
    follower = _follow_pieces(path, pieces, "csv", tmp_path)
    with path.open("a") as handle:
        handle.write(",0.001\n")
    _same(follower.read(), read_log(path, "csv"))
    assert follower.read().rows == 30_001


def test_text_log_read_in_pieces_equals_a_full_read_issue23(tmp_path: Path) -> None:
    lines = "".join(f"iter {s}: loss {3.0 - s / 1000:.4f}, time 120.00ms, mfu 40.00%\n" for s in range(0, 500))
    cut = lines.index("\n", 3000) + 1
    # Read whole when they change: a half-written last line keeps the table read before it, until it ends.
    pieces = [lines[:cut], lines[cut:cut + 11], lines[cut + 11:], "step 500: train loss 2.5000, val loss 2.6000\n"]
    path = tmp_path / "train.log"
    follower = _follow_pieces(path, pieces, "nanogpt", tmp_path)
    assert follower.read().rows > 500


def test_a_truncated_or_rotated_log_is_read_again_from_the_start_issue23(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(_jsonl_rows(1, 300))
    follower = LogFollower(path, "jsonl")
    follower.read()
    path.write_text(_jsonl_rows(1, 50))   # truncated: shorter than what was read
    _same(follower.read(), read_log(path, "jsonl"))
    assert follower.read().rows == 49
    rotated = _jsonl_rows(1000, 1400)   # rotated: a new file, longer, other first bytes
    path.write_text(rotated)
    _same(follower.read(), read_log(path, "jsonl"))
    assert follower.read().segments == ((1000, 1399),)


def _append_checkpoint(run: Path, step: int, index: int) -> Path:
    target = run / "ckpt" / f"step_{step:06d}.safetensors"
    save_file(tiny_state(index, step), str(target), metadata={"step": str(step)})
    return target


def test_run_follower_equals_open_run_and_reports_what_is_new_issue23(tmp_path: Path) -> None:
    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)), spike_steps=(298,))
    follower = RunFollower(run)
    first = follower.refresh()
    assert first.changed and len(first.new_checkpoints) == 12 and follower.refresh().changed is False
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(_jsonl_rows(601, 651) + json.dumps({"step": 650, "val_loss": 1.1}) + "\n")
    _append_checkpoint(run, 650, 12)
    update = follower.refresh()
    want = open_run(run)
    pd.testing.assert_frame_equal(update.run.metrics, want.metrics)
    assert update.run.checkpoints == want.checkpoints and update.run.notes == want.notes
    assert update.run.fingerprint == want.fingerprint
    for name in want.metrics["metric"].unique():
        pd.testing.assert_frame_equal(update.run.metric(name), want.metric(name))
    assert update.new_rows == 51 and [r.step for r in update.new_checkpoints] == [650]
    assert update.last_step == 650


def test_a_checkpoint_being_written_is_listed_then_joins_issue23(tmp_path: Path) -> None:
    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    follower = RunFollower(run)
    follower.refresh()
    data = save(tiny_state(12, 650), metadata={"step": "650"})
    target = run / "ckpt" / "step_000650.safetensors"
    target.write_bytes(data[: len(data) // 2])   # half written: its data section is incomplete
    update = follower.refresh()
    assert [u.path for u in update.being_written] == [target] and update.being_written[0].status == "being written"
    assert max(r.step for r in update.run.checkpoints) == 600
    target.write_bytes(data)
    update = follower.refresh()
    assert update.being_written == () and [r.step for r in update.new_checkpoints] == [650]


def _watch(run: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "analysis", "watch", str(run), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_watch_follows_a_run_written_by_a_child_process_issue23(tmp_path: Path) -> None:
    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    watch = _watch(run, "--every", "0.5", "--json", "--until-step", "900")
    first = watch.stdout.readline()   # the recommendation of the run as it is, before the child writes
    assert first, watch.stderr.read()
    writer = subprocess.Popen([sys.executable, str(WRITER), str(run), "600", "900", "50", "0.5"])
    try:
        rest, err = watch.communicate(timeout=300)
    finally:
        writer.wait(60)
    assert watch.returncode == 0, err
    events = [json.loads(line) for line in [first, *rest.splitlines()]]
    chosen = {tuple(c["step"] for c in e["checkpoints"]) for e in events}
    assert len(chosen) >= 2, events
    # A line only when the recommendation changed: the last one may come before step 900, where watch exits.
    assert [e["step"] for e in events] == sorted(e["step"] for e in events) and events[-1]["step"] > 600
    assert any(c["step"] > 600 for e in events for c in e["checkpoints"])
    assert all(abs(sum(c["weight"] for c in e["checkpoints"]) - 1) < 1e-6 for e in events)


def test_watch_exits_0_on_ctrl_c_issue23(tmp_path: Path) -> None:
    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    watch = _watch(run, "--every", "0.5")
    assert watch.stdout.readline().startswith("step 600: average ")
    watch.send_signal(signal.SIGINT)
    _, err = watch.communicate(timeout=60)
    assert watch.returncode == 0 and "Traceback" not in err


def test_watcher_reports_only_changes_issue23(tmp_path: Path) -> None:
    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    watcher = Watcher(RunFollower(run))
    event = watcher.poll()
    assert event is not None and event["step"] == 600 and event["being_written"] == []
    assert watcher.poll() is None   # nothing changed
    shutil.copy(run / "metrics.jsonl", tmp_path / "unused.jsonl")
    assert watcher.poll() is None
