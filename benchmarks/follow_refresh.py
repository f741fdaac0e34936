"""How long a followed run's refresh takes after 1,000 new rows and one new checkpoint (issue 23).

Writes (once) the 1M-row / 200-checkpoint run of app_speed.py, copies it, reads it once with a
RunFollower, then repeatedly appends 1,000 JSONL rows and one tiny checkpoint and times ``refresh()``
(and, for comparison, a cold ``open_run`` of the same folder). Prints a Markdown table.

    PYTHONPATH=. python benchmarks/follow_refresh.py [--rows 1000000] [--checkpoints 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_speed import big_run, write_checkpoints  # noqa: E402

from analysis.follow import RunFollower  # noqa: E402
from analysis.run import open_run  # noqa: E402


def append(run: Path, first_step: int, rows: int, rng: np.random.Generator) -> int:
    """``rows`` train rows after ``first_step`` and a checkpoint at the last one; returns that step."""
    last = first_step + rows
    with (run / "metrics.jsonl").open("a") as log:
        for step in range(first_step + 1, last + 1):
            log.write(json.dumps({"step": step, "train_loss": round(2.0 + rng.standard_normal() * 0.01, 6),
                                  "lr": 6e-5, "grad_norm": 0.3, "step_time_ms": 120.0,
                                  "tokens": step * 524_288, "wall_time": 1_795_200_000.0 + step * 0.12}) + "\n")
        log.write(json.dumps({"step": last, "val_loss": 2.05, "wall_time": 1_795_200_000.0 + last * 0.12}) + "\n")
    write_checkpoints(run / "checkpoints", np.array([last]), rng)
    return last


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/ckpt-select-bench/follow"))
    args = parser.parse_args()
    source = big_run(args.folder / "source", args.rows, args.checkpoints)
    run = args.folder / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(source, run)
    follower = RunFollower(run)
    first, update = timed(follower.refresh)
    rng, step, refreshes = np.random.default_rng(1), int(update.last_step), []
    for _ in range(args.repeat):
        step = append(run, step, 1000, rng)
        seconds, update = timed(follower.refresh)
        assert update.new_rows == 1001 and [r.step for r in update.new_checkpoints] == [step], update
        refreshes.append(seconds)
    cold, _ = timed(lambda: open_run(run))
    print(f"| what | seconds |\n|---|---|\n| first read (RunFollower, cold) | {first:.2f} |\n"
          f"| refresh after +1,000 rows and +1 checkpoint (median of {args.repeat}) | {np.median(refreshes):.2f} |\n"
          f"| same, each | {', '.join(f'{s:.2f}' for s in refreshes)} |\n"
          f"| open_run of the same folder from scratch | {cold:.2f} |")
    print(f"\n{args.rows:,} rows, {args.checkpoints} checkpoints; {platform.processor() or platform.machine()}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


if __name__ == "__main__":
    main()
