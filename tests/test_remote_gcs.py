"""Issue 22 for ``gs://``: runs read from and merges written to a real Google Cloud Storage JSON API server.

The server is gcp-storage-emulator on 127.0.0.1 (``gcs_server``, tests/gcs_server.py), reached by gcsfs
through ``--storage-options`` exactly as storage.googleapis.com would be (an ``endpoint_url`` and an
anonymous token). Runs are made by the real libraries (safetensors, transformers, torch DCP), uploaded
over plain HTTP (not our code), read back by URL and compared with the same run read from disk;
requests, ranges and bytes are counted at the server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from analysis.checkpoints import open_checkpoint
from analysis.cli import main
from analysis.errors import RemoteError
import analysis.remote.store as store_module
from analysis.remote import RemotePath, all_stats, reset_stores
from analysis.remote.outputs import incomplete_output
from analysis.run import open_run
from ckpt_factories import dcp_checkpoint, hf_checkpoint
from conftest import write_tiny_run
from gcs_server import upload_tree
from remote_checks import assert_same_model, safetensors_run, same_recommendation, same_run, same_tensors


def _creation_order(gcs_server, bucket: str, prefix: str) -> list[str]:
    """The object names under ``prefix/`` in the order GCS created them: by generation (its creation time in
    microseconds on GCS, in nanoseconds on the emulator), whatever the upload kind (media, multipart, resumable)."""
    listed = gcs_server.list_objects(bucket, prefix)
    return sorted(listed, key=lambda name: int(listed[name]["generation"]))


# --- reading runs --------------------------------------------------------------------------------------------

def test_issue22_gcs_hf_folders_and_dcp_by_url_equal_the_localsafetensors_run(tmp_path, gcs_server, gcs_bucket) -> None:
    """HF checkpoint-N folders (single and sharded safetensors) and a DCP folder read by gs:// URL equal the
    local run; a folder placeholder object (``name/``, as GCS's console makes) is no file of the run."""
    run = tmp_path / "hf"
    hf_checkpoint(run / "checkpoint-100", 100, seed=0)
    hf_checkpoint(run / "checkpoint-200", 200, seed=1, shard=True)
    (run / "train_log.csv").write_text("step,loss\n" + "".join(f"{s},{3 - s / 100:.3f}\n" for s in range(1, 201)))
    url = upload_tree(gcs_server, run, gcs_bucket, "runs/hf")
    gcs_server.put_object(gcs_bucket, "runs/hf/checkpoint-100/", b"")   # a console "folder"
    remote, local = open_run(url), open_run(run)
    same_run(local, remote)
    assert str(remote.checkpoints[0].path) == f"{url}/checkpoint-100"
    assert [r.layout for r in remote.checkpoints] == ["hf_folder", "hf_folder"]
    for a, b in zip(local.checkpoints, remote.checkpoints):
        same_tensors(a, b)
    saved = dcp_checkpoint(tmp_path / "dcp" / "step-40", step=40)
    dcp = open_run(upload_tree(gcs_server, tmp_path / "dcp", gcs_bucket, "dcp"))
    assert [(r.step, r.layout) for r in dcp.checkpoints] == [(40, "dcp")]
    with open_checkpoint(dcp.checkpoints[0].path) as handle:
        for name, tensor in saved.items():
            assert torch.equal(handle.read(name), tensor), name


def test_issue22_gcs_tensor_read_is_one_exact_ranged_get(tmp_path, gcs_server, gcs_bucket) -> None:
    """A single safetensors file: header in one request, each tensor one ranged GET of exactly its bytes,
    seen at the server (the emulator honours Range: 206 with the asked slice)."""
    state = {"a": torch.randn(300, 400), "b": torch.arange(1000, dtype=torch.int64)}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"step": "7"})
    gcs_server.put_object(gcs_bucket, "one/model.safetensors", (tmp_path / "model.safetensors").read_bytes())
    gcs_server.counts.reset()
    with open_checkpoint(f"gs://{gcs_bucket}/one/model.safetensors") as handle:
        handle.tensors()
        header = dict(gcs_server.counts.requests), gcs_server.counts.ranged_gets
        gcs_server.counts.reset()
        assert torch.equal(handle.read("a"), state["a"])
    assert header[0]["GET"] <= 2 and header[1] >= 1   # the listing (or a stat) and one ranged header read
    assert gcs_server.counts.requests == {"GET": 1} and gcs_server.counts.ranged_gets == 1
    assert gcs_server.counts.get_bytes == 300 * 400 * 4


