"""Replays the val band's falling-loss guard on the selection benchmark's saved windows, under two rules.

The guard (``analysis/selection/eligibility.py``) stops a val-band window at a checkpoint more than
2 x the trend noise above the newest level, but only while the loss falls by more than a margin x that
noise per checkpoint: ``--factor`` x for every run, or (``--drift``, the rule since issue 21's second
pass) 1 x while the newest updates' median cosine is above 0 (the weights still travel one way) and 2 x
otherwise. Each ``benchmarks/results/selection/*/*.windows.json`` holds a run's checkpoints (val, LR,
eligibility), the sketched update-cosine matrix and the test loss of the SMA of its newest k; this rebuilds
the band's window (LR regime, band noise, guard) under both rules and prints the windows that differ, with
their test losses. Usage: ``python benchmarks/guard_replay.py [--factor 1 | --drift] [--against 2]``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.selection.eligibility import _noise  # noqa: E402
from analysis.selection.trend import descent_per_checkpoint, trend_noise  # noqa: E402


def band_window(checkpoints: list[dict], factor: float, band_sigmas: float = 2.0, lr_limit: float = 2.0) -> int | None:
    """The val band's window (how many newest checkpoints) with the guard acting above ``factor`` x noise."""
    eligible = [c for c in checkpoints if c["eligible"]]
    in_regime = eligible[len(eligible) - _regime(eligible, lr_limit):]
    vals = [c["val"] if c["val"] is not None else math.nan for c in in_regime]
    known = np.array([c["val"] for c in eligible if c["val"] is not None and math.isfinite(c["val"])])
    if len(known) < 3:
        return None
    sigma, level = _noise(known), float(np.nanmin(vals[-3:]))
    noise, descent = trend_noise(known), descent_per_checkpoint(known)
    guard = noise is not None and descent > factor * noise
    size = 0
    for value in reversed(vals):
        if math.isfinite(value) and (value > level + band_sigmas * sigma
                                     or (guard and value > level + band_sigmas * noise)):
            return max(size, 1)
        size += 1
    return size


def _regime(eligible: list[dict], limit: float) -> int:
    """How many newest checkpoints were saved within ``limit`` x the newest one's LR."""
    newest = eligible[-1]["lr"]
    if not newest:
        return len(eligible)
    size = 0
    for item in reversed(eligible):
        if item["lr"] is not None and item["lr"] > limit * newest:
            return max(size, 1)
        size += 1
    return size


def drift_factor(doc: dict, lr_limit: float = 2.0, newest: int = 5) -> float:
    """The guard's margin under the drift rule: 1 when the median cosine of consecutive updates of the newest
    ``newest`` eligible checkpoints of the LR regime is above 0, else 2 (as ``eligibility.drift_cosine``)."""
    checkpoints, cosines = doc["checkpoints"], doc["update_cosine_matrix"]
    eligible = [i for i, c in enumerate(checkpoints) if c["eligible"]]
    in_regime = eligible[len(eligible) - _regime([checkpoints[i] for i in eligible], lr_limit):]
    # row/column j of the matrix is the update into checkpoint j: the cosine into j is entry (j-1, j)
    values = [cosines[j - 1][j] for j in in_regime[-newest:] if j >= 2 and cosines[j - 1][j] is not None]
    return 1.0 if values and float(np.median(values)) > 0 else 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=float, default=1.0)
    parser.add_argument("--drift", action="store_true", help="replay the drift rule instead of --factor")
    parser.add_argument("--against", type=float, default=2.0)
    args = parser.parse_args()
    rows = []
    for path in sorted(glob.glob(str(REPO / "benchmarks" / "results" / "selection" / "*" / "*.windows.json"))):
        doc = json.loads(Path(path).read_text())
        factor = drift_factor(doc) if args.drift else args.factor
        base, tried = band_window(doc["checkpoints"], args.against), band_window(doc["checkpoints"], factor)
        if base is not None:
            test = doc["test_of_newest_k"]
            rows.append((str(Path(path).relative_to(REPO / "benchmarks" / "results" / "selection")), base, tried,
                         test[base - 1], test[tried - 1], test[0]))
    changed = [r for r in rows if r[1] != r[2]]
    label = "drift rule" if args.drift else f"{args.factor:g}x"
    print(f"| run | window at {args.against:g}x | {label} | test loss at {args.against:g}x | {label} | change |")
    print("|---|---|---|---|---|---|")
    for name, base, tried, before, after, _ in changed:
        print(f"| {name.removesuffix('.windows.json')} | {base} | {tried} | {before:.4f} | {after:.4f} | {after - before:+.4f} |")
    print(f"\n{len(rows)} val-band windows replayed, {len(changed)} changed, {sum(r[4] - r[3] for r in changed):+.4f} nats "
          f"in all; worse than the last checkpoint: {sum(r[3] > r[5] for r in rows)} at {args.against:g}x, "
          f"{sum(r[4] > r[5] for r in rows)} under the {label}")


if __name__ == "__main__":
    main()
