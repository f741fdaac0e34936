"""Save-to-save weight distances against what their neighbours explain: the measurement behind rule 4 (issue 21).

For each run folder given, every checkpoint is sketched as the assessment sketches it, the distance
|θ_(i+1) − θ_i| of each pair consecutive by step is taken, and each is divided by what its neighbouring
intervals explain (``analysis.run_groups.trajectory_jumps``' rule with the factor set to 0, so every
interval's ratio is reported). The tests' relaunch and resume runs (``tests/test_trajectory_jumps.py``)
are built and measured too. Prints one row per run: its largest ratio, and the interval it is at.

    python benchmarks/trajectory_jumps.py sample_runs/stdlib-gpt /tmp/bench-work/runs/*
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from analysis.run import open_run  # noqa: E402
from analysis.run_groups import trajectory_jumps  # noqa: E402
from analysis.signals.assessment import sketch_geometry  # noqa: E402
from analysis.signals.sketch import sketch_checkpoint  # noqa: E402


def ratios(folder: Path) -> list[tuple[int, int, float, float]]:
    """(before step, after step, distance / explained, cosine) of every interval with a neighbour."""
    run = open_run(folder)
    sketches = [sketch_checkpoint(ref) for ref in run.checkpoints]
    geometry = [sketch_geometry(a, b) for a, b in zip(sketches, sketches[1:])]
    steps = [ref.step for ref in run.checkpoints]
    jumps = trajectory_jumps(steps, [d for d, _ in geometry], [c for _, c in geometry], factor=0.0, max_cosine=2.0)
    return [(j.before_step, j.after_step, j.ratio, j.cosine) for j in jumps]


def test_runs(work: Path) -> list[Path]:
    """The relaunch (fresh init at step 501) and the genuine resume the tests build."""
    import test_trajectory_jumps as t
    built = []
    for name in ("relaunched", "resumed"):
        root = work / name
        root.mkdir()
        t.Trainer(root, seed=1).train(1, 500)
        second = t.Trainer(root, seed=2 if name == "relaunched" else 3)
        if name == "resumed":
            second.resume(root / "ckpt_500.pt")
        second.train(501, 1000)
        built.append(root)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        os.environ["CKPT_SELECT_CACHE_DIR"] = str(Path(work) / "sketches")
        for folder in [*args.runs, *test_runs(Path(work))]:
            rows = ratios(folder)
            worst = max(rows, key=lambda r: r[2]) if rows else None
            shown = f"{worst[2]:6.2f} at {worst[0]}->{worst[1]}" if worst else "   -  "
            second = sorted((r[2] for r in rows), reverse=True)[1:2]
            cosine = f"cosine there {worst[3]:.3f}, lowest {min(r[3] for r in rows):.3f}" if rows else ""
            print(f"{folder.name:<16} intervals {len(rows):3d}  largest ratio {shown}  next "
                  f"{second[0] if second else 0:.2f}  {cosine}")


if __name__ == "__main__":
    main()