def test_issue22_gcs_analyze_and_recommend_equal_the_localsafetensors_run(tmp_path, gcs_server, gcs_bucket, capsys) -> None:
    """`analyze --json` and `recommend --json` on gs://bucket/run: the same steps, checkpoints, similarities
    and recommendation as the local copy; io.gs counts one listing and no retry; the server sent at most
    1.05 x the run's bytes."""
    run = safetensors_run(tmp_path / "run")
    url = upload_tree(gcs_server, run, gcs_bucket, "analyze")
    assert main(["analyze", str(run), "--json"]) == 0
    local_doc = json.loads(capsys.readouterr().out)
    gcs_server.counts.reset()
    assert main(["analyze", url, "--json"]) == 0
    remote_doc = json.loads(capsys.readouterr().out)
    io = remote_doc.pop("io")["gs"]
    assert io["listings"] == 1 and io["retries"] == 0 and io["bytes_read"] <= gcs_server.counts.get_bytes
    assert gcs_server.counts.get_bytes <= 1.05 * sum(p.stat().st_size for p in run.iterdir()) + 20_000
    keys = ("step", "finite", "bytes", "val_loss", "spike_contaminated")
    assert [{k: c.get(k) for k in keys} for c in local_doc["checkpoints"]] == \
        [{k: c.get(k) for k in keys} for c in remote_doc["checkpoints"]]
    assert [c["step"] for c in remote_doc["checkpoints"]] == [100, 200, 300]
    assert json.dumps(local_doc.get("similarity"), sort_keys=True) == \
        json.dumps(remote_doc.get("similarity"), sort_keys=True)
    remote_rec = same_recommendation(main, capsys, str(run), url)
    # recommend -o a gs:// URL: the recipe is one object (pipe_file), naming the inputs by URL, no credentials
    assert main(["recommend", url, "-o", f"gs://{gcs_bucket}/recipes/rec.yaml"]) == 0
    body = gcs_server.get_object(gcs_bucket, "recipes/rec.yaml").decode()
    entries = remote_rec["recipe"]["checkpoints"]
    assert "ckpt_select_recipe" in body and all(e["path"] in body for e in entries) and "anon" not in body
    assert entries and all(e["path"].startswith(f"{url}/") and e["etag"] and e["bytes"] ==
                           (run / Path(e["path"]).name).stat().st_size for e in entries)


# --- merging -------------------------------------------------------------------------------------------------

