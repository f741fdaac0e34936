"""Issue 22: the heavy jobs on a real local Ray cluster give what the local run gives, and survive faults.

One cluster per session (``ray_cluster`` in conftest.py); every test here is in xdist group "ray", so one
xdist worker holds it. Inputs are real safetensors files; outputs are compared bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.cli import main
from analysis.executors import make_executor
from analysis.merge import merge_checkpoints
from analysis.merge.distributed import HOLD_ENV
from analysis.run import checkpoint_ref, open_run
from analysis.signals import sketch as sketch_module
from analysis.signals.sketch import sketch_checkpoint, sketch_run
from conftest import REPO, write_tiny_run

pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.usefixtures("ray_cluster")]


def make_inputs(folder: Path, count: int = 4) -> list[Path]:
    """``count`` checkpoints of a small Llama-like layout: bf16 and fp32 tensors and an integer buffer."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        state = {f"model.layers.{j}.mlp.up_proj.weight": torch.randn(96, 640, generator=gen).to(torch.bfloat16)
                 for j in range(4)}
        state["model.embed_tokens.weight"] = torch.randn(500, 96, generator=gen).to(torch.bfloat16)
        state["model.norm.weight"] = torch.randn(96, generator=gen)
        state["step"] = torch.tensor([100 * (i + 1)], dtype=torch.int64)
        paths.append(folder / f"step_{100 * (i + 1)}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def merged_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merge's output folder (one file or shards), as raw bytes to compare bit for bit."""
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update({k: v.contiguous().view(torch.uint8) for k, v in load_file(str(path)).items()})
    return tensors


def assert_bit_identical(a: Path, b: Path) -> None:
    left, right = merged_tensors(a), merged_tensors(b)
    assert sorted(left) == sorted(right)
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_issue22_a_ray_merge_is_bit_identical_to_the_local_merge(tmp_path: Path, ray_cluster: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    inputs = [str(p) for p in make_inputs(tmp_path / "in")]
    weights = ["--weights", "0.1", "--weights", "0.2", "--weights", "0.3", "--weights", "0.4"]
    assert main(["merge", "--checkpoints", *inputs, *weights, "-o", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    assert main(["merge", "--checkpoints", *inputs, *weights, "-o", str(tmp_path / "ray"), "--json",
                 "--executor", "ray", "--ray-address", ray_cluster]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sharded"] and doc["model_file"].endswith("model.safetensors.index.json") and doc["tensors"] == 7
    assert_bit_identical(tmp_path / "local", tmp_path / "ray")
    index = json.loads((tmp_path / "ray" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and len(index["weight_map"]) == 7   # one shard per CPU
    assert (tmp_path / "ray" / "recipe.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "local", "ray"]   # nothing hidden left behind


def _wait_for(path: Path, seconds: float = 30) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.is_file() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def test_issue22_a_worker_killed_mid_merge_is_retried_and_the_output_is_complete(tmp_path: Path,
                                                                                monkeypatch) -> None:
    paths = make_inputs(tmp_path / "in")
    refs = [checkpoint_ref(p, step=100 * (i + 1)) for i, p in enumerate(paths)]
    merge_checkpoints(refs, [1, 1, 1, 1], tmp_path / "local")
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv(HOLD_ENV, str(hold))
    done: dict[str, object] = {}
    thread = threading.Thread(target=lambda: done.setdefault("result", merge_checkpoints(
        refs, [1, 1, 1, 1], tmp_path / "ray", executor=make_executor("ray"))))
    thread.start()
    pid = int(_wait_for(hold / "held", 60))
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".ray.partial-")]
    assert len(partial) == 1 and not (partial[0] / "model.safetensors.index.json").exists()
    os.kill(pid, signal.SIGKILL)   # the worker dies mid-shard; Ray runs its task again on another worker
    thread.join(timeout=60)
    assert not thread.is_alive() and "result" in done
    assert_bit_identical(tmp_path / "local", tmp_path / "ray")
    index = json.loads((tmp_path / "ray" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in (tmp_path / "ray").glob("model-*.safetensors")}
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")]   # no part file of the dead unit


def test_issue22_a_driver_killed_mid_merge_leaves_nothing_finished_looking(tmp_path: Path, ray_cluster: str) -> None:
    inputs = [str(p) for p in make_inputs(tmp_path / "in", 3)]
    hold = tmp_path / "hold"
    hold.mkdir()
    env = dict(os.environ, **{HOLD_ENV: str(hold), "PYTHONPATH": str(REPO)})
    driver = subprocess.Popen([sys.executable, "-m", "analysis", "merge", "--checkpoints", *inputs, "-o",
                               str(tmp_path / "out"), "--executor", "ray", "--ray-address", ray_cluster],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        worker = int(_wait_for(hold / "held", 60))
    finally:
        driver.kill()   # SIGKILL: no cleanup of its own runs
        driver.wait(timeout=30)
    try:
        assert not (tmp_path / "out").exists()
        for folder in (p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")):
            assert not {"model.safetensors.index.json", "recipe.yaml"} & {p.name for p in folder.iterdir()}
        assert not list(tmp_path.rglob("model.safetensors.index.json")) and not list(tmp_path.rglob("recipe.yaml"))
        # The next merge to that name removes what the killed one left, and succeeds.
        result = merge_checkpoints([checkpoint_ref(Path(p), step=i) for i, p in enumerate(inputs)], [1, 1, 1],
                                   tmp_path / "out")
        assert len(result.stale.paths) == 1 and result.model_file.is_file()
    finally:
        _end(worker)


def _end(pid: int) -> None:
    """Ray ends a dead driver's tasks; if the held worker still runs after 10 s, end it (it holds a CPU)."""
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def _sketch_run(root: Path) -> Path:
    """A run whose tensors are larger than the sketch (so CountSketch, not an exact copy, is compared)."""
    run = write_tiny_run(root, [50, 100, 150, 200])
    for index, path in enumerate(sorted((run / "ckpt").glob("*.safetensors"))):
        gen = torch.Generator().manual_seed(index)
        state = {f"h.{j}.w": torch.randn(64, 100 + j, generator=gen) for j in range(3)}
        state["h.0.b"] = torch.randn(7, generator=gen)
        save_file(state, str(path), metadata={"step": path.stem.split("_")[1].lstrip("0")})
    return run


def test_issue22_ray_sketches_equal_the_local_ones_exactly(tmp_path: Path, monkeypatch) -> None:
    run = open_run(_sketch_run(tmp_path / "run"))
    monkeypatch.setenv("CKPT_SELECT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sketch_module, "GROUP_BYTES", 30_000)   # several units per checkpoint
    units = sketch_module.plan_sketch_units(0, run.checkpoints[0])
    assert [len(u.names) for u in units] == [2, 1, 1]
    remote = sketch_run(list(run.checkpoints), make_executor("ray"))
    for ref, got in zip(run.checkpoints, remote):
        want = sketch_checkpoint(ref, use_cache=False)
        assert list(got.weights) == list(want.weights) and list(got.stats) == list(want.stats)   # file order
        cached = sketch_checkpoint(ref)   # and the cache holds the same
        assert all(torch.equal(cached.weights[n], want.weights[n]) for n in want.weights) and cached.stats == want.stats
        assert all(torch.equal(got.weights[n], want.weights[n]) for n in want.weights)
        assert got.stats == want.stats and not got.exact and got.n_tensors == want.n_tensors == 4
        assert got.bytes_by_dtype == want.bytes_by_dtype


def test_issue22_analyze_on_ray_prints_what_the_local_analysis_prints(tmp_path: Path, monkeypatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    run = _sketch_run(tmp_path / "run")
    outputs = []
    for name, extra in (("local", []), ("ray", ["--executor", "ray"])):
        monkeypatch.setenv("CKPT_SELECT_CACHE_DIR", str(tmp_path / f"cache-{name}"))
        assert main(["analyze", str(run), "--json", *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    assert len(list((tmp_path / "cache-ray").glob("*.safetensors"))) == 4   # the cluster's sketches were cached


EVALUATOR = '''
import torch

def evaluate(state_dict):
    """Distance of the average from a fixed point: a loss that prefers some windows over others."""
    return float(sum(((v.double() - 0.3) ** 2).sum() for v in state_dict.values() if v.is_floating_point()))
'''


def test_issue22_eval_scores_on_ray_equal_the_local_ones(tmp_path: Path, monkeypatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    run = write_tiny_run(tmp_path / "run", list(range(50, 450, 50)))
    (tmp_path / "ev.py").write_text(EVALUATOR)
    docs = []
    for name, extra in (("local", []), ("ray", ["--executor", "ray", "--eval-gpus", "0"])):
        monkeypatch.setenv("CKPT_SELECT_SCORES_DIR", str(tmp_path / f"scores-{name}"))
        assert main(["recommend", str(run), "--eval", f"{tmp_path / 'ev.py'}:evaluate", "--eval-cache", "--json",
                     "--max-evals", "6", *extra]) == 0
        docs.append(json.loads(capsys.readouterr().out))
    for key in ("method", "checkpoints", "decisions", "score", "last_score", "evaluations", "evaluations_cached"):
        assert docs[0][key] == docs[1][key], key
    assert docs[1]["evaluations"] == 6
    stores = [json.loads(next((tmp_path / f"scores-{n}").glob("*.json")).read_text())["scores"] for n in ("local", "ray")]
    assert len(stores[1]) >= 6 and all(stores[1][k] == v for k, v in stores[0].items())


def test_issue22_sketch_units_read_checkpoints_from_s3_on_the_workers(tmp_path: Path, s3_server, s3_bucket,
                                                                     monkeypatch) -> None:
    """The units take URLs: workers open the bucket with the driver's storage options (the endpoint)."""
    from conftest import upload_tree

    from analysis.executors import LocalExecutor

    run = open_run(_sketch_run(tmp_path / "run"))
    url = upload_tree(tmp_path / "run" / "ckpt", s3_server.endpoint, s3_bucket, "ckpt")
    monkeypatch.setattr(sketch_module, "GROUP_BYTES", 30_000)
    units = [unit for i, ref in enumerate(run.checkpoints) for unit in sketch_module.plan_sketch_units(i, ref)]
    remote_units = [sketch_module.SketchUnit(u.checkpoint, f"{url}/{Path(u.path).name}", u.layout, u.names,
                                             u.buckets, u.seed, u.moments, u.threads) for u in units]
    s3_server.counts.reset()
    remote = {(p.checkpoint, tuple(p.sketches)): p for p in make_executor("ray").map(sketch_module.sketch_unit,
                                                                                     remote_units)}
    assert s3_server.counts.gets <= 2 * len(units) + sum(len(u.names) for u in units)   # headers + one range a tensor
    for part in LocalExecutor().map(sketch_module.sketch_unit, units):
        got = remote[(part.checkpoint, tuple(part.sketches))]
        assert all(torch.equal(got.sketches[n], part.sketches[n]) for n in part.sketches) and got.stats == part.stats
        assert got.bytes_read == part.bytes_read


def test_issue22_an_error_in_a_unit_comes_back_as_the_local_one_line(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run = write_tiny_run(tmp_path / "run", [50, 100, 150, 200])
    (tmp_path / "bad.py").write_text("def evaluate(sd):\n    raise ValueError('no validation data here')\n")
    assert main(["recommend", str(run), "--eval", f"{tmp_path / 'bad.py'}:evaluate", "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "evaluator bad.py:evaluate failed: ValueError: no validation data here" in err


def test_issue22_a_ray_merge_from_s3_into_s3_is_bit_identical_and_commits_last(tmp_path: Path, ray_cluster: str,
                                                                             s3_server, s3_bucket,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """Inputs in a bucket, output to a bucket: each unit reads its ranges and uploads its own shard from the worker
    (workers share no folder with the driver); the driver writes the index and the recipe last."""
    import boto3

    from conftest import upload_tree

    make_inputs(tmp_path / "in")
    url = upload_tree(tmp_path / "in", s3_server.endpoint, s3_bucket, "in")
    weights = ["--weights", "0.1", "--weights", "0.2", "--weights", "0.3", "--weights", "0.4"]
    inputs = [str(p) for p in sorted((tmp_path / "in").glob("*.safetensors"), key=lambda p: int(p.stem[5:]))]
    assert main(["merge", "--checkpoints", *inputs, *weights, "-o", str(tmp_path / "local")]) == 0
    s3_server.counts.reset()
    remote_inputs = [f"{url}/{Path(p).name}" for p in inputs]
    assert main(["merge", "--checkpoints", *remote_inputs, *weights, "-o", f"s3://{s3_bucket}/merged",
                 "--executor", "ray", "--ray-address", ray_cluster]) == 0
    capsys.readouterr()
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    (tmp_path / "down").mkdir()
    for key in [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="merged/")["Contents"]]:
        client.download_file(s3_bucket, key, str(tmp_path / "down" / Path(key).name))
    assert_bit_identical(tmp_path / "local", tmp_path / "down")
    assert (tmp_path / "down" / "recipe.yaml").is_file() and (tmp_path / "down" / "model.safetensors.index.json").is_file()
    assert s3_server.counts.requests.get("PUT", 0) >= 2 + 2     # two shards from the workers, then index and recipe


def test_issue22_the_app_sketches_on_the_cluster_given_by_ui(tmp_path: Path, ray_cluster: str, monkeypatch) -> None:
    """`ui --executor ray --ray-address A` hands the cluster to the server; the app's similarity pass runs there
    (the sketches land in the on-disk cache) and the Checkpoints page shows what the local pass shows."""
    from streamlit.testing.v1 import AppTest

    from analysis.signals import compare_checkpoints

    run = _sketch_run(tmp_path / "run")
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CKPT_SELECT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CKPT_SELECT_RUN", str(run))
    monkeypatch.setenv("CKPT_SELECT_EXECUTOR", f"ray@{ray_cluster}")
    monkeypatch.delenv("CKPT_SELECT_ROOT", raising=False)
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    import cached   # the app's module, as the script imported it in this process

    assert [path for path, _ in cached._sketched] == [str(run)]      # the pass went to the cluster's tasks
    at.switch_page("views/checkpoints.py").run()
    assert not at.exception, at.exception
    shown = at.dataframe[0].value.sort_values("step")
    monkeypatch.setenv("CKPT_SELECT_CACHE_DIR", str(tmp_path / "local-cache"))   # the local pass, from scratch
    local = compare_checkpoints(open_run(run).checkpoints)
    assert shown["step"].tolist() == [50, 100, 150, 200]
    assert shown["dist. to newest"].tolist() == [c.distance_to_newest for c in local.checkpoints]


def test_issue22_a_driver_killed_mid_merge_into_a_bucket_leaves_an_incomplete_prefix(tmp_path: Path, ray_cluster: str,
                                                                                    s3_server, s3_bucket) -> None:
    """`merge --executor ray -o s3://...` with its driver killed (kill -9) while one unit is held mid-shard and
    another has uploaded its shard: no index, no recipe in the bucket, the prefix reads as an incomplete merge
    output (and a run holding it lists it unreadable), and the next `merge --force` replaces it with the local
    merge's bits."""
    import boto3

    from analysis.remote import RemotePath, reset_stores
    from analysis.remote.outputs import incomplete_output
    from conftest import upload_tree

    inputs = [str(p) for p in make_inputs(tmp_path / "in", 3)]
    assert main(["merge", "--checkpoints", *inputs, "-o", str(tmp_path / "local")]) == 0
    url = upload_tree(tmp_path / "in", s3_server.endpoint, s3_bucket, "run")
    remote = [f"{url}/{Path(p).name}" for p in inputs]
    prefix = f"{url}/merged"
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")

    def listed() -> set[str]:
        found = client.list_objects_v2(Bucket=s3_bucket, Prefix="run/merged/").get("Contents", [])
        return {o["Key"].rsplit("/", 1)[-1] for o in found}

    hold = tmp_path / "hold"
    hold.mkdir()
    options = json.dumps({"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}})
    env = dict(os.environ, **{HOLD_ENV: str(hold), "PYTHONPATH": str(REPO)})
    driver = subprocess.Popen([sys.executable, "-m", "analysis", "--storage-options", options, "merge", "--checkpoints",
                               *remote, "-o", prefix, "--executor", "ray", "--ray-address", ray_cluster],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    worker = None
    try:
        worker = int(_wait_for(hold / "held", 60))
        deadline = time.time() + 60   # the other unit uploads its shard from its worker
        while time.time() < deadline and not any(n.startswith("model-") for n in listed()):
            time.sleep(0.05)
    finally:
        driver.kill()   # SIGKILL: no cleanup of its own runs
        driver.wait(timeout=30)
        if worker is not None:
            _end(worker)   # before anything else writes there: a held unit must not upload after the next merge
    left = listed()
    assert any(n.startswith("model-") for n in left), driver.stderr.read().decode()
    assert not {"model.safetensors.index.json", "recipe.yaml"} & left
    reset_stores()
    note = incomplete_output(RemotePath(prefix))
    assert note is not None and "no recipe.yaml, which a merge writes last" in note
    reset_stores()
    run = open_run(url)
    assert [u.path for u in run.unreadable] == [RemotePath(prefix)] and len(run.checkpoints) == 3
    reset_stores()
    assert main(["merge", "--checkpoints", *remote, "-o", prefix, "--force", "--executor", "ray",
                 "--ray-address", ray_cluster]) == 0
    assert {"model.safetensors.index.json", "recipe.yaml"} <= listed()
    (tmp_path / "down").mkdir()
    for name in listed():
        client.download_file(s3_bucket, f"run/merged/{name}", str(tmp_path / "down" / name))
    assert_bit_identical(tmp_path / "local", tmp_path / "down")
    index = json.loads((tmp_path / "down" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in listed() if n.startswith("model-")}
    reset_stores()
    assert incomplete_output(RemotePath(prefix)) is None


def test_issue22_a_ray_merge_through_503s_is_bit_identical_and_counts_the_workers_retries(
        tmp_path: Path, ray_cluster: str, s3_server, s3_bucket, capsys: pytest.CaptureFixture) -> None:
    """S3 -> S3 on Ray with 503 SlowDown injected at the server on input reads and on the workers' shard uploads:
    the merge completes, equals the local merge bit for bit, and --json's io counts every refused request once,
    the workers' retries included (they are added to the driver's counters)."""
    import boto3

    from conftest import upload_tree

    inputs = [str(p) for p in make_inputs(tmp_path / "in", 3)]
    assert main(["merge", "--checkpoints", *inputs, "-o", str(tmp_path / "local")]) == 0
    url = upload_tree(tmp_path / "in", s3_server.endpoint, s3_bucket, "in")
    capsys.readouterr()
    s3_server.counts.reset()
    faults = [s3_server.inject("GET", r"/in/step_200\.safetensors$", "503", times=3),
              s3_server.inject("PUT", r"/merged/model-00001-of-\d+\.safetensors$", "503", times=1),
              s3_server.inject("PUT", r"/merged/model-00002-of-\d+\.safetensors$", "503", times=1)]
    assert main(["merge", "--checkpoints", *[f"{url}/{Path(p).name}" for p in inputs], "-o",
                 f"s3://{s3_bucket}/merged", "--executor", "ray", "--ray-address", ray_cluster, "--json"]) == 0
    io = json.loads(capsys.readouterr().out)["io"]["s3"]
    assert [f.hits for f in faults] == [3, 1, 1]
    assert io["retries"] == 5
    # the workers' ranged reads are in the driver's count too (the driver alone reads only the headers)
    assert io["requests"] >= s3_server.counts.ranged_gets - faults[0].hits
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    (tmp_path / "down").mkdir()
    for key in [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="merged/")["Contents"]]:
        client.download_file(s3_bucket, key, str(tmp_path / "down" / Path(key).name))
    assert_bit_identical(tmp_path / "local", tmp_path / "down")


def test_issue22_analyze_on_ray_through_503s_counts_the_workers_retries(tmp_path: Path, ray_cluster: str, s3_server,
                                                                        s3_bucket, capsys: pytest.CaptureFixture) -> None:
    """The sketch units read a bucket run on the workers through 503s: --json's io counts each refused request
    once (workers' retries included) and the similarity equals the fault-free analysis of the same objects."""
    from conftest import upload_tree

    root = _sketch_run(tmp_path / "run")
    clean = upload_tree(root, s3_server.endpoint, s3_bucket, "clean")
    faulty = upload_tree(root, s3_server.endpoint, s3_bucket, "faulty")
    assert main(["analyze", clean, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    # one checkpoint's GETs after the driver's header read: the reads of its units on the workers
    fault = s3_server.inject("GET", r"/faulty/ckpt/step_000100\.safetensors$", "503", times=3, after=1)
    assert main(["analyze", faulty, "--json", "--executor", "ray", "--ray-address", ray_cluster]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert fault.hits == 3 and doc["io"]["s3"]["retries"] == 3
    assert json.dumps(doc["similarity"], sort_keys=True) == json.dumps(expected["similarity"], sort_keys=True)


def test_issue22_sha256_on_ray_hashes_bucket_inputs_on_the_workers(tmp_path: Path, ray_cluster: str, s3_server,
                                                                   s3_bucket, capsys: pytest.CaptureFixture) -> None:
    """`merge --sha256 --executor ray` from a bucket: one hash unit per input file, on the workers, records each
    object's `sha256sum`; `merge RECIPE --verify full --executor ray` then checks them there and merges."""
    import hashlib

    import yaml

    from conftest import upload_tree

    paths = make_inputs(tmp_path / "in", 3)
    url = upload_tree(tmp_path / "in", s3_server.endpoint, s3_bucket, "in")
    remote = [f"{url}/{p.name}" for p in paths]
    ray = ["--executor", "ray", "--ray-address", ray_cluster]
    assert main(["merge", "--checkpoints", *remote, "--sha256", "-o", str(tmp_path / "out"), *ray]) == 0
    recipe = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert [c["sha256"] for c in recipe["checkpoints"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert [c["path"] for c in recipe["checkpoints"]] == remote
    capsys.readouterr()
    s3_server.counts.reset()
    assert main(["merge", str(tmp_path / "out" / "recipe.yaml"), "--verify", "full", "-o", str(tmp_path / "again"),
                 "--json", *ray]) == 0
    total = sum(p.stat().st_size for p in paths)
    io = json.loads(capsys.readouterr().out)["io"]["s3"]    # the workers' reads, added to the driver's
    assert io["bytes_read"] == s3_server.counts.get_bytes               # every worker's read is counted
    assert 1.95 * total <= io["bytes_read"] <= 2.05 * total   # once by the hash units, once by the merge's units
    assert_bit_identical(tmp_path / "out", tmp_path / "again")


def test_issue22_the_app_searches_with_the_evaluator_on_the_cluster(tmp_path: Path, ray_cluster: str,
                                                                     monkeypatch) -> None:
    """`ui --executor ray`: the Merge page's evaluator search runs its evaluations as tasks on the cluster (each
    evaluation records the pid that ran it: none is the server's) and finds what the local search finds."""
    from streamlit.testing.v1 import AppTest

    from analysis.evaluate import load_evaluator
    from analysis.selection import RecommendConfig, recommend
    from analysis.signals import assess_run

    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)), spike_steps=(298,))
    pids = tmp_path / "pids"
    pids.mkdir()
    evaluator = tmp_path / "ev.py"   # best: the average whose bias is nearest the tiny run's at step 575
    evaluator.write_text("import os, uuid\nfrom pathlib import Path\n\n\ndef evaluate(state):\n"
                         f"    (Path({str(pids)!r}) / f'{{os.getpid()}}-{{uuid.uuid4().hex}}').touch()\n"
                         "    return abs(float(state['layer.bias'].float().mean()) - 5.75)\n")
    spec = f"{evaluator}:evaluate"
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CKPT_SELECT_CACHE_DIR", str(tmp_path / "cache"))
    expected = recommend(assess_run(open_run(run)), RecommendConfig(max_evals=9), load_evaluator(spec))
    local_pids = {p.name.split("-")[0] for p in pids.iterdir()}
    assert local_pids == {str(os.getpid())}
    for p in pids.iterdir():
        p.unlink()

    monkeypatch.setenv("CKPT_SELECT_RUN", str(run))
    monkeypatch.setenv("CKPT_SELECT_EXECUTOR", f"ray@{ray_cluster}")
    monkeypatch.setenv("CKPT_SELECT_EVAL_GPUS", "0")
    monkeypatch.delenv("CKPT_SELECT_ROOT", raising=False)
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=120)
    at.run()
    at.switch_page("views/merge.py").run()
    at.text_input(key="eval_spec").set_value(spec).run()
    at.number_input(key="search_budget").set_value(9).run()
    at.button(key="search_button").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert f"The recommendation on every page is now this search's: {expected.summary}" in [c.value for c in at.caption]
    ran_in = {p.name.split("-")[0] for p in pids.iterdir()}
    assert ran_in and str(os.getpid()) not in ran_in     # every evaluation ran in a Ray worker
