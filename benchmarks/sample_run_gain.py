"""Does the recommended average beat the last checkpoint on the sample run? Measured, not assumed.

Runs the recommender on the shipped sample run without and with its evaluator, merges
each recommendation with the real merge path, and scores the merged model and the last
checkpoint on the validation split (which the evaluator and logged val loss use) and on
the held-out test split (seen by nothing during selection).

    .venv/bin/python benchmarks/sample_run_gain.py [RUN_DIR]
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis import RecommendConfig, assess_run, load_evaluator, merge_checkpoints, open_run, recommend  # noqa: E402
from analysis.merge.in_memory import average_state_dict  # noqa: E402


def _module(path: Path):
    spec = importlib.util.spec_from_file_location("sample_evaluator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(run_dir: Path) -> dict:
    run = open_run(run_dir)
    evaluator_file = run.path / "evaluate.py"
    scorer = _module(evaluator_file)
    signals = assess_run(run)
    last = [s for s in signals.checkpoints if s.eligible][-1].ref
    rows = [{"what": f"last checkpoint (step {last.step})", "steps": [last.step], "evals": 0,
             **_scores(scorer, average_state_dict([last], (1.0,)))}]   # any layout: the last is a .pt resume file
    for label, evaluator in (("recommend, no evaluator", None),
                             ("recommend --eval evaluate.py:evaluate", load_evaluator(f"{evaluator_file}:evaluate"))):
        started = time.perf_counter()
        rec = recommend(signals, RecommendConfig(), evaluator)
        seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            result = merge_checkpoints(list(rec.checkpoints), rec.weights, Path(tmp) / "merged")
            state = load_file(str(result.model_file))
        rows.append({"what": label, "steps": [r.step for r in rec.checkpoints], "evals": rec.evaluations,
                     "recommend_seconds": round(seconds, 2), **_scores(scorer, state)})
    report = {"run": str(run.path), "date": date.today().isoformat(), "machine": _machine(), "rows": rows}
    _print(report)
    return report


def _scores(scorer, state) -> dict:
    return {"val_loss": scorer.evaluate(state), "test_loss": scorer.evaluate_test(state)}


def _machine() -> str:
    import os

    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def _print(report: dict) -> None:
    base = report["rows"][0]
    print(f"sample run {report['run']} ({report['machine']}, {report['date']})")
    print(f"{'selection':<40} {'checkpoints':>22} {'evals':>5} {'val loss':>9} {'test loss':>9} {'test gain':>9}")
    for row in report["rows"]:
        steps = row["steps"]
        span = f"{len(steps)} ({steps[0]}-{steps[-1]})" if len(steps) > 1 else str(steps[0])
        gain = base["test_loss"] - row["test_loss"]
        print(f"{row['what']:<40} {span:>22} {row['evals']:>5} {row['val_loss']:>9.4f} {row['test_loss']:>9.4f} {gain:>+9.4f}")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "sample_runs" / "stdlib-gpt"
    out = REPO / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    (out / "sample_run_gain.json").write_text(json.dumps(main(target), indent=2))
