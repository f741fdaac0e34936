"""The benchmark's Hugging Face Trainer runs (``sample_runs/make_hf_run.py``) are what their docstring says.

The selection benchmark judges the recommender on them with the run's ``evaluate.py``; a checkpoint
must score there what the Trainer logged as its ``eval_loss`` (up to the Trainer's own token count,
below), or the evaluator column would judge something other than what the logs show. A few steps
of a tiny model of each family are enough.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from analysis.run import open_run
from analysis.signals import assess_run
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hf_run_maker")]

STEPS, EVERY = 24, 8


def _make(root: Path, *flags: str) -> Path:
    out = root / "run"
    done = subprocess.run([sys.executable, str(REPO / "sample_runs" / "make_hf_run.py"), "--out", str(out),
                           "--steps", str(STEPS), "--ckpt-every", str(EVERY), "--log-every", "4", "--warmup", "4",
                           "--block-size", str(BLOCK), "--n-embd", "16", "--n-head", "2", "--batch-size", "8", *flags],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _evaluator(run: Path):
    spec = importlib.util.spec_from_file_location(f"hf_run_eval_{abs(hash(str(run)))}", run / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BLOCK = 32


# For GPT-2 the Trainer of transformers 5 divides the loss summed over the BLOCK - 1 predicted tokens
# of each sequence by BLOCK (its model has no loss_type, so it counts every label); Llama's is the mean.
@pytest.mark.parametrize(("model", "schedule", "head_saved", "logged_share"),
                         [("gpt2", "linear", False, (BLOCK - 1) / BLOCK), ("llama", "warmup_stable_decay", True, 1.0)])
def test_the_evaluator_scores_each_checkpoint_at_its_logged_eval_loss(tmp_path: Path, model: str, schedule: str,
                                                                      head_saved: bool, logged_share: float) -> None:
    run = _make(tmp_path, "--model", model, "--schedule", schedule, "--grad-accum", "2")
    made = json.loads((run / "config.json").read_text())
    assert made["events"] == [] and made["hyper"]["schedule"] == schedule and made["train_seconds"] > 0
    history = json.loads((run / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    logged = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert sorted(logged) == [8, 16, 24]
    evaluator = _evaluator(run)
    for step, eval_loss in logged.items():
        weights = load_file(str(run / f"checkpoint-{step}" / "model.safetensors"))
        assert ("lm_head.weight" in weights) is head_saved   # GPT-2 ties its head to the embedding
        assert evaluator.evaluate(weights) * logged_share == pytest.approx(eval_loss, abs=2e-6)
    # The test split is other text: a different score, still a next-byte loss; per sequence for benchmarks,
    # with the held-out file each sequence starts in.
    assert 0 < evaluator.evaluate_test(weights) < 6 and evaluator.evaluate_test(weights) != evaluator.evaluate(weights)
    losses, files = evaluator.test_window_losses(weights), evaluator.test_window_files()
    assert losses.shape == files.shape == (made["corpus"]["test_bytes"] // BLOCK,)
    assert losses.mean() * logged_share == pytest.approx(evaluator.evaluate_test(weights) * logged_share, abs=1e-6)
    assert (files[1:] >= files[:-1]).all() and files[0] == 0 and files[-1] >= 5
    # A benchmark's bigger split beside it (data/NAME.bin) is scored sequence by sequence the same way.
    (run / "data" / "other.bin").write_bytes((run / "data" / "test.bin").read_bytes()[:5 * BLOCK])
    np.testing.assert_allclose(evaluator.test_window_losses(weights, "other"), losses[:5], rtol=1e-5)
    assert evaluator.test_window_files("other").tolist() == files[:5].tolist()
    # CkptSelect reads the run as it reads any Trainer run: eval losses, the scheduler's LR, Adam's state.
    signals = assess_run(open_run(run))
    assert [(c.ref.step, c.val.source) for c in signals.checkpoints] == [(s, "logged") for s in (8, 16, 24)]
    assert signals.noise is not None and signals.noise.step == STEPS
    assert signals.checkpoints[-1].lr < signals.checkpoints[0].lr   # both schedules have decayed by the end


def test_a_run_with_files_in_its_folder_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, str(REPO / "sample_runs" / "make_hf_run.py"), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not empty" in done.stderr
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
