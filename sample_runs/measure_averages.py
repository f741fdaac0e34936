"""Measure what uniform checkpoint averaging does on a sample run, with the run's own evaluator.

    .venv/bin/python sample_runs/measure_averages.py sample_runs/stdlib-gpt [--update-readme]

Scores the last checkpoint and the uniform averages of the last k clean checkpoints
(k = 2..all), where "clean" leaves out the checkpoints that ``config.json`` lists as saved
inside a loss spike's recovery. Where such a window spans a contaminated checkpoint, the
average with it put back is scored too, to show what including it costs. Averages are
computed in float32 (bf16 checkpoints are upcast first) and scored in float32, on val (what
a selection may look at) and on test (what it never sees). ``--update-readme`` replaces the
results section of the run's README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import torch
from safetensors import safe_open
from safetensors.torch import load_file

MARKER = "<!-- measure_averages.py writes below this line -->"


def load_evaluator(run_dir: Path) -> ModuleType:
    """The run's ``evaluate.py``, imported by path as a tool would."""
    spec = importlib.util.spec_from_file_location("sample_run_evaluate", run_dir / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint_paths(run_dir: Path) -> dict[int, Path]:
    """Checkpoint files by the step they record (safetensors metadata, or a ``.pt``'s "step"), in step order."""
    steps = {}
    for path in (run_dir / "checkpoints").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            steps[int(f.metadata()["step"])] = path
    for path in (run_dir / "checkpoints").glob("*.pt"):
        steps[int(torch.load(path, weights_only=True, mmap=True)["step"])] = path
    return dict(sorted(steps.items()))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a ``step_N.safetensors`` or of a ``step_N.pt`` that holds the optimizer too."""
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)["model"]
    return load_file(str(path))


def contaminated_steps(run_dir: Path) -> set[int]:
    """Checkpoint steps saved inside a spike's recovery, as recorded by the trainer."""
    events = json.loads((run_dir / "config.json").read_text())["events"]
    return {s for e in events for s in e.get("checkpoints_inside", [])}


def average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Uniform average in float32, accumulated one checkpoint at a time."""
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        for key, tensor in load_weights(path).items():
            total[key] = total.get(key, 0) + tensor.float()
    return {key: value / len(paths) for key, value in total.items()}


def measure(run_dir: Path) -> dict:
    """Scores of the last clean checkpoint and of every last-k clean average (and with the spike put back)."""
    scorer = load_evaluator(run_dir)
    ckpts = checkpoint_paths(run_dir)
    bad = contaminated_steps(run_dir)
    clean = [s for s in ckpts if s not in bad]

    def score(steps: list[int]) -> dict:
        state = average([ckpts[s] for s in steps])
        return {"val": scorer.evaluate(state), "test": scorer.evaluate_test(state)}

    rows = []
    for k in range(1, len(clean) + 1):
        window = clean[-k:]
        row = {"k": k, "first": window[0], "last": window[-1], **score(window)}
        spiked = sorted(s for s in bad if window[0] < s < window[-1])
        if spiked:
            row["with_spiked"] = {"steps": spiked, **score(sorted(window + spiked))}
        rows.append(row)
    best = min(rows[1:], key=lambda r: r["val"]) if len(rows) > 1 else rows[0]
    spiked_alone = {s: score([s]) for s in sorted(bad)}
    return {"checkpoints": list(ckpts), "contaminated": sorted(bad), "rows": rows, "best_k": best["k"],
            "spiked_alone": spiked_alone}


def to_markdown(result: dict) -> str:
    """The results as the README's table plus a summary."""
    rows, best = result["rows"], result["rows"][result["best_k"] - 1]
    last = rows[0]
    lines = ["| k | clean checkpoints (steps) | val | test | val gain | test gain | + spiked ckpt: val | + spiked ckpt: test |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        span = str(r["last"]) if r["k"] == 1 else f"{r['first']}-{r['last']}"
        spiked = r.get("with_spiked")
        extra = f"{spiked['val']:.4f} | {spiked['test']:.4f}" if spiked else "- | -"
        mark = " **best**" if r is best else ""
        lines.append(f"| {r['k']}{mark} | {span} | {r['val']:.4f} | {r['test']:.4f} | "
                     f"{last['val'] - r['val']:+.4f} | {last['test'] - r['test']:+.4f} | {extra} |")
    alone = ", ".join(f"step {s}: val {v['val']:.4f}, test {v['test']:.4f}" for s, v in result["spiked_alone"].items())
    summary = [
        "",
        f"Row k = 1 is the last checkpoint alone. Checkpoints inside the spike's recovery "
        f"({result['contaminated'] or 'none'}) are left out of every clean average; scored alone they give {alone or '-'}.",
        f"The best clean average by val is k = {best['k']} (steps {best['first']}-{best['last']}): val "
        f"{best['val']:.4f} vs {last['val']:.4f} for the last checkpoint ({last['val'] - best['val']:+.4f} nats/byte), "
        f"test {best['test']:.4f} vs {last['test']:.4f} ({last['test'] - best['test']:+.4f}).",
    ]
    if "with_spiked" in best:
        w = best["with_spiked"]
        summary.append(f"Putting the spiked checkpoint(s) {w['steps']} back into that average makes it worse: val "
                       f"{w['val']:.4f} ({w['val'] - best['val']:+.4f}; {w['val'] - last['val']:+.4f} against the last "
                       f"checkpoint), test {w['test']:.4f} ({w['test'] - best['test']:+.4f}; "
                       f"{w['test'] - last['test']:+.4f}).")
    return "\n".join(lines + summary) + "\n"


def update_readme(run_dir: Path, table: str) -> None:
    """Replace everything after MARKER in the run's README.md with the fresh results."""
    readme = run_dir / "README.md"
    head = readme.read_text().split(MARKER)[0].rstrip("\n")
    section = (f"\n\n{MARKER}\n## What averaging does\n\nMeasured by `sample_runs/measure_averages.py {run_dir}` "
               "with this run's `evaluate.py` (nats/byte, lower is better; gain = last checkpoint minus average; "
               "averages taken in float32).\n\n")
    readme.write_text(head + section + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--update-readme", action="store_true", help="write the table into RUN_DIR/README.md")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON instead of a table")
    args = parser.parse_args()
    result = measure(args.run_dir)
    table = to_markdown(result)
    print(json.dumps(result, indent=2) if args.json else table)
    if args.update_readme:
        update_readme(args.run_dir, table)


if __name__ == "__main__":
    main()
