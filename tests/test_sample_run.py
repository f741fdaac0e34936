"""End to end on the real sample run: recommend, merge from the recipe, check the tensors.

The merged tensors are compared with a weighted average the test computes itself from
the files (float64), so a bug shared by merge and recommend cannot hide.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors read with the libraries themselves, not with CkptSelect's readers."""
    return torch.load(path, weights_only=True)["model"] if path.suffix == ".pt" else load_file(str(path))


def test_sample_run_is_discovered_whole(sample_run: Path) -> None:
    result = _cli("analyze", str(sample_run), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert len(doc["checkpoints"]) >= 20
    assert all(c["finite"] for c in doc["checkpoints"])
    # Weights-only safetensors, and a nanoGPT-style resume file (model + AdamW state) at the end.
    formats = [c["format"] for c in doc["checkpoints"]]
    assert formats == ["safetensors"] * (len(formats) - 1) + ["torch_pickle"]
    noise = doc["iterate_noise"]
    assert noise["step"] == doc["checkpoints"][-1]["step"] and noise["elements"] == 124_672
    assert 0.0 < noise["excess_nats"] < 0.5
    assert all(c["val_loss"] is not None for c in doc["checkpoints"])
    assert doc["logs"][0]["format"] == "jsonl" and doc["logs"][0]["skipped_lines"] == 0
    # The run's LR excursion is a real spike, and a checkpoint saved inside it is flagged.
    assert doc["spikes"] and any(c["spike_contaminated"] for c in doc["checkpoints"])
    assert doc["evaluator_hint"].endswith("evaluate.py:evaluate")


def test_recommend_then_merge_from_recipe(sample_run: Path, tmp_path: Path) -> None:
    recipe_path = tmp_path / "recipe.yaml"
    result = _cli("recommend", str(sample_run), "--json", "-o", str(recipe_path))
    assert result.returncode == 0, result.stderr
    rec = json.loads(result.stdout)
    contaminated = {e["step"] for e in rec["excluded"] if "spike" in e["reason"]}
    taken = [c["step"] for c in rec["checkpoints"]]
    assert contaminated and not contaminated & set(taken) and len(taken) >= 2
    recipe = yaml.safe_load(recipe_path.read_text())
    assert [c["step"] for c in recipe["checkpoints"]] == taken

    out = tmp_path / "merged"
    result = _cli("merge", str(recipe_path), "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    merged = load_file(str(out / "model.safetensors"))
    inputs = [_weights(Path(c["path"])) for c in rec["checkpoints"]]
    weights = [c["weight"] for c in rec["checkpoints"]]
    assert sum(weights) == pytest.approx(1.0)
    for name, tensor in merged.items():
        if not tensor.is_floating_point():
            assert torch.equal(tensor, inputs[-1][name])
            continue
        expected = sum(w * state[name].double() for w, state in zip(weights, inputs))
        torch.testing.assert_close(tensor.double(), expected.to(tensor.dtype).double(), rtol=1e-5, atol=1e-6)


def test_evaluator_recommendation_beats_the_last_checkpoint(sample_run: Path) -> None:
    result = _cli("recommend", str(sample_run), "--eval", f"{sample_run / 'evaluate.py'}:evaluate",
                  "--max-evals", "8", "--json")
    assert result.returncode == 0, result.stderr
    rec = json.loads(result.stdout)
    assert 1 <= rec["evaluations"] <= 8
    assert rec["score"] <= rec["last_score"]
    assert len(rec["checkpoints"]) > 1 and rec["score"] < rec["last_score"] - 0.005


def test_the_runs_evaluator_gives_per_window_test_losses_grouped_by_source_file(sample_run: Path) -> None:
    """What benchmarks/capture_uncertainty.py resamples: the windows evaluate_test averages, and their files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_run_windows", sample_run / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weights = load_file(str(sorted((sample_run / "checkpoints").glob("*.safetensors"))[-1]))
    losses, files = module.test_window_losses(weights), module.test_window_files()
    corpus = json.loads((sample_run / "config.json").read_text())["corpus"]
    assert losses.shape == files.shape == ((corpus["test_bytes"] - 1) // 128,)
    assert losses.mean() == pytest.approx(module.evaluate_test(weights), abs=1e-6)
    # Windows run through the split in order, file after file; a file shorter than a window may start none.
    data = (sample_run / "data" / "test.bin").read_bytes()
    lengths = [len(text) + 1 for text in data.split(b"\0")][:len(corpus["test_files"])]
    assert (files[1:] >= files[:-1]).all() and files[0] == 0 and files[-1] == len(corpus["test_files"]) - 1
    assert set(files.tolist()) >= {i for i, n in enumerate(lengths) if n >= 2 * 128}


def test_the_runs_evaluator_scores_another_split_of_its_data_folder_window_by_window(sample_run: Path,
                                                                                     tmp_path: Path) -> None:
    """A benchmark's bigger held-out split (``data/NAME.bin``) is scored as the test split is: here the
    first 40 windows of the test split, saved as a split of their own, get the very losses and files."""
    import importlib.util
    import shutil

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    for name in ("evaluate.py", "model.py", "config.json", "data/test.bin"):
        shutil.copy(sample_run / name, run / name)
    head = (run / "data" / "test.bin").read_bytes()[:40 * 128 + 1]
    (run / "data" / "other.bin").write_bytes(head)
    spec = importlib.util.spec_from_file_location("sample_run_windows_split", run / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weights = load_file(str(sorted((sample_run / "checkpoints").glob("*.safetensors"))[-1]))
    losses, files = module.test_window_losses(weights, "other"), module.test_window_files("other")
    assert losses.shape == files.shape == (40,)
    torch.testing.assert_close(torch.from_numpy(losses), torch.from_numpy(module.test_window_losses(weights)[:40]),
                               rtol=1e-5, atol=1e-6)
    assert files.tolist() == module.test_window_files()[:40].tolist()
    assert files[-1] == head.count(b"\0")

