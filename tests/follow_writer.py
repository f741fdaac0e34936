"""A training job in miniature for the follow tests (issue 23): appends log rows and saves checkpoints.

``python follow_writer.py RUN FIRST_STEP LAST_STEP EVERY [PAUSE]`` appends one JSONL row per step after
FIRST_STEP to RUN/metrics.jsonl and, every EVERY steps, a val row and ``RUN/ckpt/step_N.safetensors``
(the newest one perturbed), pausing PAUSE seconds (default 0.5) after each save. Each checkpoint is
written in two halves with a pause between, so a reader can find it half written, as at a real save.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save


def _loss(step: int) -> float:
    """The loss curve of conftest.write_tiny_run for a 600-step run, continued."""
    return 3.0 * math.exp(-step / 150) + 1.0 + 0.01 * math.sin(step * 1.7)


def _save_slowly(path: Path, state: dict, step: int) -> None:
    """A checkpoint written in two halves 0.15 s apart: half written, it has an incomplete data section."""
    data = save(state, metadata={"step": str(step)})
    with path.open("wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(0.15)
        handle.write(data[len(data) // 2:])


def main(run: Path, first: int, last: int, every: int, pause: float) -> None:
    newest = sorted((run / "ckpt").glob("step_*.safetensors"))[-1]
    state = load_file(str(newest))
    generator = torch.Generator().manual_seed(first)
    with (run / "metrics.jsonl").open("a") as log:
        for step in range(first + 1, last + 1):
            log.write(json.dumps({"step": step, "train_loss": _loss(step), "lr": 1e-3, "grad_norm": 1.0}) + "\n")
            if step % every:
                continue
            log.write(json.dumps({"step": step, "val_loss": _loss(step) + 0.05}) + "\n")
            log.flush()
            state = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                     for k, v in state.items()}
            _save_slowly(run / "ckpt" / f"step_{step:06d}.safetensors", state, step)
            time.sleep(pause)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
         float(sys.argv[5]) if len(sys.argv) > 5 else 0.5)
