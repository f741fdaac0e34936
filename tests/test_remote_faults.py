"""Issue 22 hardening: object storage that fails as real object storage does, against a real S3 server (moto).

- A merge into a bucket killed mid-upload leaves shards without its recipe (the commit marker): run
  discovery lists that prefix in ``Run.unreadable`` with why, never as a finished merge or a checkpoint.
- Faults are injected in the server's WSGI middleware (``S3Server.inject``), not by mocking our code:
  S3's own ``503 SlowDown`` answers and connections closed before any response. A remote ``analyze``
  and ``merge`` come through with the same results, every resend is counted once in ``io.retries``
  (our store is the one retrying layer for s3://), and a persistent 503 is exit 2 in one line naming
  the URL and the retries spent, after as many requests as our store's attempts, not their product.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from analysis.cli import main
from analysis.follow import RunFollower
from analysis.remote import RemotePath, reset_stores
from analysis.run import open_run
from conftest import REPO, upload_tree
from remote_checks import assert_same_model, safetensors_run
from test_remote_merge import download, objects, write_run
from test_remote_runs import _same_analysis


@pytest.fixture
def quick_retries(monkeypatch):
    """Our store's backoff shortened (the attempts stay 6): a test's injected faults cost milliseconds, not seconds."""
    from analysis.remote import store

    monkeypatch.setattr(store, "BASE_DELAY_S", 0.01)
    return store


# --- 1. a killed merge into a bucket, seen by run discovery -------------------------------------------------------

def _kill_while_uploading(s3_server, bucket: str, inputs: list[str], prefix: str, shards: int = 2) -> int:
    """Start ``merge`` into ``s3://bucket/prefix`` in another process and kill -9 it once ``shards`` shards are
    there (of 8); its pid."""
    options = json.dumps({"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}})
    proc = subprocess.Popen([sys.executable, "-m", "analysis", "merge", "--checkpoints", *inputs,
                             "-o", f"s3://{bucket}/{prefix}", "--out-shard-size", "2MB", "--storage-options", options],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if sum(n.startswith("model-") for n in objects(s3_server, bucket, prefix)) >= shards:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_issue22_killed_merge_inside_a_remote_run_is_listed_unreadable_not_merged(tmp_path, s3_server, s3_bucket,
                                                                                   capsys) -> None:
    """A merge killed while uploading into the run's own prefix: `analyze` of the run lists that prefix once as
    unreadable ("incomplete merge output"), offers the run's checkpoints only, and calls nothing a finished
    merge; after `merge --force` completes it, it is a merged output again and nothing is unreadable."""
    run = tmp_path / "run"
    write_run(run, (100, 200, 300))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train_loss": 3 - s / 200}) + "\n"
                                               for s in range(1, 301)))
    gen = torch.Generator().manual_seed(0)
    big = []
    for step in (1, 2):   # 8 fp32 tensors of 2 MiB each: 16 MB of output in 2 MB shards, slow enough to kill
        save_file({f"w{i}": torch.randn(512, 1024, generator=gen) for i in range(8)}, tmp_path / f"b{step}.safetensors")
        big.append(str(tmp_path / f"b{step}.safetensors"))
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "run")
    _kill_while_uploading(s3_server, s3_bucket, big, "run/merged")
    listed = objects(s3_server, s3_bucket, "run/merged")
    assert "recipe.yaml" not in listed and sum(n.startswith("model-") for n in listed) >= 2
    reset_stores()
    capsys.readouterr()
    assert main(["analyze", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in doc["checkpoints"]] == [100, 200, 300]
    assert doc["merged_outputs"] == []
    assert [u["path"] for u in doc["unreadable"]] == [f"{url}/merged"]   # once, however many shards it left
    assert "an incomplete merge output (no recipe.yaml" in doc["unreadable"][0]["reason"]
    assert doc["unreadable"][0]["being_written"]   # its shards are seconds old: it may still be uploading
    # the same from open_run, from watch's follower (once, though each shard is looked at on its own), and in text
    reset_stores()
    opened = open_run(url)
    assert [u.path for u in opened.unreadable] == [RemotePath(f"{url}/merged")] and not opened.merged_outputs
    follower = RunFollower(url)
    assert [u.path for u in follower.refresh().run.unreadable] == [RemotePath(f"{url}/merged")]
    assert main(["analyze", url]) == 0
    assert f"passed over checkpoint {url}/merged: being written: an incomplete merge output" in capsys.readouterr().out
    # completed by --force: a finished merge again, set aside, nothing unreadable (watch sees it too)
    reset_stores()
    assert main(["merge", "--checkpoints", *big, "-o", f"{url}/merged", "--force", "--out-shard-size", "2MB"]) == 0
    reset_stores()
    capsys.readouterr()
    assert main(["analyze", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["unreadable"] == [] and doc["merged_outputs"] == [f"{url}/merged/model.safetensors.index.json"]
    assert [c["step"] for c in doc["checkpoints"]] == [100, 200, 300]
    update = follower.refresh()
    assert update.run.unreadable == () and update.run.merged_outputs == (RemotePath(f"{url}/merged/model.safetensors.index.json"),)


def test_issue22_incomplete_merge_with_its_index_and_copied_merge_weights(tmp_path, s3_server, s3_bucket,
                                                                         monkeypatch) -> None:
    """A prefix killed after its index (recipe still missing) is unreadable too, "being written" no longer once
    its objects are older than BEING_WRITTEN_SECONDS; a merge's weights copied into a run under another name,
    beside the run's own files, stay a merged output (no recipe expected there)."""
    import boto3

    from analysis import unreadable   # where BEING_WRITTEN_SECONDS is read (moved out of analysis.run)

    run = tmp_path / "run"
    paths = [str(p) for p in write_run(run / "ckpt", (100, 200, 300))]
    assert main(["merge", "--checkpoints", *paths, "-o", str(tmp_path / "m")]) == 0
    (run / "merged.safetensors").write_bytes((tmp_path / "m" / "model.safetensors").read_bytes())
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "run")
    assert main(["merge", "--checkpoints", *paths, "-o", f"{url}/indexed", "--out-shard-size", "400KB"]) == 0
    boto3.client("s3", endpoint_url=s3_server.endpoint).delete_object(Bucket=s3_bucket, Key="run/indexed/recipe.yaml")
    reset_stores()
    monkeypatch.setattr(unreadable, "BEING_WRITTEN_SECONDS", 0.0)   # as if the kill were a minute ago
    opened = open_run(url)
    assert [c.step for c in opened.checkpoints] == [100, 200, 300]
    assert [(u.path, u.kind, u.status) for u in opened.unreadable] == [(RemotePath(f"{url}/indexed"), "checkpoint",
                                                                        "unreadable")]
    assert "no recipe.yaml, which a merge writes last" in opened.unreadable[0].reason
    assert opened.merged_outputs == (RemotePath(f"{url}/merged.safetensors"),)


