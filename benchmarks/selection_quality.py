"""Is the recommendation right? CkptSelect's choice against a brute-force oracle (issue 5).

For each run of ``selection_runs.py`` (four dynamics, 30 checkpoints each), every candidate
a user or an oracle could pick is scored on the run's TEST split, which neither the logged
``val_loss`` nor the recommender's evaluator (``evaluate.py:evaluate``, the val split) ever
sees:

- the oracle: the best of every single checkpoint, every "last N" average (N = 1..all, with
  and without the checkpoints the trainer knows were saved inside a spike), EMA of the clean
  checkpoints at several alpha, and two greedy soups built on the test split itself;
- ``recommend`` in ``auto`` mode from the logs alone, and with the val evaluator; from the logs with
  their val losses removed (the train loss then stands in, as for a Hugging Face run that never
  evaluates); for a run that saved optimizer state, also as if it had not (the val band decides);
- the habits it replaces: the last 5, the last 10, all checkpoints.

capture = (test_last - test_choice) / (test_last - test_oracle): 1.0 is the oracle's gain,
0 is no better than the last checkpoint, negative is worse. Where the oracle's gain is under
``--min-gain`` nats, capture is not defined and the table says so (an average can then only
match the last checkpoint, and "regret", choice minus oracle, is the number to read).

    .venv/bin/python benchmarks/selection_quality.py [--scale cpu|mid|gpu] [--runs a,b] [--parallel N]

Writes ``benchmarks/out/selection/SCALE/RUN.result.json`` and prints a README-ready table. After a change
to the recommender, ``--logs-only`` (the log-only columns) or ``--recommend-only`` (those and the
evaluator's) judges saved results again without the brute-force oracle, which does not change.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from analysis import RecommendConfig, assess_run, load_evaluator, open_run, recommend  # noqa: E402
from analysis.merge.in_memory import average_state_dict  # noqa: E402
from analysis.selection import policy_weights  # noqa: E402
from selection_runs import SCALES, RunSet, make_runs  # noqa: E402

EMA_ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.5)
BASELINES = (("last 5", 5), ("last 10", 10), ("all", None))


@dataclass
class Scorer:
    """Test-split scores of weighted averages of one run's checkpoints, each computed once."""

    steps: list[int]
    states: list[dict[str, torch.Tensor]]
    evaluate_test: object
    cache: dict[tuple, float] = field(default_factory=dict)

    @classmethod
    def for_run(cls, run_dir: Path, run) -> "Scorer":
        """The scorer of every checkpoint of ``run`` with its folder's ``evaluate_test``."""
        return cls([c.step for c in run.checkpoints], float32_states(run.checkpoints),
                   load_module(run_dir / "evaluate.py").evaluate_test)

    def key(self, members: list[int], weights: tuple[float, ...] | None) -> tuple:
        """What identifies a candidate: its steps and (rounded) weights, uniform when ``weights`` is None."""
        weights = weights or policy_weights("sma", len(members))
        return tuple((self.steps[i], round(w, 10)) for i, w in zip(members, weights))

    def score(self, members: list[int], weights: tuple[float, ...] | None = None) -> float:
        """Test loss of the average of checkpoints ``members`` (indices) with ``weights`` (uniform if None)."""
        weights = weights or policy_weights("sma", len(members))
        key = self.key(members, weights)
        if key not in self.cache:
            self.cache[key] = float(self.evaluate_test(self.average(members, weights)))
        return self.cache[key]

    def average(self, members: list[int], weights: tuple[float, ...]) -> dict[str, torch.Tensor]:
        """The weighted average of checkpoints ``members`` (indices), tensor by tensor."""
        return {k: sum(w * self.states[i][k] for i, w in zip(members, weights)) for k in self.states[members[0]]}


