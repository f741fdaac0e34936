"""Every way to start a merge, against mergekit on the same inputs, in the same run (issue 20).

Issue 20 asked that each path meets 0.15x mergekit's wall time: a recipe merge (default
``--verify quick``), a recipe merge with ``--verify none``, and an ad-hoc ``merge --checkpoints
A B ...``, which before the merge package hashed every input in a pass of its own (2.49 s against
1.16 s for the recipe path on 8 x 220M bf16). Now the ad-hoc merge hashes in its own read pass.

The contenders run interleaved, round after round (each round: every contender once, inputs warm
in the page cache), so a load change on a shared machine hits all of them alike; per contender the
fastest round is reported, and the ratio to mergekit's fastest. Inputs come from
``merge_speed.py``'s generator (cached under ``--cache``). Usage:
``python benchmarks/merge_paths.py [--rounds 3] [--inputs 8]``; writes ``benchmarks/out/merge_paths.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_speed import REPO, _recipe, describe_machine, make_inputs, mergekit, timed, warm  # noqa: E402


def ours(folders: list[Path], work: Path, how: str) -> tuple[float, float]:
    """``analysis merge`` started the way ``how`` says: "recipe", "recipe --verify none" or "ad hoc"."""
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    if how == "ad hoc":
        args = ["--checkpoints", *[str(f / "model.safetensors") for f in folders]]
    else:
        args = [str(_recipe(folders, work))] + (["--verify", "none"] if how.endswith("none") else [])
    warm(folders)
    result = timed([sys.executable, "-m", "analysis", "merge", *args, "-o", str(out)], cwd=REPO)
    shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ckpt-select-merge-bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inputs", type=int, default=8)
    args = parser.parse_args()
    folders = make_inputs(args.cache, 12, args.inputs)
    paths = ("recipe", "recipe --verify none", "ad hoc")
    runs: dict[str, list[list[float]]] = {name: [] for name in (*paths, "mergekit")}
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        work = Path(tmp)
        for _ in range(args.rounds):
            for how in paths:
                runs[how].append(list(ours(folders, work, how)))
            kit = mergekit(folders, work)
            if kit is None:
                sys.exit("mergekit is not installed (pip install mergekit): nothing to compare with")
            runs["mergekit"].append(list(kit))
            print(json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
    best = {name: min(r[0] for r in results) for name, results in runs.items()}
    doc = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": describe_machine(),
           "load_average_1min": os.getloadavg()[0], "inputs": f"{len(folders)} x 220M bf16 Llama",
           "input_gb": sum((f / "model.safetensors").stat().st_size for f in folders) / 1e9,
           "runs_s_and_peak_mb": runs, "best_s": best,
           "ratio_to_mergekit": {name: best[name] / best["mergekit"] for name in paths}}
    out = REPO / "benchmarks" / "out" / "merge_paths.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print("\n| path | best of {} s | x mergekit |\n|---|---|---|".format(args.rounds))
    for name in (*paths, "mergekit"):
        ratio = best[name] / best["mergekit"]
        print(f"| {name} | {best[name]:.2f} | {ratio:.2f} |")
    print(f"\n{doc['machine']}, {doc['when']}, load average {doc['load_average_1min']:.1f}")


if __name__ == "__main__":
    main()
