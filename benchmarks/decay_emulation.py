"""Merge or decay? Decay-emulating merges of a WSD run's stable phase against its real decay (issue 24).

For each warmup-stable-decay run of ``selection_runs.py``, only the checkpoints of the stable phase (LR at
≥ 0.8 x the peak) are merged, as for a run that has not decayed yet, and every candidate is scored on the
run's TEST split (which neither the logs nor any evaluator the recommender uses sees):

- decay-emulating merges (WSM coefficients at the checkpoints' token positions), per schedule and window
  (a fraction of the tokens seen at the newest stable checkpoint), and the best of them;
- SMA of the newest k stable checkpoints (the best k) and EMA of all stable ones (the best alpha);
- the predicted weights: ``recommend`` from the logs of the stable phase (its Adam state gives the noise);
- the newest stable checkpoint alone, and the real end of the decay (the run's newest checkpoint).

    .venv/bin/python benchmarks/decay_emulation.py [--scale cpu] [--optimizer-state] [--runs wsd]
    .venv/bin/python benchmarks/decay_emulation.py --run-dir RUN   # a WSD run made by make_sample_run.py

Writes ``benchmarks/out/decay/SET/RUN.json`` and prints a table for docs/decay-emulation.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from analysis import RecommendConfig, assess_run, load_evaluator, open_run, recommend  # noqa: E402
from analysis.selection import cooldown_report, decay_coefficients, parse_schedule, policy_weights  # noqa: E402
from analysis.selection.cooldown import stable_phase  # noqa: E402
from analysis.selection.span import positions  # noqa: E402
from analysis.signals.noise import newest_iterate_noise  # noqa: E402
from selection_quality import EMA_ALPHAS, Scorer  # noqa: E402
from selection_runs import SCALES, RunSet, make_runs  # noqa: E402

SCHEDULES = ("linear", "1-sqrt", "cosine", "exp")
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)   # windows: these fractions of the tokens seen at the newest stable checkpoint
WSD_RUNS = ("wsd",)


def judge_run(run_dir: Path) -> dict:
    """Test losses of every stable-phase candidate, and of the real decay's end."""
    run = open_run(run_dir)
    signals = assess_run(run)
    stable, decayed = stable_phase([s for s in signals.checkpoints if s.eligible])
    assert decayed is not None, f"{run_dir} holds no real decay"
    scorer = Scorer.for_run(run_dir, run)
    index = {step: i for i, step in enumerate(scorer.steps)}
    members = [index[s.ref.step] for s in stable]
    where, unit = positions(stable)
    rows = []
    for fraction in FRACTIONS:
        span = [i for i, p in zip(members, where) if p >= where[-1] * (1 - fraction)]
        span_where = [p for p in where if p >= where[-1] * (1 - fraction)]
        for name in SCHEDULES:
            weights = decay_coefficients(parse_schedule(name), span_where)
            rows.append({"schedule": name, "fraction": fraction, "checkpoints": len(span),
                         "steps": [scorer.steps[i] for i in span], "test": scorer.score(span, weights)})
    smas = {k: scorer.score(members[-k:]) for k in range(2, len(members) + 1)}
    emas = {a: scorer.score(members, policy_weights("ema", len(members), a)) for a in EMA_ALPHAS}
    stable_signals = replace(signals, checkpoints=tuple(stable),
                             noise=newest_iterate_noise([s.ref for s in stable]))
    rec = recommend(stable_signals, RecommendConfig())
    predicted = scorer.score([index[r.step] for r in rec.checkpoints], rec.weights)
    evaluator = load_evaluator(f"{run_dir / 'evaluate.py'}:evaluate")   # the val split: what --cooldown --eval measures
    cooldown = cooldown_report(stable_signals, evaluator)
    return {"run": run_dir.name, "unit": unit, "stable_steps": [s.ref.step for s in stable],
            "stable_tokens": float(where[-1]), "decay_step": decayed.ref.step,
            "last_stable": scorer.score(members[-1:]), "real_decay_end": scorer.score([index[decayed.ref.step]]),
            "decay_rows": rows, "sma": smas, "ema": emas,
            "predicted": {"method": rec.method, "steps": [r.step for r in rec.checkpoints], "test": predicted},
            "cooldown_val": [{"schedule": r.schedule, "window": r.window, "checkpoints": len(r.steps),
                              "predicted_val": r.predicted_loss, "measured_val": r.measured_loss} for r in cooldown.rows],
            "cooldown_stable_val": cooldown.stable_measured}


