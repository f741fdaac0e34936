"""How sure is a capture? The selection benchmark's test scores resampled by source file.

A benchmark run's test split is 64 KiB of eleven or so whole standard-library files, and the
windows of one file are alike (a file of regular expressions is hard everywhere), so how sure a
test score is depends on which files happen to be in the split, not on how many windows it has.
For each judged run this rebuilds the candidates the result file names (the last checkpoint, the
oracle, and ``recommend``'s choices: from the logs, the val band when the run saved optimizer
state, and with the run's val evaluator), scores every test window of each, then draws the test
files with replacement (2,000 times) and gives each choice's capture with a 95 % interval, the
oracle held to the candidate the whole split chose. An interval that reaches the goal (0.95 with
an evaluator, 0.85 without) means this split cannot tell the choice from one that meets it.

    .venv/bin/python benchmarks/capture_uncertainty.py --set cpu-seed+400-optim [--runs cosine]

Needs the set's run folders (``benchmarks/out/selection/SET/RUN``, kept by ``selection_quality.py``)
and its result files; writes ``SET/RUN.uncertainty.json`` next to the results and prints a table.

``--split lib-tests`` asks the same question of a sixteen times bigger held-out split that needs no
new training: 1 MiB of whole files of the standard library's own test suites (``Lib/test`` and the
like; the trainer's corpus leaves them out), about 240 files against the test split's eleven. Its
oracle is brute-forced again on it (the same families as ``selection_quality.py``), the last-5 and
last-10 baselines and the train-loss stand-in's choice are scored too, and each capture is printed
next to its value on the 64 KiB test split. Test code is not library code, so this split's gains are
its own; what it settles is whether a choice falls short of its own oracle by more than chance.
Writes ``SET/RUN.lib-tests.json``; about 15 minutes a CPU-scale run on two cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import ModuleType

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from analysis import assess_run, open_run  # noqa: E402
from analysis.selection import policy_weights  # noqa: E402
from selection_quality import (BASELINES, Scorer, contaminated_steps, describe, float32_states, oracle,  # noqa: E402
                               recommendations)

sys.path.insert(0, str(REPO / "sample_runs"))
from tinygpt import lib_tests_split  # noqa: E402

DRAWS = 2000
LIB_TESTS = "lib_tests"   # data/lib_tests.bin in each run folder
TEMPLATES = {"sample": REPO / "sample_runs" / "run_evaluate.py", "hf": REPO / "sample_runs" / "hf_run_evaluate.py"}


def window_scorer(run_dir: Path) -> ModuleType:
    """The evaluator template of the run's kind, pointed at ``run_dir``.

    Runs made before the templates had ``test_window_losses`` hold older copies, so the current
    template is loaded and aimed at the run instead of the copy it was made with.
    """
    kind = "hf" if (run_dir / "model_config").is_dir() else "sample"
    spec = importlib.util.spec_from_file_location(f"_windows_{kind}_{abs(hash(str(run_dir))):x}", TEMPLATES[kind])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.RUN_DIR = run_dir
    return module


def recommend_choices(run_dir: Path, run, steps: list[int], train_loss: bool = False) -> dict[str, tuple]:
    """Members (indices into ``steps``), weights and description of each choice the benchmark judged
    (:func:`selection_quality.recommendations`; the train-loss stand-in's with ``train_loss``)."""
    index = {s: i for i, s in enumerate(steps)}
    recs = recommendations(run_dir, run, assess_run(run), train_loss=train_loss)
    return {label: ([index[r.step] for r in rec.checkpoints], tuple(rec.weights), describe(rec))
            for label, rec in recs.items()}


def candidates(run_dir: Path, run, scorer: Scorer,
               train_loss: bool = False) -> dict[str, tuple[list[int], tuple[float, ...], str]]:
    """Members, weights and description of the last checkpoint, the oracle (by ``scorer``) and each
    recommend choice (with ``train_loss``, the stand-in's too)."""
    bad = contaminated_steps(run_dir)
    clean = [i for i, s in enumerate(scorer.steps) if s not in bad]
    _, what, members, weights = oracle(scorer, clean)
    out = {"last": ([len(scorer.steps) - 1], (1.0,), "last checkpoint"), "oracle": (members, tuple(weights), what)}
    out.update(recommend_choices(run_dir, run, scorer.steps, train_loss))
    return out


def file_bootstrap(losses: dict[str, np.ndarray], files: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Each choice's capture on DRAWS resamples of the test files (whole files, with replacement)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(files)
    by_file = {label: np.array([v[files == f].sum() for f in ids]) for label, v in losses.items()}
    counts = np.array([(files == f).sum() for f in ids])
    draws = rng.integers(0, len(ids), size=(DRAWS, len(ids)))
    weight = np.stack([np.bincount(d, minlength=len(ids)) for d in draws])   # times each file is drawn
    means = {label: weight @ sums / (weight @ counts) for label, sums in by_file.items()}
    gain = means["last"] - means["oracle"]
    return {label: (means["last"] - m) / gain for label, m in means.items() if label not in ("last", "oracle")}


def judge(run_dir: Path, saved: dict) -> dict:
    """The uncertainty record of one run."""
    run = open_run(run_dir)
    scorer = Scorer.for_run(run_dir, run)
    module = window_scorer(run_dir)
    files = module.test_window_files()
    chosen = candidates(run_dir, run, scorer)
    losses = {label: module.test_window_losses(scorer.average(members, weights))
              for label, (members, weights, _) in chosen.items()}
    for label, loss in losses.items():   # the windows add up to the scores the result file holds
        expected = {"last": saved["last"], "oracle": saved["oracle"]}.get(label) or saved["choices"][label]["test"]
        if abs(loss.mean() - expected) > 1e-4:
            raise SystemExit(f"{run_dir}: {label} scores {loss.mean():.5f} here, {expected:.5f} in the results "
                             "(judge the set again: the recommender changed since)")
    captures = file_bootstrap(losses, files)
    gain = losses["last"].mean() - losses["oracle"].mean()
    return {
        "run": run_dir.name, "set": run_dir.parent.name, "test_files": int(len(np.unique(files))),
        "test_windows": int(len(files)), "oracle": chosen["oracle"][2], "oracle_gain": float(gain),
        "choices": {label: {"what": chosen[label][2],
                            "capture": float((losses["last"].mean() - losses[label].mean()) / gain),
                            "ci95": [float(np.percentile(c, 2.5)), float(np.percentile(c, 97.5))]}
                    for label, c in captures.items()},
        "draws": DRAWS,
    }


@dataclass
class WindowScorer(Scorer):
    """A :class:`Scorer` that keeps every candidate's per-window losses on one split, for resampling."""

    split: str = LIB_TESTS
    module: ModuleType | None = None
    windows: dict[tuple, np.ndarray] = field(default_factory=dict)

    def score(self, members: list[int], weights: tuple[float, ...] | None = None) -> float:
        return float(self.window_losses(members, weights).mean())

    def window_losses(self, members: list[int], weights: tuple[float, ...] | None = None) -> np.ndarray:
        weights = weights or policy_weights("sma", len(members))
        key = self.key(members, weights)
        if key not in self.windows:
            self.windows[key] = self.module.test_window_losses(self.average(members, weights), self.split)
            if len(self.windows) % 25 == 0:   # a CPU-scale run scores about 120 candidates, 7 s each
                print(f"  {self.module.RUN_DIR}: {len(self.windows)} candidates scored on {self.split}",
                      file=sys.stderr, flush=True)
        return self.windows[key]


def write_lib_tests(run_dir: Path, data: np.ndarray) -> None:
    """Put the bigger split beside the run's own (``data/lib_tests.bin``), where its evaluator reads splits."""
    path = run_dir / "data" / f"{LIB_TESTS}.bin"
    if not path.exists() or not np.array_equal(np.fromfile(path, dtype=np.uint8), data):
        data.tofile(path)


def judge_lib_tests(run_dir: Path, saved: dict, names: list[str], data: np.ndarray, min_gain: float) -> dict:
    """The lib-tests record of one run: every choice's capture there, with its 95 % interval, beside
    its capture on the run's 64 KiB test split."""
    write_lib_tests(run_dir, data)
    run = open_run(run_dir)
    module = window_scorer(run_dir)
    scorer = WindowScorer([c.step for c in run.checkpoints], float32_states(run.checkpoints), None, module=module)
    files = module.test_window_files(LIB_TESTS)
    n = len(scorer.steps)
    chosen = candidates(run_dir, run, scorer, train_loss=True)
    for label, k in BASELINES:
        if k is not None:
            chosen[label] = (list(range(max(0, n - k), n)), policy_weights("sma", min(k, n)), label)
    losses = {label: scorer.window_losses(m, w) for label, (m, w, _) in chosen.items()}
    gain = float(losses["last"].mean() - losses["oracle"].mean())
    captures = file_bootstrap(losses, files) if gain >= min_gain else {}
    record = {
        "run": run_dir.name, "set": run_dir.parent.name, "split": "lib-tests", "split_bytes": int(len(data)),
        "test_files": int(len(np.unique(files))), "test_windows": int(len(files)), "first_files": names[:3],
        "last": float(losses["last"].mean()), "oracle": chosen["oracle"][2], "oracle_loss": float(losses["oracle"].mean()),
        "oracle_gain": gain, "min_gain": min_gain, "candidates_scored": len(scorer.windows), "choices": {},
        "draws": DRAWS, "date": date.today().isoformat(),
    }
    for label, (_, _, what) in chosen.items():
        if label in ("last", "oracle"):
            continue
        published = saved["choices"].get(label, {})
        # The result file's choice should be this one: the recommender has not changed since it was judged.
        entry = {"what": what, "same_as_results": published.get("what") == what, "loss": float(losses[label].mean()),
                 "capture_on_test": published.get("capture"), "capture": None, "ci95": None}
        if captures:
            entry["capture"] = float((losses["last"].mean() - losses[label].mean()) / gain)
            entry["ci95"] = [float(np.percentile(captures[label], 2.5)), float(np.percentile(captures[label], 97.5))]
        record["choices"][label] = entry
    return record


LIB_TESTS_COLS = ("recommend (logs)", "recommend (val band)", "recommend (train loss)", "recommend --eval",
                  "last 5", "last 10")


def lib_tests_markdown(records: list[dict]) -> str:
    """One row per run: the oracle there and each choice's capture with its interval, then in parentheses its
    capture on the run's 64 KiB test split (from the result file)."""
    lines = ["| run (set) | oracle on lib-tests (gain, nats) | " + " | ".join(LIB_TESTS_COLS) + " |",
             "|---|---|" + "---|" * len(LIB_TESTS_COLS)]
    for r in records:
        cells = []
        for col in LIB_TESTS_COLS:
            c = r["choices"].get(col)
            if c is None:
                cells.append("—")
            elif c["capture"] is None:
                cells.append(f"n/a, {c['loss'] - r['oracle_loss']:+.4f}")
            else:
                test = "n/a" if c["capture_on_test"] is None else f"{c['capture_on_test']:.2f}"
                cells.append(f"{c['capture']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}] ({test})")
        lines.append(f"| {r['run']} ({r['set']}) | {r['oracle']} ({r['oracle_gain']:.4f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(records: list[dict]) -> str:
    """One row per run: the oracle's gain and each choice's capture with its 95 % interval."""
    cols = ["recommend (logs)", "recommend (val band)", "recommend --eval"]
    lines = ["| run (set) | test files | oracle gain (nats) | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for r in records:
        cells = [f"{c['capture']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]" if (c := r["choices"].get(col)) else "—"
                 for col in cols]
        lines.append(f"| {r['run']} ({r['set']}) | {r['test_files']} | {r['oracle_gain']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", required=True, action="append", help="a judged set, e.g. cpu-seed+400-optim (repeatable)")
    p.add_argument("--runs", default=None, help="comma-separated run names (default: every judged run of the set)")
    p.add_argument("--split", choices=("test", "lib-tests"), default="test",
                   help="resample the run's own test split (default), or score on 1 MiB of the stdlib's test suites")
    p.add_argument("--min-gain", type=float, default=0.002, help="lib-tests oracle gain (nats) under which capture is n/a")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "selection", help="where the run folders are")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "selection",
                   help="where the result files are (and the uncertainty files go)")
    p.add_argument("--again", action="store_true", help="resample runs that already have an uncertainty file")
    p.add_argument("--table-only", action="store_true", help="print the table of the uncertainty files already written")
    a = p.parse_args()
    lib_tests = a.split == "lib-tests"
    suffix = "lib-tests" if lib_tests else "uncertainty"
    split = lib_tests_split() if lib_tests and not a.table_only else None
    records = []
    for name in a.set:
        for result in sorted((a.results / name).glob("*.result.json")):
            saved = json.loads(result.read_text())
            if a.runs and saved["run"] not in a.runs.split(","):
                continue
            done = a.results / name / f"{saved['run']}.{suffix}.json"
            if (done.exists() and not a.again) or a.table_only:
                records.extend([json.loads(done.read_text())] if done.exists() else [])
                continue
            if not lib_tests and all(c["capture"] is None for c in saved["choices"].values()):
                print(f"{name}/{saved['run']}: the oracle gains under --min-gain, nothing to resample", flush=True)
                continue
            run_dir = a.out / name / saved["run"]
            record = judge_lib_tests(run_dir, saved, *split, a.min_gain) if lib_tests else judge(run_dir, saved)
            done.write_text(json.dumps(record, indent=2) + "\n")
            print(json.dumps(record), flush=True)
            records.append(record)
    print(lib_tests_markdown(records) if lib_tests else markdown(records))


if __name__ == "__main__":
    main()
