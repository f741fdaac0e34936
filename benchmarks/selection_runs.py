"""The training runs the selection benchmark judges the recommender on, and how to make them.

Four dynamics a recommender meets in practice, each 30 checkpoints of the sample-run trainer
(``sample_runs/make_sample_run.py``): constant LR with injected loss spikes, cosine decay,
warmup-stable-decay, and a post-norm model at a doubled LR with corrupted batches. The
``cpu`` scale is the shipped sample run's model (124,672 parameters, minutes on two cores);
the ``mid`` scale is 3x that (372,576 parameters, one thread per run); the ``gpu`` scale is a
25M-parameter model of the same code, trained on a CUDA device. The ``hf`` scale is four runs this
project's trainer did not write: ``transformers.Trainer`` (``sample_runs/make_hf_run.py``) trains a
GPT-2 or a Llama of the cpu scale's size with the Trainer's own schedulers, AdamW defaults,
windowed loss logging and ``checkpoint-N/`` folders (each with its ``optimizer.pt``).

    .venv/bin/python benchmarks/selection_runs.py --scale cpu --out benchmarks/out/selection

Runs already made with the same command are kept, so the benchmark can be rerun cheaply.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "sample_runs" / "make_sample_run.py"
HF_TRAINER = REPO / "sample_runs" / "make_hf_run.py"

# 2880 steps with a checkpoint every 96 steps: 30 checkpoints, a val loss logged at each.
_COMMON = ["--steps", "2880", "--ckpt-every", "96", "--eval-every", "96"]
_HF_COMMON = ["--steps", "2880", "--ckpt-every", "96"]   # the Trainer evaluates at every save

SCALES: dict[str, list[str]] = {
    "cpu": [],
    # 3x the cpu model (372,576 parameters); one thread each so that two train side by side on 2 cores.
    "mid": ["--n-layer", "3", "--n-embd", "96", "--threads", "1"],
    "gpu": ["--n-layer", "8", "--n-head", "8", "--n-embd", "512", "--block-size", "256", "--batch-size", "64",
            "--device", "cuda", "--threads", "4"],
    "hf": ["--threads", "1"],
}


@dataclass(frozen=True)
class RunSpec:
    """One benchmark run: a name, what it exercises, and the trainer flags that make it."""

    name: str
    dynamics: str
    flags: tuple[str, ...]
    gpu_flags: tuple[str, ...] = ()   # replaces the LR on the bigger model, which wants a smaller one


RUNS = (
    RunSpec("constant-spikes", "constant LR 3e-3, LR x10 excursions at steps 1530 and 2300",
            ("--schedule", "constant", "--lr", "3e-3", "--spike-steps", "1530,2300", "--seed", "7"),
            ("--lr", "1e-3")),
    RunSpec("cosine", "cosine decay from 3e-3 to 3e-4, no spike",
            ("--schedule", "cosine", "--lr", "3e-3", "--spike-steps", "", "--seed", "11"),
            ("--lr", "1e-3")),
    RunSpec("wsd", "warmup-stable-decay at 3e-3, linear decay over the last 20%, a corrupt batch at 1000",
            ("--schedule", "wsd", "--lr", "3e-3", "--spike-steps", "", "--corrupt-steps", "1000", "--seed", "13"),
            ("--lr", "1e-3")),
    RunSpec("postnorm-highlr", "post-norm at LR 6e-3, corrupt batches at 1800 and 2650, an LR x5 excursion at 2590",
            ("--schedule", "constant", "--norm", "post", "--lr", "6e-3", "--spike-steps", "2590",
             "--spike-lr-mult", "5", "--corrupt-steps", "1800,2650", "--seed", "17"),
            ("--lr", "2e-3")),
)


# Runs of the Hugging Face Trainer: its schedulers, not injected events, make the dynamics.
HF_RUNS = (
    RunSpec("hf-gpt2-linear", "GPT-2, the Trainer's default schedule: linear decay from 3e-3 to zero",
            ("--model", "gpt2", "--schedule", "linear", "--lr", "3e-3", "--seed", "21")),
    RunSpec("hf-llama-cosine", "Llama, cosine_with_min_lr from 3e-3 to 3e-4, each batch as two accumulated halves",
            ("--model", "llama", "--schedule", "cosine_with_min_lr", "--lr", "3e-3", "--grad-accum", "2",
             "--seed", "23")),
    RunSpec("hf-llama-constant", "Llama, constant_with_warmup at 2e-3, weight decay 0.1",
            ("--model", "llama", "--schedule", "constant_with_warmup", "--lr", "2e-3", "--weight-decay", "0.1",
             "--seed", "29")),
    RunSpec("hf-gpt2-wsd", "GPT-2, warmup_stable_decay at 3e-3, cosine decay to 3e-4 over the last 20%",
            ("--model", "gpt2", "--schedule", "warmup_stable_decay", "--lr", "3e-3", "--seed", "31")),
)


@dataclass(frozen=True)
class RunSet:
    """One set of the four runs: a scale, a seed replicate, and whether checkpoints hold the AdamW state."""

    scale: str
    seed_offset: int = 0      # every run's seed plus this (a replicate)
    optimizer: bool = False   # checkpoints are step_N.pt with the AdamW state (nanoGPT style)

    def __post_init__(self) -> None:
        if self.scale == "hf" and self.optimizer:
            raise ValueError("the hf runs always keep the Trainer's optimizer.pt: no --optimizer-state for them")

    @property
    def specs(self) -> tuple[RunSpec, ...]:
        """The runs of this set: the Trainer's four for the hf scale, else the sample trainer's."""
        return HF_RUNS if self.scale == "hf" else RUNS

    @property
    def trainer(self) -> Path:
        """The script that trains one run of this set."""
        return HF_TRAINER if self.scale == "hf" else TRAINER

    @property
    def name(self) -> str:
        """The set's folder: ``cpu``, ``cpu-seed+100`` for a replicate, ``cpu-seed+100-optim`` with Adam state."""
        name = self.scale if not self.seed_offset else f"{self.scale}-seed+{self.seed_offset}"
        return f"{name}-optim" if self.optimizer else name

    def trainer_args(self, spec: RunSpec, out: Path) -> list[str]:
        """The full make_sample_run.py argument list of one run of this set."""
        flags = list(spec.flags)
        if self.scale == "gpu":
            overrides = dict(zip(spec.gpu_flags[::2], spec.gpu_flags[1::2]))
            flags = [overrides.get(flags[i - 1], f) if i % 2 else f for i, f in enumerate(flags)]
        if self.seed_offset:
            flags = [str(int(f) + self.seed_offset) if i % 2 and flags[i - 1] == "--seed" else f
                     for i, f in enumerate(flags)]
        common = _HF_COMMON if self.scale == "hf" else _COMMON
        return ["--out", str(out), *common, *flags, *SCALES[self.scale],
                *(["--save-optimizer"] if self.optimizer else [])]


