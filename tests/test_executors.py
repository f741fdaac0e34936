"""Issue 22: executors and the work units, without a cluster (the Ray ones are in test_ray_cluster.py).

The local executor runs the very units a cluster runs, so the distributed merge, the sketch pass and the
evaluator search are checked here against the in-process code paths with real files; what Ray adds
(another process, retries) is tested there.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.cli import main
from analysis.errors import CheckpointReadError, InvalidArgument
from analysis.evaluate import load_evaluator
from analysis.executors import RAY_MISSING, LocalExecutor, Resources, make_executor
from analysis.merge import merge_checkpoints
from analysis.merge.distributed import cost, group_plan
from analysis.merge.output import OutputPlan
from analysis.checkpoints import TensorInfo
from analysis.run import checkpoint_ref, open_run
from analysis.selection import RecommendConfig, recommend
from analysis.signals import assess_run
from analysis.signals.sketch import sketch_checkpoint, sketch_run
from conftest import REPO, write_tiny_run


class Spread(LocalExecutor):
    """The local executor planning for ``slots`` units at once, as a cluster of that many CPUs would."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.slots = slots


def _inputs(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        state = {f"layers.{j}.w": torch.randn(200, 300 + 10 * j, generator=gen).to(torch.bfloat16) for j in range(5)}
        state["emb"] = torch.randn(700, 64, generator=gen)
        state["count"] = torch.arange(5) + i
        paths.append(folder / f"step_{i + 1}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update({k: v.contiguous().view(torch.uint8) for k, v in load_file(str(path)).items()})
    return found


def test_local_executor_yields_every_result_and_reports_tasks_and_bytes() -> None:
    seen = []
    results = list(LocalExecutor().map(_Sized, [3, 1, 2], Resources(), lambda *a: seen.append(a)))
    assert [r.bytes_read for r in results] == [3, 1, 2]
    assert seen == [(1, 3, 3), (2, 3, 4), (3, 3, 6)]
    threaded = sorted(r.bytes_read for r in LocalExecutor(threads=3).map(_Sized, [5, 4, 6]))
    assert threaded == [4, 5, 6]


class _Sized:
    def __init__(self, size: int) -> None:
        self.bytes_read = size


def test_issue22_the_units_merge_is_bit_identical_to_the_local_merge(tmp_path: Path) -> None:
    refs = [checkpoint_ref(p, step=i + 1) for i, p in enumerate(_inputs(tmp_path / "in"))]
    progress = []
    merge_checkpoints(refs, [0.5, 0.3, 0.2], tmp_path / "local")
    result = merge_checkpoints(refs, [0.5, 0.3, 0.2], tmp_path / "units", executor=Spread(3),
                               progress=lambda fraction, message: progress.append(message))
    local, units = _tensors(tmp_path / "local"), _tensors(tmp_path / "units")
    assert sorted(local) == sorted(units) and all(torch.equal(local[k], units[k]) for k in local)
    assert result.sharded and result.n_tensors == 7 and progress[-1].startswith("tasks 3/3, ")
    index = json.loads((tmp_path / "units" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(local) and index["metadata"]["merged_steps"] == "1,2,3"
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_issue22_groups_are_balanced_by_bytes_largest_first() -> None:
    infos = [TensorInfo(f"t{i}", (n,), "bfloat16", 2 * n) for i, n in enumerate([900, 500, 400, 300, 300, 200, 100])]
    plan = OutputPlan(False, (("model.safetensors", tuple(infos)),), (), sum(i.size_bytes for i in infos))
    grouped = group_plan(plan, {i.name: ["bfloat16"] * 4 for i in infos}, 2)
    loads = [sum(cost(i, ["bfloat16"] * 4) for i in group) for _, group in grouped.shards]
    assert len(loads) == 2 and max(loads) / sum(loads) <= 0.55
    for _, group in grouped.shards:   # each shard keeps the output's order
        assert [int(i.name[1:]) for i in group] == sorted(int(i.name[1:]) for i in group)


def test_issue22_a_failing_unit_leaves_no_output_and_says_why(tmp_path: Path) -> None:
    paths = _inputs(tmp_path / "in")
    refs = [checkpoint_ref(p, step=i + 1) for i, p in enumerate(paths)]

    class Truncating(Spread):
        """An input cut short after the plan read its header, before the units read its tensors."""

        def map(self, fn, units, resources=Resources(), progress=None):
            with paths[0].open("r+b") as f:
                f.truncate(paths[0].stat().st_size - 1000)
            return super().map(fn, units, resources, progress)

    with pytest.raises(CheckpointReadError, match="step_1.safetensors"):
        merge_checkpoints(refs, [1, 1, 1], tmp_path / "out", executor=Truncating(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]   # no output, no hidden folder, no shard


def test_issue22_what_only_the_local_merge_does_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    refs = [checkpoint_ref(p, step=i + 1) for i, p in enumerate(_inputs(tmp_path / "in", 2))]
    with pytest.raises(InvalidArgument, match="--out-format torch"):
        merge_checkpoints(refs, [1, 1], tmp_path / "out", out_format="torch", executor=Spread(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_issue22_sha256_on_an_executor_records_what_the_local_read_pass_records(tmp_path: Path) -> None:
    """`merge --sha256 --executor ...`: hash units (one per file) give each input's `sha256sum` and quick hash,
    so the recipe beside a cluster merge equals the local merge's; `--verify full` there hashes on the executor
    and names a changed input."""
    import hashlib

    import yaml

    from analysis.errors import MergeError
    from analysis.merge import merge
    from analysis.recipe import build_recipe, load_recipe

    paths = _inputs(tmp_path / "in")
    refs = [checkpoint_ref(p, step=i + 1) for i, p in enumerate(paths)]
    manual = build_recipe("manual", refs, (1 / 6, 2 / 6, 3 / 6), hashes=False)   # as `merge --checkpoints` has it
    merge_checkpoints(refs, manual.weights, tmp_path / "local", recipe=manual, hash_inputs=True)
    merge_checkpoints(refs, manual.weights, tmp_path / "spread", recipe=manual, hash_inputs=True, executor=Spread(2))
    local, spread = (yaml.safe_load((tmp_path / name / "recipe.yaml").read_text()) for name in ("local", "spread"))
    assert [c["sha256"] for c in spread["checkpoints"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert spread["checkpoints"] == local["checkpoints"]   # sha256, quick hash and size alike
    assert _tensors(tmp_path / "local").keys() == _tensors(tmp_path / "spread").keys()

    recipe = load_recipe(tmp_path / "spread" / "recipe.yaml")
    merge(recipe, tmp_path / "again", verify="full", executor=Spread(2))   # every sha256 matches
    data = bytearray(paths[1].read_bytes())
    data[-1] ^= 0xFF                         # the same size, a changed last byte: only a full hash sees it
    paths[1].write_bytes(bytes(data))
    with pytest.raises(MergeError, match=r"step_2\.safetensors: sha256 differs"):
        merge(recipe, tmp_path / "changed", verify="full", executor=Spread(2))
    assert not (tmp_path / "changed").exists()


def test_issue22_sketch_units_give_the_sketches_of_the_local_pass(tmp_path: Path, monkeypatch) -> None:
    run = open_run(write_tiny_run(tmp_path / "run", [50, 100, 150]))
    monkeypatch.setenv("CKPT_SELECT_CACHE_DIR", str(tmp_path / "cache"))
    got = sketch_run(list(run.checkpoints), LocalExecutor())
    for ref, sketch in zip(run.checkpoints, got):
        want = sketch_checkpoint(ref, use_cache=False)
        assert all(torch.equal(sketch.weights[n], want.weights[n]) for n in want.weights) and sketch.stats == want.stats
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


EVALUATOR = "def evaluate(sd):\n    return float(sum(((v.double() - 0.2) ** 2).sum() for v in sd.values() if v.is_floating_point()))\n"


def test_issue22_an_evaluator_search_on_units_decides_as_the_local_one(tmp_path: Path) -> None:
    run = open_run(write_tiny_run(tmp_path / "run", list(range(50, 450, 50))))
    (tmp_path / "ev.py").write_text(EVALUATOR)
    signals = assess_run(run)
    config = RecommendConfig(max_evals=7)
    local = recommend(signals, config, load_evaluator(f"{tmp_path / 'ev.py'}:evaluate"))
    spread = load_evaluator(f"{tmp_path / 'ev.py'}:evaluate")
    spread.distribute(LocalExecutor(threads=2), Resources())
    units = recommend(signals, config, spread)
    assert (units.method, units.weights, units.score, units.evaluations) == (local.method, local.weights, local.score,
                                                                             local.evaluations)
    assert [c.step for c in units.checkpoints] == [c.step for c in local.checkpoints]


def test_issue22_executor_ray_without_ray_is_one_line_and_exit_2(tmp_path: Path, monkeypatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)   # as if Ray were not installed: `import ray` fails
    monkeypatch.delitem(sys.modules, "analysis.executors.ray_cluster", raising=False)
    with pytest.raises(InvalidArgument, match=r"pip install ckpt-select\[ray\]"):
        make_executor("ray")
    paths = [str(p) for p in _inputs(tmp_path / "in", 2)]
    assert main(["merge", "--checkpoints", *paths, "-o", str(tmp_path / "out"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and RAY_MISSING in err
    assert not (tmp_path / "out").exists()


def test_issue22_only_the_ray_executor_module_imports_ray() -> None:
    importers = []
    for path in sorted((REPO / "analysis").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.append(path.relative_to(REPO).as_posix())
    assert sorted(set(importers)) == ["analysis/executors/ray_cluster.py"]


def test_issue22_ui_hands_the_cluster_and_eval_gpus_to_the_server_only_with_executor_ray(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``ui`` replaces itself with the server; what it hands over is what the app's executor and evaluator read."""
    import os

    seen: list[dict] = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: seen.append(env))
    monkeypatch.setenv("CKPT_SELECT_EXECUTOR", "ray@inherited:1")   # inherited: must not count
    monkeypatch.setenv("CKPT_SELECT_EVAL_GPUS", "8")
    assert main(["ui", str(tmp_path)]) == 0
    assert main(["ui", str(tmp_path), "--executor", "ray", "--ray-address", "10.0.0.1:6379", "--eval-gpus", "0.5"]) == 0
    assert "CKPT_SELECT_EXECUTOR" not in seen[0] and "CKPT_SELECT_EVAL_GPUS" not in seen[0]
    assert seen[1]["CKPT_SELECT_EXECUTOR"] == "ray@10.0.0.1:6379" and seen[1]["CKPT_SELECT_EVAL_GPUS"] == "0.5"
    assert main(["ui", str(tmp_path), "--eval-gpus", "-1"]) == 2