def float32_states(refs) -> list[dict[str, torch.Tensor]]:
    """Every checkpoint's tensors in float32, on the GPU when there is one (averages of 30 x 25M
    parameters are quick there); the runs are small enough to hold whole."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Read as the evaluator reads a checkpoint alone (any layout: safetensors, or a .pt with the optimizer).
    return [{k: v.to(device, torch.float32) for k, v in average_state_dict([ref], (1.0,)).items()} for ref in refs]


def load_module(path: Path) -> ModuleType:
    """A run's ``evaluate.py``, imported by path as a tool would."""
    spec = importlib.util.spec_from_file_location(f"_bench_eval_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def contaminated_steps(run_dir: Path) -> set[int]:
    """Checkpoints the trainer knows were saved inside a spike's recovery (ground truth)."""
    events = json.loads((run_dir / "config.json").read_text())["events"]
    return {s for e in events for s in e.get("checkpoints_inside", [])}


def oracle(scorer: Scorer, clean: list[int]) -> tuple[float, str, list[int], tuple[float, ...]]:
    """The best test loss of every candidate family, what it was, and its members (indices) and weights."""
    n = len(scorer.steps)
    best: tuple = (math.inf, "", [], ())

    def consider(members: list[int], weights: tuple[float, ...] | None, what: str) -> None:
        nonlocal best
        value = scorer.score(members, weights)
        if value < best[0]:
            best = (value, what, members, weights or policy_weights("sma", len(members)))

    for i in range(n):
        consider([i], None, f"checkpoint {scorer.steps[i]}")
    for k in range(2, n + 1):
        consider(list(range(n - k, n)), None, f"last {k}")
    for k in range(2, len(clean) + 1):
        consider(clean[-k:], None, f"last {k} clean")
    for alpha in EMA_ALPHAS:
        consider(clean, policy_weights("ema", len(clean), alpha), f"EMA a={alpha:g} of clean")
    singles = sorted(range(n), key=lambda i: scorer.score([i]))
    for order, label in ((singles, "greedy soup by score"), (list(reversed(range(n))), "greedy soup newest first")):
        members, value = [order[0]], scorer.score([order[0]])
        for i in order[1:]:
            trial = sorted(members + [i])
            trial_value = scorer.score(trial)
            if trial_value < value:
                members, value = trial, trial_value
        consider(sorted(members), None, f"{label} ({len(members)} ckpts)")
    return best


def without_val(run):
    """The run as if it had logged no val loss (the HF Trainer's default): its train loss then stands in."""
    return replace(run, metrics=run.metrics[run.metrics["metric"] != "val_loss"])


def train_loss_choice(run) -> object:
    """The log-only recommendation of ``run`` judged without its val losses."""
    return recommend(assess_run(without_val(run)), RecommendConfig())


def recommendations(run_dir: Path, run, signals, with_evaluator: bool = True, train_loss: bool = True) -> dict:
    """Every ``recommend`` choice the benchmark judges, by column: from the logs; with ``train_loss``, from the
    train loss alone; for a run that saved optimizer state, as if it had not (the val band decides); and
    with ``with_evaluator``, with the run's val evaluator."""
    recs = {"recommend (logs)": recommend(signals, RecommendConfig())}
    if train_loss:
        recs["recommend (train loss)"] = train_loss_choice(run)
    if signals.noise is not None:
        recs["recommend (val band)"] = recommend(replace(signals, noise=None), RecommendConfig())
    if with_evaluator:
        evaluator = load_evaluator(f"{run_dir / 'evaluate.py'}:evaluate")
        recs["recommend --eval"] = recommend(signals, RecommendConfig(), evaluator)
    return recs


def describe(rec) -> str:
    steps = [r.step for r in rec.checkpoints]
    span = f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else str(steps[0])
    return f"{rec.method.upper()} of {len(steps)} ({span})"


def capture(last: float, choice: float, best: float, min_gain: float) -> float | None:
    gain = last - best
    return None if gain < min_gain else (last - choice) / gain


def choice_entry(value: float, what: str, calls: int, last: float, best: float, min_gain: float) -> dict:
    """One column of a result: the test loss of a choice, what it was, and its capture and regret."""
    return {"test": value, "what": what, "evaluator_calls": calls,
            "capture": capture(last, value, best, min_gain), "regret": value - best}


def judge_run(run_dir: Path, min_gain: float) -> dict:
    """Every score of one run."""
    started = time.time()
    run = open_run(run_dir)
    scorer = Scorer.for_run(run_dir, run)
    steps = scorer.steps
    bad = contaminated_steps(run_dir)
    clean = [i for i, s in enumerate(steps) if s not in bad]
    n = len(steps)

    signals = assess_run(run)
    index = {s: i for i, s in enumerate(steps)}

    def rec_score(rec) -> float:
        return scorer.score([index[r.step] for r in rec.checkpoints], tuple(rec.weights))

    recs = recommendations(run_dir, run, signals)
    last = scorer.score([n - 1])
    best, best_what, _, _ = oracle(scorer, clean)
    result = {
        "run": run_dir.name, "checkpoints": n, "contaminated": sorted(bad),
        "detected": [c.ref.step for c in signals.checkpoints if c.spike is not None],
        "last": last, "oracle": best, "oracle_is": best_what,
        "choices": {},
    }
    choices = {label: (rec_score(rec), describe(rec), rec.evaluations) for label, rec in recs.items()}
    if signals.noise is not None:
        eligible = [index[c.ref.step] for c in signals.checkpoints if c.eligible]
        result["iterate_noise"] = {"estimated": recs["recommend (logs)"].iterate_noise,
                                   "implied_by_test": implied_noise(scorer, eligible[-IMPLIED_WINDOW:])}
    for label, k in BASELINES:
        members = list(range(n)) if k is None else list(range(max(0, n - k), n))
        choices[label] = (scorer.score(members), f"last {len(members)}", 0)
    for label, (value, what, calls) in choices.items():
        result["choices"][label] = choice_entry(value, what, calls, last, best, min_gain)
    result["seconds"] = round(time.time() - started, 1)
    result["n_params"] = json.loads((run_dir / "config.json").read_text())["n_params"]
    result["date"] = date.today().isoformat()
    result["measured_on"] = (f"{platform.machine()}, {os.cpu_count()} CPUs"
                             + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    return result


def rejudge_recommend(run_dir: Path, saved: dict, min_gain: float, with_evaluator: bool) -> dict:
    """``saved`` with its log-only columns (and with ``with_evaluator`` the evaluator's) judged again by the
    current recommender, the oracle and the baselines kept.

    Neither depends on the recommender, and the brute-force oracle is most of a judging's time;
    ``logs_rejudged`` (and ``eval_rejudged``) record the date.
    """
    run = open_run(run_dir)
    scorer = Scorer.for_run(run_dir, run)
    index = {s: i for i, s in enumerate(scorer.steps)}
    signals = assess_run(run)
    recs = recommendations(run_dir, run, signals, with_evaluator)
    result = json.loads(json.dumps(saved))
    for label, rec in recs.items():
        value = scorer.score([index[r.step] for r in rec.checkpoints], tuple(rec.weights))
        result["choices"][label] = choice_entry(value, describe(rec), rec.evaluations, saved["last"],
                                                saved["oracle"], min_gain)
    result["detected"] = [c.ref.step for c in signals.checkpoints if c.spike is not None]
    result["logs_rejudged"] = date.today().isoformat()
    if with_evaluator:
        result["eval_rejudged"] = date.today().isoformat()
    return result


IMPLIED_WINDOW = 4


def implied_noise(scorer: Scorer, newest: list[int]) -> float:
    """V as the test losses show it: (mean test loss of the checkpoints − that of their average) / (1 − 1/N).

    Each checkpoint carries V and the uniform average of N with independent jitter V / N, while the
    centres' losses average out to first order; so this is the V that the estimate from Adam's
    second moments should match (the newest few, where the LR barely moves).
    """
    singles = sum(scorer.score([i]) for i in newest) / len(newest)
    return (singles - scorer.score(newest)) / (1 - 1 / len(newest))


def window_data(run_dir: Path) -> dict:
    """Per-checkpoint signals and the test loss of every SMA of the newest k eligible checkpoints.

    Any uniform-window rule picks such a window, so this table scores those rules offline (the bigger
    runs cannot be remade without a GPU; weighted averages need the checkpoints); written as RUN.windows.json.
    """
    from analysis.signals.similarity import compare_checkpoints

    run = open_run(run_dir)
    signals = assess_run(run)
    eligible = [c for c in signals.checkpoints if c.eligible]
    states = float32_states([c.ref for c in eligible])
    evaluate_test = load_module(run_dir / "evaluate.py").evaluate_test
    sums, windows = None, []
    for state in reversed(states):   # running sums: newest 1, 2, ... k
        sums = {k: v.clone() for k, v in state.items()} if sums is None else {k: sums[k] + state[k] for k in sums}
        windows.append(float(evaluate_test({k: v / (len(windows) + 1) for k, v in sums.items()})))
    similarity = compare_checkpoints(list(run.checkpoints))
    return {
        "run": run_dir.name,
        "checkpoints": [{"step": c.ref.step, "eligible": c.eligible, "val": c.val.value if c.val else None,
                         "lr": c.lr, "spike": c.spike.metric if c.spike else None} for c in signals.checkpoints],
        "eligible_steps": [c.ref.step for c in eligible],
        "test_of_newest_k": windows,
        "distance_matrix": similarity.distance_matrix.tolist(),
        "update_cosine_matrix": [[None if math.isnan(x) else x for x in row] for row in similarity.update_cosine_matrix.tolist()],
    }


def markdown(results: list[dict], scale: str) -> str:
    """The README table: test loss of each choice and its capture of the oracle's gain."""
    cols = ["recommend (logs)", "recommend --eval", "last 5", "last 10", "all"]
    if any("recommend (val band)" in r["choices"] for r in results):
        cols.insert(1, "recommend (val band)")
    if any("recommend (train loss)" in r["choices"] for r in results):
        cols.insert(1, "recommend (train loss)")
    sizes = sorted({r["n_params"] for r in results})   # the hf set mixes a GPT-2 and a Llama
    params = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}–{sizes[-1]:,}"
    lines = [
        f"Scale `{scale}` ({params} parameters, 30 checkpoints per run), test loss in "
        f"nats/byte; capture in parentheses (where the oracle gains under --min-gain: n/a and the regret).",
        "",
        "| run | last ckpt | oracle (what) | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for r in results:
        cells = []
        for c in cols:
            choice = r["choices"].get(c)
            if choice is None:
                cells.append("—")
                continue
            cap = f"n/a, {choice['regret']:+.4f}" if choice["capture"] is None else f"{choice['capture']:.2f}"
            cells.append(f"{choice['test']:.4f} ({cap})")
        lines.append(f"| {r['run']} | {r['last']:.4f} | {r['oracle']:.4f} ({r['oracle_is']}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("What `recommend` chose: " + "; ".join(
        f"{r['run']}: logs {r['choices']['recommend (logs)']['what']}, eval {r['choices']['recommend --eval']['what']} "
        f"in {r['choices']['recommend --eval']['evaluator_calls']} calls" for r in results) + ".")
    noise = [r for r in results if r.get("iterate_noise")]
    if noise:
        lines.append("Iterate noise V at the newest LR, estimated from Adam's second moments vs implied by the test "
                     f"losses of the newest {IMPLIED_WINDOW}: " + "; ".join(
                         f"{r['run']} {r['iterate_noise']['estimated']:.4f} vs {r['iterate_noise']['implied_by_test']:.4f}"
                         for r in noise) + " nats.")
    lines.append(f"Measured {results[0]['date']} on {results[0]['measured_on']}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "selection")
    p.add_argument("--runs", default=None, help="comma-separated run names (default: all four)")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    p.add_argument("--min-gain", type=float, default=0.002, help="oracle gain (nats) under which capture is n/a")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of saved results (benchmarks/results/selection holds the published ones: "
                        "--out benchmarks/results/selection)")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="judge a replicate: every run's seed plus this (its own folder, e.g. cpu-seed+100)")
    p.add_argument("--optimizer-state", action="store_true",
                   help="runs whose checkpoints hold the AdamW state, so recommend can estimate iterate noise "
                        "(folder suffix -optim)")
    p.add_argument("--windows-only", action="store_true",
                   help="only write RUN.windows.json: signals and the test loss of every newest-k average")
    p.add_argument("--logs-only", action="store_true",
                   help="judge the log-only columns of saved results again with the current recommender, "
                        "keeping the oracle, baselines and evaluator columns")
    p.add_argument("--recommend-only", action="store_true",
                   help="judge every recommend column (log-only and --eval) of saved results again with the "
                        "current recommender, keeping the oracle and baselines")
    a = p.parse_args()
    runs = RunSet(a.scale, a.seed_offset, a.optimizer_state)
    names = a.runs.split(",") if a.runs else [s.name for s in runs.specs]
    root = a.out / runs.name
    if a.windows_only:
        for run_dir in make_runs(runs, a.out, names, a.parallel):
            (root / f"{run_dir.name}.windows.json").write_text(json.dumps(window_data(run_dir)) + "\n")
            print(f"{run_dir.name}: windows written", flush=True)
        return
    if a.logs_only or a.recommend_only:
        for run_dir in make_runs(runs, a.out, names, a.parallel):
            path = root / f"{run_dir.name}.result.json"
            result = rejudge_recommend(run_dir, json.loads(path.read_text()), a.min_gain, a.recommend_only)
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{run_dir.name}: recommend columns judged again", flush=True)
    elif not a.table_only:
        for run_dir in make_runs(runs, a.out, names, a.parallel):
            result = judge_run(run_dir, a.min_gain)
            (root / f"{run_dir.name}.result.json").write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result, indent=1), flush=True)
    results = [json.loads((root / f"{n}.result.json").read_text()) for n in names
               if (root / f"{n}.result.json").exists()]
    print(markdown(results, runs.name))


if __name__ == "__main__":
    main()
