"""Sketch error against exact cosines, known update geometry, the on-disk cache, the trajectory."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analysis.run import open_run
from analysis.signals import compare_checkpoints, layer_of, sketch_checkpoint
from analysis.signals.sketch import cache_dir, sketch_tensor


def _write(root: Path, states: list[dict[str, torch.Tensor]]) -> Path:
    root.mkdir(parents=True)
    for index, state in enumerate(states):
        save_file(state, str(root / f"step_{(index + 1) * 10:04d}.safetensors"))
    return root


def test_small_tensors_are_exact_and_sketch_is_linear() -> None:
    x = torch.randn(100)
    assert torch.equal(sketch_tensor("t", x, 4096, 0), x.double())
    big_a, big_b = torch.randn(50_000), torch.randn(50_000)
    sa, sb = sketch_tensor("t", big_a, 512, 3), sketch_tensor("t", big_b, 512, 3)
    # Linear up to the float32 rounding of big_a - big_b itself.
    torch.testing.assert_close(sketch_tensor("t", big_a - big_b, 512, 3), sa - sb, rtol=0, atol=1e-5)


@pytest.mark.parametrize("true_cos", [0.0, 0.5, 0.9])
def test_sketched_cosine_is_within_the_documented_bound(true_cos: float) -> None:
    gen = torch.Generator().manual_seed(7)
    n, buckets = 200_000, 2048
    x = torch.randn(n, generator=gen)
    noise = torch.randn(n, generator=gen)
    y = true_cos * x + math.sqrt(1 - true_cos ** 2) * noise
    exact = float(torch.dot(x, y) / (x.norm() * y.norm()))
    bound = math.sqrt((1 + exact ** 2) / buckets)   # standard error of the sketched inner product
    errors = []
    for seed in range(12):
        sx, sy = sketch_tensor("w", x, buckets, seed), sketch_tensor("w", y, buckets, seed)
        errors.append(float(torch.dot(sx, sy) / (sx.norm() * sy.norm())) - exact)
    assert abs(float(np.mean(errors))) < 3 * bound / math.sqrt(len(errors))
    assert max(abs(e) for e in errors) < 4 * bound


def test_update_geometry_known_answers(tmp_path: Path) -> None:
    base, direction = torch.randn(64), torch.randn(64)
    drift = [{"w": base + i * direction} for i in range(5)]
    run = open_run(_write(tmp_path / "drift", drift))
    report = compare_checkpoints(run.checkpoints, use_cache=False)
    assert report.exact and report.error_bound == 0.0
    assert [round(c.update_cosine, 6) for c in report.checkpoints[2:]] == [1.0, 1.0, 1.0]
    assert report.checkpoints[1].update_norm == pytest.approx(float(direction.norm()), rel=1e-6)
    assert report.checkpoints[0].distance_to_newest == pytest.approx(4 * float(direction.norm()), rel=1e-6)
    assert report.distance_matrix[0, 4] == pytest.approx(4 * float(direction.norm()), rel=1e-6)
    assert abs(report.trajectory[:, 1]).max() < 1e-6  # a straight line has one principal direction
    zigzag = [{"w": base + (i % 2) * direction} for i in range(5)]
    report = compare_checkpoints(open_run(_write(tmp_path / "zigzag", zigzag)).checkpoints, use_cache=False)
    assert [round(c.update_cosine, 6) for c in report.checkpoints[2:]] == [-1.0, -1.0, -1.0]


def test_sketched_model_matches_exact_on_a_real_model_size(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    base = {f"h.{i}.mlp.weight": torch.randn(256, 256, generator=gen) for i in range(4)}
    states = []
    for step in range(4):
        states.append({k: v + 0.1 * step * torch.randn(v.shape, generator=gen) for k, v in base.items()})
    run = open_run(_write(tmp_path / "m", states))
    exact = compare_checkpoints(run.checkpoints, buckets=1 << 17, use_cache=False)
    sketched = compare_checkpoints(run.checkpoints, buckets=4096, use_cache=False)
    assert exact.exact and not sketched.exact
    for e, s in zip(exact.checkpoints[2:], sketched.checkpoints[2:]):
        assert abs(e.update_cosine - s.update_cosine) < 4 * sketched.error_bound
        assert s.update_norm == pytest.approx(e.update_norm, rel=0.1)
    assert set(exact.checkpoints[0].layer_distance_to_newest) == {"h.0", "h.1", "h.2", "h.3"}


def test_sketches_are_cached_by_file_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_SELECT_CACHE_DIR", str(tmp_path / "cache"))
    run = open_run(_write(tmp_path / "r", [{"w": torch.randn(10_000)} for _ in range(2)]))
    first = sketch_checkpoint(run.checkpoints[0], buckets=1024)
    assert len(list(cache_dir().glob("*.safetensors"))) == 1
    again = sketch_checkpoint(run.checkpoints[0], buckets=1024)
    assert torch.equal(first.weights["w"], again.weights["w"])
    save_file({"w": torch.randn(10_000)}, str(run.checkpoints[0].path))   # the file changes: a new key
    changed = sketch_checkpoint(open_run(tmp_path / "r").checkpoints[0], buckets=1024)
    assert not torch.equal(changed.weights["w"], first.weights["w"])


def test_layer_of() -> None:
    assert layer_of("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert layer_of("model.layers.11.mlp.up_proj.weight") == "model.layers.11"
    assert layer_of("lm_head.weight") == "lm_head"