def is_made(out: Path, args: list[str]) -> bool:
    """True if ``out`` holds a finished run made with exactly these arguments."""
    config = out / "config.json"
    if not config.exists():
        return False
    made = json.loads(config.read_text())
    return "train_seconds" in made and made.get("benchmark_args") == args[2:]  # not --out: runs may move


def make_run(spec: RunSpec, runs: RunSet, root: Path) -> Path:
    """Train the run unless it is already there; returns its folder."""
    out = root / runs.name / spec.name
    args = runs.trainer_args(spec, out)
    if is_made(out, args):
        return out
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{spec.name}.train.log"
    print(f"training {runs.name}/{spec.name}: {shlex.join(args)}", flush=True)
    with open(log, "w") as f:
        subprocess.run([sys.executable, str(runs.trainer), *args, "--overwrite"], check=True, stdout=f,
                       stderr=subprocess.STDOUT)
    config = json.loads((out / "config.json").read_text())
    config["benchmark_args"] = args[2:]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def make_runs(runs: RunSet, root: Path, names: list[str] | None = None, parallel: int = 1) -> list[Path]:
    """Train every run of the set that is missing (``parallel`` at a time); returns their folders."""
    specs = [s for s in runs.specs if names is None or s.name in names]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(lambda s: make_run(s, runs, root), specs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "selection")
    p.add_argument("--runs", default=None, help="comma-separated run names (default: all)")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    p.add_argument("--seed-offset", type=int, default=0, help="a replicate: every run's seed plus this")
    p.add_argument("--optimizer-state", action="store_true",
                   help="checkpoints hold the AdamW state (step_N.pt, nanoGPT style; folder suffix -optim)")
    a = p.parse_args()
    names = a.runs.split(",") if a.runs else None
    for path in make_runs(RunSet(a.scale, a.seed_offset, a.optimizer_state), a.out, names, a.parallel):
        print(path)


if __name__ == "__main__":
    main()
