"""Run discovery: checkpoints and logs found, steps read, merges set aside, bad input named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from analysis.errors import CheckpointReadError, NotACheckpoint, RunNotFound
from analysis.run import checkpoint_ref, folder_stamp, open_run
from conftest import write_tiny_run


def test_open_run_finds_checkpoints_and_log(tiny_run: Path) -> None:
    run = open_run(tiny_run)
    assert [c.step for c in run.checkpoints] == list(range(50, 650, 50))
    assert all(c.layout == "safetensors" and c.step_source == "metadata" for c in run.checkpoints)
    assert [t.format for t in run.logs] == ["jsonl"]
    assert set(run.metrics["metric"]) == {"train_loss", "val_loss", "lr", "grad_norm"}
    assert len(run.metric("train_loss")) == 600
    assert run.checkpoints[0].size_bytes == (tiny_run / "ckpt" / "step_000050.safetensors").stat().st_size


def test_step_from_file_name_when_metadata_has_none(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "model_iter_1200.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "model_iter_300.safetensors"))
    run = open_run(tmp_path)
    assert [(c.step, c.step_source) for c in run.checkpoints] == [(300, "name"), (1200, "name")]


def test_unnumbered_checkpoint_goes_last_with_a_note(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "step_10.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "final.safetensors"))
    run = open_run(tmp_path)
    assert [(c.path.name, c.step_source) for c in run.checkpoints] == [("step_10.safetensors", "name"),
                                                                       ("final.safetensors", "order")]
    assert any("final.safetensors" in n for n in run.notes)


def test_merge_output_inside_run_is_not_a_checkpoint(tiny_run: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tiny_run / "merged.safetensors"),
              metadata={"ckpt_select_recipe_sha256": "abc", "step": "600"})
    run = open_run(tiny_run)
    assert len(run.checkpoints) == 12
    assert run.merged_outputs == (tiny_run / "merged.safetensors",)


def test_config_file_excludes_paths(tiny_run: Path) -> None:
    (tiny_run / "ckpt-select.yaml").write_text("name: renamed\nexclude: ['ckpt/step_00005*']\n")
    run = open_run(tiny_run)
    assert run.name == "renamed"
    assert 50 not in [c.step for c in run.checkpoints]


def test_fingerprint_changes_when_a_file_changes(tiny_run: Path) -> None:
    before, stamp = open_run(tiny_run).fingerprint, folder_stamp(tiny_run)
    with (tiny_run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 601, "train_loss": 1.0}) + "\n")
    assert open_run(tiny_run).fingerprint != before
    assert folder_stamp(tiny_run) != stamp


def test_missing_and_empty_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(RunNotFound, match="no such folder"):
        open_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFound, match="found no checkpoints and no training logs"):
        open_run(tmp_path / "empty")


def test_truncated_checkpoint_is_named(tmp_path: Path) -> None:
    # Issue 19: the run opens without it, and lists it with the reason.
    run = write_tiny_run(tmp_path / "run", [10, 20])
    victim = run / "ckpt" / "step_000020.safetensors"
    victim.write_bytes(victim.read_bytes()[:-16])
    opened = open_run(run)
    assert [c.step for c in opened.checkpoints] == [10]
    [bad] = opened.unreadable
    assert (bad.path, bad.step, bad.kind, bad.being_written) == (victim, 20, "checkpoint", True)
    assert "truncated" in bad.reason


def test_a_saved_tensor_or_dataset_beside_the_checkpoints_is_passed_over_with_a_note(tmp_path: Path) -> None:
    # Users keep val_bytes.pt, vocab.pt and the like next to their checkpoints; a truncated or unsafe
    # checkpoint is listed as unreadable (above), but a file that holds no weights is simply not one.
    run = write_tiny_run(tmp_path / "run", [10, 20])
    torch.save(torch.arange(64), run / "val_bytes.pt")
    torch.save({"vocab": ["a", "b"], "size": 2}, run / "ckpt" / "vocab.pt")
    opened = open_run(run)
    assert [c.step for c in opened.checkpoints] == [10, 20]
    assert "val_bytes.pt: passed over, not a checkpoint: it holds a Tensor, not a state dict or a checkpoint dict" in opened.notes
    assert any(n.startswith("vocab.pt: passed over, not a checkpoint: it holds no state dict") for n in opened.notes)
    with pytest.raises(NotACheckpoint, match="val_bytes.pt: holds a Tensor"):
        checkpoint_ref(run / "val_bytes.pt")


def test_checkpoint_ref_reads_step_from_metadata(tiny_run: Path) -> None:
    ref = checkpoint_ref(tiny_run / "ckpt" / "step_000100.safetensors")
    assert ref.step == 100 and ref.step_source == "metadata"
    with pytest.raises(CheckpointReadError, match="no such file"):
        checkpoint_ref(tiny_run / "missing.safetensors")
