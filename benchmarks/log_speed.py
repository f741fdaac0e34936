"""Log-reading speed benchmark (not a test): big synthetic logs -> tidy frames.

Targets (ISSUE 3): a 1,000,000-step JSONL log in <= 1.5 s and a 1,000,000-line
nanoGPT-style stdout log in <= 3 s, on the 2-core development machine. A 1,000,000-row
CSV is timed for reference (no target).

    python benchmarks/log_speed.py [--steps 1000000] [--repeat 3]

Prints one line per case: best wall time of ``--repeat`` runs of ``read_log`` (the
file is written once, outside the timing), the rows and metrics found.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.logs import read_log  # noqa: E402


def write_jsonl(path: Path, steps: int) -> None:
    """A 1-record-per-step JSONL log with four metrics, like a hand-written loop's."""
    with path.open("w") as f:
        for i in range(steps):
            loss = 2.5 + math.sin(i / 100) * 0.1
            f.write(f'{{"step": {i}, "train_loss": {loss:.6f}, "lr": {3e-4 * (1 - i / steps):.6e}, '
                    f'"grad_norm": {0.5 + (i % 7) * 0.01:.4f}, "tokens": {i * 524288}}}\n')


def write_nanogpt(path: Path, lines: int, eval_every: int = 2000) -> None:
    """nanoGPT train.py stdout: one ``iter`` line per step, eval+checkpoint every ``eval_every``."""
    with path.open("w") as f:
        f.write("Overriding config with config/train_shakespeare_char.py:\nnumber of parameters: 10.65M\n")
        for i in range(lines):
            if i % eval_every == 0:
                f.write(f"step {i}: train loss {2.0 - i * 1e-7:.4f}, val loss {2.1 - i * 1e-7:.4f}\n")
                f.write("saving checkpoint to out\n")
            f.write(f"iter {i}: loss {2.0 - i * 1e-7:.4f}, time {30.0 + (i % 5):.2f}ms, mfu {40 + i % 3:.2f}%\n")


def write_csv(path: Path, steps: int) -> None:
    """A CSV metrics log (step, loss, lr, sparse val_loss every 100 steps), not a target, for reference."""
    with path.open("w") as f:
        f.write("step,train_loss,lr,val_loss\n")
        for i in range(steps):
            val = f"{2.6 - i * 1e-7:.6f}" if i % 100 == 0 else ""
            f.write(f"{i},{2.5 + math.sin(i / 100) * 0.1:.6f},{3e-4 * (1 - i / steps):.6e},{val}\n")


def bench(path: Path, repeat: int) -> tuple[float, int, int, str]:
    """(best seconds, rows, metrics, format) of reading ``path``."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        table = read_log(path)
        best = min(best, time.perf_counter() - start)
    return best, table.rows, len(table.metric_names()), table.format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("jsonl", Path(tmp) / "metrics.jsonl", write_jsonl, 1.5),
                 ("nanogpt", Path(tmp) / "train.log", write_nanogpt, 3.0),
                 ("csv", Path(tmp) / "metrics.csv", write_csv, math.inf)]
        for name, path, writer, target in cases:
            writer(path, args.steps)
            seconds, rows, metrics, fmt = bench(path, args.repeat)
            size_mb = path.stat().st_size / 1e6
            verdict = "ok" if seconds <= target else "SLOW"
            print(f"{name:8} {args.steps:>9,} steps {size_mb:6.1f} MB  {seconds:6.2f} s  (target {target} s, {verdict})"
                  f"  rows={rows:,} metrics={metrics} format={fmt}")


if __name__ == "__main__":
    main()