# --- 2. transient errors on the wire ------------------------------------------------------------------------------

def test_issue22_analyze_through_503s_gives_the_same_analysis_and_counts_each_retry(tmp_path, s3_server, s3_bucket,
                                                                                    quick_retries, capsys) -> None:
    """503 SlowDown on a header, on tensor ranges and on the listing: the analysis equals the fault-free one, and
    io.retries equals the requests the server refused (botocore and s3fs no longer retry uncounted below us)."""
    run = safetensors_run(tmp_path / "run", 3)
    clean = upload_tree(run, s3_server.endpoint, s3_bucket, "clean")
    faulty = upload_tree(run, s3_server.endpoint, s3_bucket, "faulty")
    assert main(["analyze", clean, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    reset_stores()
    s3_server.counts.reset()
    faults = [s3_server.inject("GET", r"/faulty/step_200\.safetensors$", "503", times=4),
              s3_server.inject("GET", r"/faulty/metrics\.jsonl$", "503", times=1),
              s3_server.inject("GET", rf"^/{s3_bucket}/?$", "503", times=1)]    # the listing (list-type=2 on the bucket)
    assert main(["analyze", faulty, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    io = doc.pop("io")["s3"]
    assert [f.hits for f in faults] == [4, 1, 1]
    assert io["retries"] == 6
    # every request the server saw is one we counted: a success (requests) or one sent again (retries)
    assert s3_server.counts.gets == io["requests"] + io["retries"]
    _same_analysis(expected, doc)
    assert doc["unreadable"] == []


def test_issue22_merge_s3_to_s3_through_503s_and_dropped_connections_is_bit_identical(tmp_path, s3_server, s3_bucket,
                                                                                      quick_retries, capsys) -> None:
    """Faults on input reads (503 and dropped connections) and on shard, index and recipe uploads: the merge
    completes, equals the fault-free merge bit for bit, and each refused request is counted once."""
    write_run(tmp_path / "run")
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "run")
    inputs = [f"{url}/step_*.safetensors"]
    assert main(["merge", "--checkpoints", *inputs, "-o", f"s3://{s3_bucket}/clean", "--out-shard-size", "400KB"]) == 0
    reset_stores()
    capsys.readouterr()
    slow = [s3_server.inject("GET", r"/run/step_100\.safetensors$", "503", times=3),
            s3_server.inject("PUT", r"/faulty/model-00002-of-\d+\.safetensors$", "503", times=2),
            s3_server.inject("PUT", r"/faulty/model\.safetensors\.index\.json$", "503", times=1),
            s3_server.inject("PUT", r"/faulty/recipe\.yaml$", "503", times=1)]
    dropped = s3_server.inject("GET", r"/run/step_300\.safetensors$", "drop", times=2)
    assert main(["merge", "--checkpoints", *inputs, "-o", f"s3://{s3_bucket}/faulty", "--out-shard-size", "400KB",
                 "--json"]) == 0
    io = json.loads(capsys.readouterr().out)["io"]["s3"]
    assert [f.hits for f in slow] == [3, 2, 1, 1] and dropped.hits == 2
    # the 7 refused requests are counted; of the 2 dropped ones aiohttp itself sends the first again (uncounted)
    assert io["retries"] == 7 + 1
    clean, faulty = download(s3_server, s3_bucket, "clean", tmp_path / "c"), download(s3_server, s3_bucket, "faulty",
                                                                                       tmp_path / "f")
    assert_same_model(clean, faulty)
    assert sorted(p.name for p in clean.iterdir()) == sorted(p.name for p in faulty.iterdir())
    index = json.loads((faulty / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((clean / "model.safetensors.index.json").read_text())["weight_map"]


def test_issue22_persistent_503_is_exit_2_naming_the_url_and_the_retries_spent(tmp_path, s3_server, s3_bucket,
                                                                              quick_retries, capsys) -> None:
    """A 503 that never ends: one line, exit 2, the object's URL and how many attempts; the server saw exactly
    MAX_ATTEMPTS requests for it (before this fix botocore x s3fs sent it 25 times, each layer uncounted)."""
    run = safetensors_run(tmp_path / "run", 2)
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "run")
    fault = s3_server.inject("GET", r"/run/step_200\.safetensors$", "503", times=None)
    started = time.monotonic()
    assert main(["analyze", url]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip()
    attempts = quick_retries.MAX_ATTEMPTS
    assert len(err.splitlines()) == 1, err
    assert f"{url}/step_200.safetensors" in err
    assert f"after {attempts} attempts ({attempts - 1} retries)" in err and "reduce your request rate" in err
    assert fault.hits == attempts


def test_issue22_fewer_attempts_by_module_constant_and_botocore_retries_by_storage_options(
        tmp_path, s3_server, s3_bucket, quick_retries, monkeypatch, capsys) -> None:
    """MAX_ATTEMPTS bounds the requests; a user who asks botocore to retry (config_kwargs) gets its retries on top."""
    from analysis.remote import set_storage_options

    run = safetensors_run(tmp_path / "run", 1)
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "run")
    monkeypatch.setattr(quick_retries, "MAX_ATTEMPTS", 2)
    fault = s3_server.inject("GET", r"/run/step_100\.safetensors$", "503", times=None)
    assert main(["analyze", url]) == 2
    assert fault.hits == 2 and "after 2 attempts (1 retries)" in capsys.readouterr().err
    s3_server.clear_faults()
    set_storage_options({"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing",
                                "config_kwargs": {"retries": {"total_max_attempts": 3, "mode": "standard"}}}})
    fault = s3_server.inject("GET", r"/run/step_100\.safetensors$", "503", times=None)
    assert main(["analyze", url]) == 2
    assert fault.hits == 2 * 3   # our 2 attempts, each botocore's 3


# --- 4. hf:// and gs:// ---------------------------------------------------------------------------------------------

def test_issue22_hf_urls_use_huggingface_hub_and_fail_offline_in_one_line_without_retries(tmp_path) -> None:
    """fsspec picks huggingface_hub's HfFileSystem for hf://; with HF_HUB_OFFLINE=1 (no request leaves the machine)
    `analyze hf://...` is exit 2, one line naming the URL and offline mode, after one attempt, not six."""
    import fsspec
    from huggingface_hub import HfFileSystem

    assert fsspec.get_filesystem_class("hf") is HfFileSystem
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", (
        "from analysis.remote import store_for; from analysis.cli import main; import sys\n"
        "store, key = store_for('hf://acme/llama-run')\n"
        "print(type(store.fs).__name__, key)\n"
        "sys.exit(main(['analyze', 'hf://acme/llama-run']))")],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout.splitlines()[0] == "HfFileSystem acme/llama-run"
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ckpt-select: error: hf://acme/llama-run: list failed: ")
    assert "offline mode is enabled" in err[0] and "attempts" not in err[0]


def test_issue22_gs_urls_without_gcsfs_say_what_to_install(capsys, monkeypatch) -> None:
    """gs:// without gcsfs installed: exit 2, one line naming the URL and the package (nothing is tried).
    gcsfs is a dev dependency now (tests/test_remote_gcs.py), so its absence is made here: None in
    sys.modules makes ``import gcsfs`` raise ImportError, as when it is not installed."""
    import sys

    from analysis.remote import reset_stores

    for name in ("gcsfs", "gcsfs.core"):
        monkeypatch.setitem(sys.modules, name, None)
    reset_stores()
    assert main(["analyze", "gs://bucket/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ckpt-select: error: gs://bucket/run: cannot open gs:// URLs")
    assert "gcsfs" in err
