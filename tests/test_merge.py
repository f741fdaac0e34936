"""The streamed merge equals an independent average; the target appears whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from analysis.errors import CheckpointMismatch, InvalidArgument, MergeError
from analysis.merge import merge_checkpoints
from analysis.run import checkpoint_ref
from conftest import write_tiny_run


def _refs(run: Path, steps: list[int]):
    return [checkpoint_ref(run / "ckpt" / f"step_{s:06d}.safetensors") for s in steps]


def _reference_average(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Independent float64 weighted sum (the test's own arithmetic, not the merge's)."""
    states = [load_file(str(p)) for p in paths]
    return {k: sum(w * s[k].double() for s, w in zip(states, weights)) for k in states[0] if states[0][k].is_floating_point()}


def test_merge_equals_independent_weighted_average(tiny_run: Path, tmp_path: Path) -> None:
    steps, weights = [400, 500, 600], [0.2, 0.3, 0.5]
    refs = _refs(tiny_run, steps)
    result = merge_checkpoints(refs, weights, tmp_path / "out")
    merged = load_file(str(result.model_file))
    expected = _reference_average([r.path for r in refs], weights)
    for name, tensor in expected.items():
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name].double(), tensor, rtol=0, atol=1e-6)
    # Integer buffers are copied from the newest input, never averaged.
    assert merged["num_batches"].item() == 600
    assert result.steps == (400, 500, 600) and result.weights == pytest.approx((0.2, 0.3, 0.5))
    with safe_open(str(result.model_file), "pt") as f:
        meta = f.metadata()
    assert meta["merged_steps"] == "400,500,600" and "ckpt_select_recipe_sha256" in meta
    assert not list(tmp_path.glob(".out.partial-*"))  # no temp folder left behind


def test_bf16_inputs_accumulate_in_fp32_and_round_once(tmp_path: Path) -> None:
    run = write_tiny_run(tmp_path / "run", [10, 20, 30, 40], dtype=torch.bfloat16)
    refs = _refs(run, [10, 20, 30, 40])
    merged = load_file(str(merge_checkpoints(refs, [0.25] * 4, tmp_path / "out").model_file))
    expected = _reference_average([r.path for r in refs], [0.25] * 4)
    for name, tensor in expected.items():
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], tensor.float().to(torch.bfloat16))
    fp32 = load_file(str(merge_checkpoints(refs, [0.25] * 4, tmp_path / "out32", output_dtype="float32").model_file))
    assert fp32["layer.weight"].dtype == torch.float32


@settings(max_examples=15, deadline=None)
@given(weights=st.lists(st.floats(0.01, 10.0), min_size=3, max_size=3))
def test_convex_average_stays_within_inputs(tmp_path_factory, weights: list[float]) -> None:
    tmp = tmp_path_factory.mktemp("convex")
    run = write_tiny_run(tmp / "run", [1, 2, 3])
    refs = _refs(run, [1, 2, 3])
    merged = load_file(str(merge_checkpoints(refs, weights, tmp / "out").model_file))
    stacked = torch.stack([load_file(str(r.path))["layer.weight"] for r in refs])
    assert torch.all(merged["layer.weight"] >= stacked.min(0).values - 1e-6)
    assert torch.all(merged["layer.weight"] <= stacked.max(0).values + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_inputs_average_to_themselves(tmp_path: Path, dtype: torch.dtype) -> None:
    run = write_tiny_run(tmp_path / "run", [100], dtype=dtype)
    ref = _refs(run, [100])[0]
    merged = load_file(str(merge_checkpoints([ref, ref, ref], [1, 1, 1], tmp_path / "out").model_file))
    original = load_file(str(ref.path))
    for name, tensor in original.items():
        if dtype == torch.bfloat16 or not tensor.is_floating_point():
            assert torch.equal(merged[name], tensor)  # one rounding to bf16 absorbs fp32 error
        else:
            torch.testing.assert_close(merged[name], tensor, rtol=2e-7, atol=0)


def test_refuses_existing_target_and_target_holding_an_input(tiny_run: Path, tmp_path: Path) -> None:
    refs = _refs(tiny_run, [500, 600])
    (tmp_path / "taken").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        merge_checkpoints(refs, [1, 1], tmp_path / "taken")
    with pytest.raises(MergeError, match="contains the input"):   # even with force (issue 6)
        merge_checkpoints(refs, [1, 1], tiny_run / "ckpt", force=True)


def test_mismatched_inputs_name_the_tensor_and_leave_nothing(tiny_run: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd.safetensors"
    save_file({"layer.weight": torch.zeros(8, 5), "layer.bias": torch.zeros(4), "num_batches": torch.tensor(1)}, str(odd))
    refs = _refs(tiny_run, [600]) + [checkpoint_ref(odd, 700)]
    with pytest.raises(CheckpointMismatch, match=r"layer.weight: \(8, 4\) vs \(8, 5\)"):
        merge_checkpoints(refs, [1, 1], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_bad_weights_are_rejected(tiny_run: Path, tmp_path: Path) -> None:
    refs = _refs(tiny_run, [500, 600])
    with pytest.raises(InvalidArgument, match="2 checkpoints"):
        merge_checkpoints(refs, [1.0], tmp_path / "out")
    with pytest.raises(InvalidArgument, match="non-negative"):
        merge_checkpoints(refs, [1.0, -0.5], tmp_path / "out")
