"""Recipe YAML round trip, hashes, validation messages, mergekit export."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from analysis.errors import MergeError, RecipeError
from analysis.merge import merge_recipe
from analysis.recipe import build_recipe, load_recipe, to_mergekit, write_recipe
from analysis.run import open_run


def _recipe(run_path: Path):
    run = open_run(run_path)
    refs = list(run.checkpoints[-3:])
    return build_recipe("sma", refs, (1 / 3, 1 / 3, 1 / 3), reasons={"600": "newest"}, source_run=run.path)


def test_round_trip_with_relative_paths_and_sha256(tiny_run: Path) -> None:
    recipe = _recipe(tiny_run)
    path = write_recipe(recipe, tiny_run / "recipe.yaml")
    doc = yaml.safe_load(path.read_text())
    assert doc["ckpt_select_recipe"] == 1 and doc["method"] == "sma"
    assert doc["checkpoints"][0]["path"] == "ckpt/step_000500.safetensors"
    first = tiny_run / "ckpt" / "step_000500.safetensors"
    assert doc["checkpoints"][0]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert doc["checkpoints"][0]["bytes"] == first.stat().st_size
    loaded = load_recipe(path)
    assert [e.path for e in loaded.checkpoints] == [e.path for e in recipe.checkpoints]
    assert loaded.weights == pytest.approx(recipe.weights) and loaded.reasons == {"600": "newest"}


def test_validation_collects_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ckpt_select_recipe: 1\nmethod: magic\noutput_dtype: int3\n"
                   "checkpoints:\n  - {path: a, step: 1, weight: 0.7}\n  - {path: b, step: 2}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    message = str(info.value)
    for part in ("bad.yaml", "method 'magic'", "output_dtype 'int3'", "checkpoints[1]", "weights sum to 0.7"):
        assert part in message
    other = tmp_path / "other.yaml"
    other.write_text("merge_method: linear\n")
    with pytest.raises(RecipeError, match="not a CkptSelect recipe"):
        load_recipe(other)


def test_changed_input_is_caught_before_merging(tiny_run: Path, tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(_recipe(tiny_run), tiny_run / "recipe.yaml"))
    victim = tiny_run / "ckpt" / "step_000550.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(MergeError, match="step_000550.safetensors: quick hash differs"):
        merge_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mergekit_export_is_a_linear_config(tiny_run: Path) -> None:
    doc = to_mergekit(_recipe(tiny_run), tiny_run)
    assert doc["merge_method"] == "linear" and doc["dtype"] == "float32"
    assert doc["parameters"] == {"normalize": True}
    assert [m["model"] for m in doc["models"]] == [f"ckpt/step_000{s}.safetensors" for s in (500, 550, 600)]
    assert sum(m["parameters"]["weight"] for m in doc["models"]) == pytest.approx(1.0)