def _merge_inputs(folder: Path) -> list[Path]:
    """Three checkpoints of ~6 MiB: a merged single file is above gcsfs's 5 MiB simple-upload limit, so the
    resumable upload (initiate, then chunks) is exercised too."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(3)
    paths = []
    for step in (100, 200, 300):
        state = {f"w{i}": torch.randn(256, 1024, generator=gen) for i in range(6)}
        state["position_ids"] = torch.arange(64, dtype=torch.int64)
        save_file(state, str(folder / f"step_{step}.safetensors"), metadata={"step": str(step)})
        paths.append(folder / f"step_{step}.safetensors")
    return paths


def _download(gcs_server, bucket: str, prefix: str, into: Path) -> Path:
    into.mkdir(parents=True)
    for name in gcs_server.list_objects(bucket, prefix):
        (into / name).write_bytes(gcs_server.get_object(bucket, f"{prefix}/{name}"))
    return into


def test_issue22_gcs_merge_to_local_and_to_gs_bit_identical_recipe_last(tmp_path, gcs_server, gcs_bucket,
                                                                         capsys) -> None:
    """gs:// inputs merged to disk and to gs:// (one ~6 MiB object, resumable upload; and 2 MB shards) are
    bit-identical to the local merge; the recipe is the last object uploaded and records each input's
    URL, ETag and size; incomplete_output calls the outputs complete."""
    paths = _merge_inputs(tmp_path / "run")
    url = upload_tree(gcs_server, tmp_path / "run", gcs_bucket, "run")
    assert main(["merge", "--checkpoints", *map(str, paths), "-o", str(tmp_path / "local")]) == 0
    assert main(["merge", "--checkpoints", f"{url}/step_*.safetensors", "-o", str(tmp_path / "from_gs")]) == 0
    assert_same_model(tmp_path / "local", tmp_path / "from_gs", same_files=False)
    recipe = yaml.safe_load((tmp_path / "from_gs" / "recipe.yaml").read_text())
    assert [c["path"] for c in recipe["checkpoints"]] == [f"{url}/step_{s}.safetensors" for s in (100, 200, 300)]
    listed = gcs_server.list_objects(gcs_bucket, "run")
    assert [(c["etag"], c["bytes"]) for c in recipe["checkpoints"]] == \
        [(listed[f"step_{s}.safetensors"]["etag"], int(listed[f"step_{s}.safetensors"]["size"])) for s in (100, 200, 300)]
    for target, shard in (("single", []), ("sharded", ["--out-shard-size", "2MB"])):
        gcs_server.counts.reset()
        assert main(["merge", "--checkpoints", f"{url}/step_*.safetensors", "-o", f"gs://{gcs_bucket}/{target}",
                     *shard]) == 0
        uploaded = _creation_order(gcs_server, gcs_bucket, target)
        assert uploaded[-1] == "recipe.yaml"
        assert_same_model(tmp_path / "local", _download(gcs_server, gcs_bucket, target, tmp_path / f"back-{target}"),
                          same_files=False)
        reset_stores()
        assert incomplete_output(RemotePath(f"gs://{gcs_bucket}/{target}")) is None
    shards = sorted(n for n in gcs_server.list_objects(gcs_bucket, "sharded") if n.startswith("model-"))
    assert len(shards) >= 3 and uploaded[:len(shards)] == shards and uploaded[len(shards)] == "model.safetensors.index.json"
    single = gcs_server.list_objects(gcs_bucket, "single")
    assert int(single["model.safetensors"]["size"]) > 5 * 2 ** 20   # went up as a resumable upload
    capsys.readouterr()
    # the output's recipe, read from its gs:// URL, merges again to the same bits (--verify quick: size + ETag)
    assert main(["merge", f"gs://{gcs_bucket}/sharded/recipe.yaml", "-o", str(tmp_path / "again")]) == 0
    assert_same_model(tmp_path / "local", tmp_path / "again", same_files=False)


def test_issue22_gcs_failed_merge_removes_its_objects_and_killed_output_is_incomplete(tmp_path, gcs_server,
                                                                                     gcs_bucket) -> None:
    """An input truncated mid-merge: RemoteError naming its URL and every uploaded shard deleted again. An
    output whose recipe (the commit marker) or one shard is missing, as a killed merge leaves it, is
    reported incomplete."""
    from analysis.merge import merge_checkpoints
    from analysis.run import checkpoint_ref

    gen = torch.Generator().manual_seed(1)
    (tmp_path / "big").mkdir()
    for step in (1, 2):   # 8 tensors of 2 MiB: the merge reads the later ones after shards went up
        save_file({f"w{i}": torch.randn(512, 1024, generator=gen) for i in range(8)},
                  tmp_path / "big" / f"s{step}.safetensors")
    big = upload_tree(gcs_server, tmp_path / "big", gcs_bucket, "big")
    refs = [checkpoint_ref(f"{big}/s{step}.safetensors") for step in (1, 2)]
    seen: list[str] = []

    def progress(fraction: float, message: str) -> None:
        if fraction > 0.4 and not seen:   # shards already uploaded: truncate the newest input
            seen.extend(gcs_server.list_objects(gcs_bucket, "out"))
            gcs_server.put_object(gcs_bucket, "big/s2.safetensors",
                                  (tmp_path / "big" / "s2.safetensors").read_bytes()[:3_000_000])

    with pytest.raises(RemoteError) as caught:
        merge_checkpoints(refs, [0.5, 0.5], f"gs://{gcs_bucket}/out", progress=progress, out_shard_size=2_000_000)
    assert caught.value.url == f"{big}/s2.safetensors" and "truncated object" in caught.value.reason
    assert any(name.startswith("model-") for name in seen) and gcs_server.list_objects(gcs_bucket, "out") == {}

    paths = _merge_inputs(tmp_path / "run")
    reset_stores()
    assert main(["merge", "--checkpoints", *map(str, paths), "-o", f"gs://{gcs_bucket}/killed",
                 "--out-shard-size", "2MB"]) == 0
    shard = sorted(n for n in gcs_server.list_objects(gcs_bucket, "killed") if n.startswith("model-"))[1]
    gcs_server.delete_object(gcs_bucket, f"killed/{shard}")
    reset_stores()
    note = incomplete_output(RemotePath(f"gs://{gcs_bucket}/killed"))
    assert note is not None and f"shard {shard}" in note
    gcs_server.delete_object(gcs_bucket, "killed/recipe.yaml")
    reset_stores()
    note = incomplete_output(RemotePath(f"gs://{gcs_bucket}/killed"))
    assert note is not None and "incomplete merge output (no recipe.yaml" in note


# --- errors, retries, caches -----------------------------------------------------------------------------------

def test_issue22_gcs_missing_object_prefix_and_bucket_are_one_line_exit_2(tmp_path, gcs_server, gcs_bucket,
                                                                          capsys) -> None:
    """A missing prefix, object or bucket: exit 2 and one line naming the URL."""
    paths = _merge_inputs(tmp_path / "run")
    url = upload_tree(gcs_server, tmp_path / "run", gcs_bucket, "run")
    cases = [["analyze", f"gs://{gcs_bucket}/no-such-run"], ["analyze", "gs://no-such-bucket-here/run"],
             ["logs", f"gs://{gcs_bucket}/none/metrics.jsonl"],
             ["merge", "--checkpoints", f"{url}/step_100.safetensors", f"{url}/missing.safetensors",
              "-o", str(tmp_path / "out")]]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        named = argv[1] if argv[0] != "merge" else f"{url}/missing.safetensors"
        assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and paths


def test_issue22_gcs_refused_request_is_exit_2_access_denied(tmp_path, gcs_server, gcs_bucket, capsys) -> None:
    """GCS's 403 (gcsfs raises "Forbidden: PATH"): not retried, exit 2, one line naming the URL."""
    run = write_tiny_run(tmp_path / "run", [50, 100])
    url = upload_tree(gcs_server, run, gcs_bucket, "denied")
    fault = gcs_server.inject("GET", r"/b/[^/]+/o\?", times=10, status=403)   # the listing
    assert main(["analyze", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and url in err and "access denied" in err, err
    assert fault.hits == 1   # one request: a refusal is never retried, by gcsfs or by us


def test_issue22_gcs_one_retrying_layer_counted(tmp_path, gcs_server, gcs_bucket, monkeypatch) -> None:
    """gcsfs's own retry loop is off: a 503 on a tensor read is retried once by our Store (io.retries == 1,
    two GETs at the server); a persistent 503 costs exactly MAX_ATTEMPTS requests, then a RemoteError."""
    monkeypatch.setattr(store_module, "BASE_DELAY_S", 0.0)
    monkeypatch.setattr(store_module, "MAX_ATTEMPTS", 3)
    state = {"a": torch.randn(200, 300)}
    save_file(state, str(tmp_path / "m.safetensors"))
    gcs_server.put_object(gcs_bucket, "r/m.safetensors", (tmp_path / "m.safetensors").read_bytes())
    with open_checkpoint(f"gs://{gcs_bucket}/r/m.safetensors") as handle:
        handle.tensors()
        gcs_server.counts.reset()
        gcs_server.inject("GET", "r/m.safetensors", times=1)
        assert torch.equal(handle.read("a"), state["a"])
        assert gcs_server.counts.gets == 2 and all_stats()["gs"]["retries"] == 1
        gcs_server.counts.reset()
        fault = gcs_server.inject("GET", "r/m.safetensors", times=100)
        with pytest.raises(RemoteError, match=r"after 3 attempts \(2 retries\)") as caught:
            handle.read("a")
    assert caught.value.url == f"gs://{gcs_bucket}/r/m.safetensors"
    assert fault.hits == 3 and gcs_server.counts.gets == 3 and all_stats()["gs"]["retries"] == 3


def test_issue22_gcs_changed_object_invalidates_caches_and_fails_verify(tmp_path, gcs_server, gcs_bucket,
                                                                        capsys) -> None:
    """An object rewritten with the same size: a new ETag, so the run fingerprint and the sketch change,
    and a recipe made before fails --verify naming it."""
    from analysis.signals.sketch import sketch_checkpoint

    run = write_tiny_run(tmp_path / "run", [50, 100])
    url = upload_tree(gcs_server, run, gcs_bucket, "etag")
    inputs = [f"{url}/ckpt/step_000050.safetensors", f"{url}/ckpt/step_000100.safetensors"]
    assert main(["merge", "--checkpoints", *inputs, "-o", str(tmp_path / "m1")]) == 0
    first = open_run(url)
    before = sketch_checkpoint(first.checkpoints[-1])
    ckpt = run / "ckpt" / "step_000100.safetensors"
    changed = {k: (v * 2 if v.is_floating_point() else v) for k, v in load_file(ckpt).items()}
    save_file(changed, str(tmp_path / "same_size.safetensors"), metadata={"step": "100"})
    assert (tmp_path / "same_size.safetensors").stat().st_size == ckpt.stat().st_size
    gcs_server.put_object(gcs_bucket, "etag/ckpt/step_000100.safetensors",
                          (tmp_path / "same_size.safetensors").read_bytes())
    second = open_run(url)
    assert second.fingerprint != first.fingerprint
    after = sketch_checkpoint(second.checkpoints[-1])
    assert not torch.equal(after.weights["layer.weight"], before.weights["layer.weight"])
    reset_stores()
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "m1" / "recipe.yaml"), "-o", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert f"{inputs[1]}: ETag differs" in err and not (tmp_path / "m2").exists()


def test_issue22_gcs_merge_killed_mid_upload_is_incomplete_then_replaced(tmp_path, gcs_server, gcs_bucket) -> None:
    """kill -9 while shards go up to gs://: no index, no recipe; incomplete_output says so; --force replaces it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    gen = torch.Generator().manual_seed(0)
    names = []
    for step in (1, 2):   # 8 tensors of 2 MiB (fp32): 16 shards of ~2 MB
        save_file({f"w{i}": torch.randn(512, 1024, generator=gen) for i in range(8)}, tmp_path / f"s{step}.safetensors")
        names.append(str(tmp_path / f"s{step}.safetensors"))
    options = json.dumps({"gs": {"endpoint_url": gcs_server.endpoint, "token": "anon", "project": "test"}})
    scratch_root = tmp_path / "tmp"   # its own temp root: another worker's bucket merge cleans dead scratch
    scratch_root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch_root)}
    proc = subprocess.Popen([sys.executable, "-m", "analysis", "merge", "--checkpoints", *names, "-o",
                             f"gs://{gcs_bucket}/killed", "--out-shard-size", "2MB", "--storage-options", options],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if any(n.startswith("model-") for n in gcs_server.list_objects(gcs_bucket, "killed")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = gcs_server.list_objects(gcs_bucket, "killed")
    assert any(n.startswith("model-") for n in listed)
    assert "recipe.yaml" not in listed and "model.safetensors.index.json" not in listed
    reset_stores()
    note = incomplete_output(RemotePath(f"gs://{gcs_bucket}/killed"))
    assert note is not None and "incomplete merge output" in note and "recipe.yaml" in note
    assert main(["merge", "--checkpoints", *names, "-o", f"gs://{gcs_bucket}/killed", "--force",
                 "--out-shard-size", "2MB"]) == 0
    reset_stores()
    assert incomplete_output(RemotePath(f"gs://{gcs_bucket}/killed")) is None
    assert _creation_order(gcs_server, gcs_bucket, "killed")[-1] == "recipe.yaml"


def test_issue22_gcs_endpoint_from_storage_emulator_host(tmp_path, gcs_server, gcs_bucket, capsys,
                                                         monkeypatch) -> None:
    """STORAGE_EMULATOR_HOST (host:port, as the Google SDKs take it) instead of an endpoint_url option:
    the same run is read, through gcsfs's JSON API class (no gRPC bucket-layout lookup)."""
    from analysis.remote import set_storage_options

    run = write_tiny_run(tmp_path / "run", [50, 100])
    url = upload_tree(gcs_server, run, gcs_bucket, "env")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint.removeprefix("http://"))
    set_storage_options({"gs": {"token": "anon", "project": "test"}})
    reset_stores()
    assert main(["analyze", url, "--json", "--no-similarity"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in doc["checkpoints"]] == [50, 100] and doc["io"]["gs"]["listings"] == 1
    assert type(RemotePath(url).store.fs).__module__ == "gcsfs.core"
