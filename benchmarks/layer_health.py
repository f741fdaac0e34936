"""Layer health on runs made here (issue 25): which layers lead each injected or natural loss spike, and
the pre-norm vs post-norm contrast.

    python benchmarks/layer_health.py RUN [RUN ...] [--out benchmarks/results/layer_health]

For every run: the norm placement CkptSelect reads, each loss spike (train or val) with the first
checkpoint it could hit and the layers that moved at or before it (relative update at least twice its
usual, leaders first, with lead times), the layer flags and the checkpoints they leave out; and, for the
contrast, per block the median relative update size over the second half of the run and the RMS growth
from the first to the last checkpoint. Writes one JSON per run and prints markdown tables.
Runs are made by sample_runs/make_sample_run.py (see docs/layer-health.md for the commands).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.run import open_run   # noqa: E402
from analysis.signals import assess_run   # noqa: E402


def run_summary(path: Path) -> dict:
    """Leads, flags and per-block contrast of one run."""
    run = open_run(path)
    signals = assess_run(run)
    report = signals.layers
    events = json.loads((path / "config.json").read_text()).get("events", []) if (path / "config.json").is_file() else []
    return {
        "run": path.name, "placement": report.placement.kind, "checkpoints": len(report.steps),
        "injected": [{"kind": e["kind"], "steps": e["steps"][:1] + e["steps"][-1:]} for e in events],
        "spikes": [{"metric": lead.spike.metric, "start_step": lead.spike.start_step, "ratio": lead.spike.ratio,
                    "first_hit_step": lead.first_hit_step,
                    "leaders": [{"layer": x.layer, "lead_checkpoints": x.lead_checkpoints, "lead_steps": x.lead_steps,
                                 "ratio": round(x.ratio, 2)} for x in lead.leaders]}
                   for lead in report.leads],
        "flags": [{"kind": f.kind, "layer": f.layer, "start_step": f.start_step, "end_step": f.end_step,
                   "reason": f.reason} for f in report.flags],
        "excluded": sorted(report.abnormal()),
        "blocks": _blocks(report),
    }


def _blocks(report) -> list[dict]:
    """Per block (attn and mlp together): median relative update over the second half, RMS growth first to last."""
    half = len(report.steps) // 2
    rows = []
    for layer in report.layers:
        if layer.block is None or layer.group not in ("attn", "mlp"):
            continue
        updates = [v for v in layer.relative_update[half:] if v == v]
        rows.append({"layer": layer.name, "block": layer.block,
                     "median_relative_update": statistics.median(updates) if updates else None,
                     "rms_growth": layer.rms[-1] / layer.rms[0] - 1})
    return rows


def markdown(summaries: list[dict]) -> str:
    """The docs tables: spikes and their leaders; the contrast by block."""
    lines = ["| run | norm | spike (metric, start) | first hit ckpt | layers that moved (lead in ckpts, ratio) | flags |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        flags = "; ".join(f"{f['kind']} {f['layer']} @ {f['start_step']}" for f in s["flags"]) or "none"
        for spike in s["spikes"] or [{"metric": "-", "start_step": "-", "first_hit_step": "-", "leaders": []}]:
            movers = ", ".join(f"{x['layer']} ({x['lead_checkpoints']}, {x['ratio']}x)" for x in spike["leaders"][:3])
            lead = max((x["lead_checkpoints"] for x in spike["leaders"]), default=None)
            movers = (movers or "none") + (f"; {len(spike['leaders'])} layers, longest lead {lead}" if lead is not None else "")
            lines.append(f"| {s['run']} | {s['placement']} | {spike['metric']} {spike['start_step']} | "
                         f"{spike['first_hit_step']} | {movers} | {flags} |")
    lines += ["", "| run | norm | layer | median relative update (2nd half) | RMS growth first→last |", "|---|---|---|---|---|"]
    for s in summaries:
        for b in s["blocks"]:
            update = f"{b['median_relative_update']:.4f}" if b["median_relative_update"] is not None else "-"
            lines.append(f"| {s['run']} | {s['placement']} | {b['layer']} | {update} | {100 * b['rms_growth']:+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "layer_health")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for path in args.runs:
        summary = run_summary(path)
        (args.out / f"{summary['run']}.json").write_text(json.dumps(summary, indent=2) + "\n")
        summaries.append(summary)
    print(markdown(summaries))


if __name__ == "__main__":
    main()