def markdown(result: dict) -> str:
    """The table: each family's best stable-phase merge against the real decay's end (test loss, nats/byte)."""
    end, last = result["real_decay_end"], result["last_stable"]
    best = min(result["decay_rows"], key=lambda r: r["test"])
    k, sma = min(result["sma"].items(), key=lambda kv: kv[1])
    alpha, ema = min(result["ema"].items(), key=lambda kv: kv[1])
    lines = [f"Run `{result['run']}`: stable phase steps {result['stable_steps'][0]}–{result['stable_steps'][-1]} "
             f"({len(result['stable_steps'])} checkpoints), real decay to step {result['decay_step']}.", "",
             "| candidate (stable-phase checkpoints only) | test loss | vs last stable | vs real decay's end |",
             "|---|---:|---:|---:|"]

    def row(label: str, value: float) -> str:
        return f"| {label} | {value:.4f} | {value - last:+.4f} | {value - end:+.4f} |"

    lines += [row("newest stable checkpoint alone", last),
              row(f"best decay emulation ({best['schedule']}, window {best['fraction']:.0%} of tokens, "
                  f"{best['checkpoints']} ckpts)", best["test"]),
              row(f"best SMA (newest {k})", sma), row(f"best EMA (alpha {alpha})", ema),
              row(f"predicted weights (recommend from logs, {len(result['predicted']['steps'])} ckpts)",
                  result["predicted"]["test"]),
              row(f"**real decay's end** (step {result['decay_step']})", end), "",
              "| schedule | " + " | ".join(f"window {f:.0%}" for f in FRACTIONS) + " |",
              "|---|" + "---:|" * len(FRACTIONS)]
    for name in SCHEDULES:
        cells = [next(r for r in result["decay_rows"] if r["schedule"] == name and r["fraction"] == f) for f in FRACTIONS]
        lines.append(f"| {name} | " + " | ".join(f"{c['test']:.4f} ({c['checkpoints']})" for c in cells) + " |")
    lines += ["", f"`recommend --cooldown` on the stable phase, val split (newest stable alone: "
              f"{result['cooldown_stable_val']:.4f}): predicted from logs + Adam state / measured with the evaluator", "",
              "| schedule | window (tokens) | checkpoints | predicted val | measured val |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['schedule']} | {r['window']:,.0f} | {r['checkpoints']} | {r['predicted_val']:.4f} | "
              f"{r['measured_val']:.4f} |" for r in result["cooldown_val"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "selection")
    p.add_argument("--runs", default=",".join(WSD_RUNS), help="comma-separated WSD run names")
    p.add_argument("--optimizer-state", action="store_true", help="runs whose checkpoints hold the AdamW state")
    p.add_argument("--run-dir", type=Path, action="append",
                   help="judge this WSD run folder (made by sample_runs/make_sample_run.py) instead of making runs")
    a = p.parse_args()
    runs = RunSet(a.scale, 0, a.optimizer_state)
    results = REPO / "benchmarks" / "out" / "decay" / ("given" if a.run_dir else runs.name)
    results.mkdir(parents=True, exist_ok=True)
    for run_dir in a.run_dir or make_runs(runs, a.out, a.runs.split(",")):
        result = judge_run(run_dir)
        result["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}"
        result["date"] = date.today().isoformat()
        (results / f"{run_dir.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
