"""``prune`` on a run kept in object storage (issue 22: every command accepts a URL wherever a path is accepted).

Runs are made by the real libraries (safetensors, transformers' save_pretrained, torch.save), uploaded with
boto3 to moto's S3 server on 127.0.0.1, pruned by URL, and checked at the server with boto3 (not our code):
exactly the planned objects deleted, everything else byte-identical, nothing lost when a request fails
midway, and no checkpoint body downloaded (the moves are server-side copies).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import time
from pathlib import Path

import boto3
import pytest

from analysis import unreadable
from analysis.cli import main
from analysis.prune import MANIFEST, TRASH_FOLDER, apply_prune, parse_policy, plan_prune
from analysis.remote import reset_stores, store_for
from analysis.remote.urls import all_stats, stats_since
from analysis.run import open_run
from ckpt_factories import hf_checkpoint
from conftest import upload_tree, write_tiny_run


@pytest.fixture
def finished(monkeypatch):
    """Objects uploaded a moment ago count as finished, as if their LastModified were an hour back (moto stamps
    an upload with the time it arrived; the one-minute rule itself is checked in the first test)."""
    monkeypatch.setattr(unreadable, "BEING_WRITTEN_SECONDS", 0.0)


@pytest.fixture
def quick_retries(monkeypatch):
    """The store's backoff shortened (attempts stay 6): an injected persistent fault costs milliseconds."""
    from analysis.remote import store

    monkeypatch.setattr(store, "BASE_DELAY_S", 0.01)


def _client(s3_server):
    return boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")


def _objects(s3_server, bucket: str, prefix: str) -> dict[str, str]:
    """Key below ``prefix`` -> sha256 of its bytes, read at the server with boto3."""
    client, found = _client(s3_server), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            found[obj["Key"][len(prefix) + 1:]] = hashlib.sha256(body).hexdigest()
    return found


def _age(root: Path) -> Path:
    """Every local file last modified an hour ago (the local run the remote one is compared with)."""
    then = time.time() - 3600
    for path in root.rglob("*"):
        os.utime(path, (then, then))
    return root


def _tiny(tmp_path: Path, name: str = "run") -> Path:
    """12 single-file safetensors checkpoints every 50 steps, a metrics log, and a recipe naming steps 100 and 150
    relative to its folder (a recipe that travels with the run: the same checkpoints on disk and in the bucket)."""
    root = write_tiny_run(tmp_path / name, list(range(50, 650, 50)), spike_steps=(298,))
    _recipe(root / "merges" / "manual-100-150" / "recipe.yaml", ["../../ckpt/step_000100.safetensors",
                                                                 "../../ckpt/step_000150.safetensors"])
    return _age(root)


def _recipe(path: Path, names: list[str]) -> Path:
    """A CkptSelect recipe averaging ``names`` (paths or URLs) equally."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = "".join(f"- path: {n}\n  weight: {1 / len(names)}\n" for n in names)
    path.write_text(f"ckpt_select_recipe: 1\nmethod: manual\ncheckpoints:\n{entries}")
    return path


def _hf(tmp_path: Path) -> Path:
    """Four Trainer checkpoint-N folders (one sharded: an index and its shards), each with optimizer.pt, and a log."""
    root = tmp_path / "hf"
    for i, step in enumerate((100, 200, 300, 400)):
        hf_checkpoint(root / f"checkpoint-{step}", step, seed=i, shard=step == 200)
    (root / "train_log.csv").write_text("step,loss\n" + "".join(f"{s},{3 - s / 200:.3f}\n" for s in range(1, 401)))
    return _age(root)


def _prune_json(args: list[str], capsys) -> dict:
    assert main(["prune", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _rows(doc: dict) -> list[tuple]:
    return [(r["step"], r["path"], r["bytes"], r["action"], r["reasons"]) for r in doc["checkpoints"]]


def test_issue22_dry_run_by_url_plans_as_the_same_run_on_disk(tmp_path, s3_server, s3_bucket, monkeypatch,
                                                              capsys) -> None:
    """The plan of a URL: same kept/deleted, reasons and sizes as on disk (window, recipe, newest); nothing written."""
    local = _tiny(tmp_path)
    url = upload_tree(local, s3_server.endpoint, s3_bucket, "runs/tiny")
    fresh = _prune_json([url, "--keep", "newest:2"], capsys)   # just uploaded: the one-minute rule, from LastModified
    assert all(r["action"] == "keep" and any("may still be being written" in why for why in r["reasons"])
               for r in fresh["checkpoints"])
    monkeypatch.setattr(unreadable, "BEING_WRITTEN_SECONDS", 0.0)
    before = _objects(s3_server, s3_bucket, "runs/tiny")
    s3_server.counts.reset()
    policy = ["--keep", "window+1,newest:2,every:200"]
    remote = _prune_json([url, *policy], capsys)
    assert {m for m in s3_server.counts.requests} <= {"GET", "HEAD"}   # a dry run writes and deletes nothing
    on_disk = _prune_json([str(local), *policy], capsys)
    assert _rows(remote) == _rows(on_disk) and remote["deleted"] == on_disk["deleted"] > 0
    assert (remote["bytes_freed"], remote["summary"]) == (on_disk["bytes_freed"], on_disk["summary"])
    reasons = {r["step"]: " ".join(r["reasons"]) for r in remote["checkpoints"]}
    assert "named by the recipe merges/manual-100-150/recipe.yaml" in reasons[100] and "newest" in reasons[600]
    assert remote["dry_run"] is True and remote["io"]["s3"]["requests"] > 0
    assert _objects(s3_server, s3_bucket, "runs/tiny") == before


def test_issue22_yes_deletes_exactly_the_planned_objects_without_downloading_them(tmp_path, s3_server, s3_bucket,
                                                                                  finished, capsys) -> None:
    """Trainer folders by URL: the deleted checkpoints' every object gone, all else byte-identical, no body fetched."""
    url = upload_tree(_hf(tmp_path), s3_server.endpoint, s3_bucket, "runs/hf")
    before = _objects(s3_server, s3_bucket, "runs/hf")
    plan = plan_prune(open_run(url), parse_policy("newest:2"))
    assert [i.path.name for i in plan.deleted] == ["checkpoint-100", "checkpoint-200"]
    tripwire = s3_server.inject("GET", rf"^/{s3_bucket}/runs/hf/checkpoint-", times=None)   # any body read fails
    s3_server.counts.reset()
    io_before = all_stats()
    result = apply_prune(plan)
    s3_server.clear_faults()
    assert tripwire.hits == 0 and s3_server.counts.ranged_gets == 0
    assert stats_since(io_before)["s3"]["requests"] == sum(s3_server.counts.requests.values())   # io is honest
    assert s3_server.counts.get_bytes < 20_000 < plan.bytes_freed   # listings only: the copies are server-side
    after = _objects(s3_server, s3_bucket, "runs/hf")
    gone = {k for k in before if k.startswith(("checkpoint-100/", "checkpoint-200/"))}
    assert set(before) - set(after) == gone and len(gone) >= 8
    assert after == {k: v for k, v in before.items() if k not in gone}   # logs and kept checkpoints byte-identical
    assert result.emptied and result.bytes_freed == plan.bytes_freed
    assert not [k for k in after if TRASH_FOLDER in k]
    reset_stores()
    assert [c.step for c in open_run(url).checkpoints] == [300, 400]


def test_issue22_a_large_object_is_copied_server_side_in_parts(s3_server, s3_bucket, monkeypatch) -> None:
    """Above s3fs's managed-copy threshold (150 MiB there, 1 MiB here) Store.copy sends a multipart copy of
    COPY_PART_BYTES parts: the copy is byte-identical, no byte is downloaded, every request counted."""
    import s3fs.core

    from analysis.remote import store

    monkeypatch.setattr(s3fs.core, "MANAGED_COPY_THRESHOLD", 1 << 20)
    monkeypatch.setattr(store, "COPY_PART_BYTES", 5 << 20)
    body = os.urandom(11 << 20)
    _client(s3_server).put_object(Bucket=s3_bucket, Key="run/big.safetensors", Body=body)
    s3_server.counts.reset()
    remote, key = store_for(f"s3://{s3_bucket}/run/big.safetensors")
    before = remote.stats.snapshot()["requests"]
    remote.copy(key, f"{s3_bucket}/trash/big.safetensors", len(body))
    assert s3_server.counts.get_bytes == 0 and remote.stats.snapshot()["requests"] - before == 5 == \
        sum(s3_server.counts.requests.values())   # create, 3 part copies, complete
    copied = _client(s3_server).get_object(Bucket=s3_bucket, Key="trash/big.safetensors")["Body"].read()
    assert hashlib.sha256(copied).digest() == hashlib.sha256(body).digest()


def test_issue22_keep_trash_then_restore_brings_every_object_back(tmp_path, s3_server, s3_bucket, finished,
                                                                  capsys) -> None:
    """--keep-trash copies into RUN/.ckpt-select-trash/<UTC>-<id>/ (hidden from the run); --restore puts all back."""
    url = upload_tree(_tiny(tmp_path), s3_server.endpoint, s3_bucket, "run")
    before = _objects(s3_server, s3_bucket, "run")
    doc = _prune_json([url, "--keep", "newest:3", "--yes", "--keep-trash"], capsys)
    trash = doc["result"]["trash"]
    assert trash.startswith(f"{url}/{TRASH_FOLDER}/") and not doc["result"]["trash_emptied"]
    assert doc["result"]["restore_command"] == f"ckpt-select prune {url} --restore {trash}"
    moved = {k for k in before if k.startswith("ckpt/")} - {f"ckpt/step_{s:06d}.safetensors" for s in (100, 150, 500, 550, 600)}
    middle = _objects(s3_server, s3_bucket, "run")
    rel = trash[len(url) + 1:]
    assert {k for k in middle if k.startswith(rel) and not k.endswith(MANIFEST)} == {f"{rel}/{k}" for k in moved}
    assert all(middle[f"{rel}/{k}"] == before[k] for k in moved) and not moved & set(middle)
    manifest = json.loads(_client(s3_server).get_object(Bucket=s3_bucket, Key=f"run/{rel}/{MANIFEST}")["Body"].read())
    assert manifest["state"] == "moved" and sorted(e["path"] for e in manifest["objects"]) == sorted(moved)
    reset_stores()
    assert len(open_run(url).checkpoints) == 12 - len(moved)   # the trash is a hidden prefix: not the run's
    assert main(["prune", url, "--restore", trash]) == 0
    assert f"restored {len(moved)} items" in capsys.readouterr().out
    assert _objects(s3_server, s3_bucket, "run") == before


def test_issue22_a_checkpoint_rewritten_after_the_plan_is_left_in_place(tmp_path, s3_server, s3_bucket,
                                                                        finished) -> None:
    """Same size, new bytes: the ETag differs from the plan's stamp, so that checkpoint is not moved."""
    local = _tiny(tmp_path)
    url = upload_tree(local, s3_server.endpoint, s3_bucket, "run")
    by_url = _recipe(tmp_path / "elsewhere" / "recipe.yaml", [f"{url}/ckpt/step_000250.safetensors"])
    _client(s3_server).upload_file(str(by_url), s3_bucket, "run/merges/by-url/recipe.yaml")
    plan = plan_prune(open_run(url), parse_policy("newest:1"))
    assert "named by the recipe merges/by-url/recipe.yaml" in " ".join(plan.items[4].reasons)
    key = "run/ckpt/step_000200.safetensors"
    data = bytearray((local / "ckpt/step_000200.safetensors").read_bytes())
    data[-1] ^= 0xFF
    _client(s3_server).put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
    result = apply_prune(plan)
    assert [(i.step, why) for i, why in result.skipped] == [(200, "changed since the plan: left in place; plan again")]
    assert len(result.moved) == len(plan.deleted) - 1 == 7 and 200 not in {i.step for i in result.moved}
    left = _objects(s3_server, s3_bucket, "run")
    assert left["ckpt/step_000200.safetensors"] == hashlib.sha256(data).hexdigest()
    assert {"ckpt/step_000150.safetensors", "ckpt/step_000250.safetensors"} <= set(left)   # the recipes' steps
    assert "ckpt/step_000300.safetensors" not in left


def test_issue22_a_trash_in_another_bucket_is_refused(tmp_path, s3_server, s3_bucket, finished, capsys) -> None:
    """A copy to another bucket (or to disk) is not server-side: one line, exit 2, nothing touched."""
    local = _tiny(tmp_path)
    url = upload_tree(local, s3_server.endpoint, s3_bucket, "run")
    before = _objects(s3_server, s3_bucket, "run")
    assert main(["prune", str(local), "--keep", "newest:1", "--yes", "--trash", f"s3://{s3_bucket}/t"]) == 2
    assert "the trash of a local run must be a folder on its disk" in capsys.readouterr().err
    assert len(list((local / "ckpt").iterdir())) == 12
    for trash in ("s3://another-bucket/trash", str(tmp_path / "trash")):
        assert main(["prune", url, "--keep", "newest:1", "--yes", "--trash", trash]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not server-side" in err and trash in err
    assert main(["prune", url, "--keep", "newest:1", "--yes", "--trash", f"{url}/trash"]) == 2   # inside, not hidden
    assert "hidden prefix" in capsys.readouterr().err
    assert _objects(s3_server, s3_bucket, "run") == before
    doc = _prune_json([url, "--keep", "newest:1", "--yes", "--keep-trash", "--trash", f"s3://{s3_bucket}/bin"], capsys)
    assert doc["result"]["trash"].startswith(f"s3://{s3_bucket}/bin/") and len(doc["result"]["moved"]) == 9


@pytest.mark.parametrize("method, where", [("DELETE", "run/ckpt/step_000200"), ("PUT", f"{TRASH_FOLDER}/.*step_000200")],
                         ids=["delete-fails", "copy-fails"])
def test_issue22_a_request_failing_midway_loses_nothing_and_restore_recovers_all(
        tmp_path, s3_server, s3_bucket, finished, quick_retries, method, where, capsys) -> None:
    """A persistent 503 on the second deleted checkpoint's delete (or its copy): exit 2, one line naming the object, what was
    done and the restore command; every object in the run or the trash; the command then restores all."""
    url = upload_tree(_tiny(tmp_path), s3_server.endpoint, s3_bucket, "run")
    before = _objects(s3_server, s3_bucket, "run")
    s3_server.inject(method, where, times=None)
    assert main(["prune", url, "--keep", "newest:1", "--yes"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step_000200.safetensors" in err
    assert "1 of 9 checkpoints moved, nothing deleted from the trash" in err
    command = re.search(r"restore with: (ckpt-select prune .*)$", err).group(1)
    s3_server.clear_faults()
    middle = _objects(s3_server, s3_bucket, "run")
    trash = shlex.split(command)[-1][len(url) + 1:]
    for key, digest in before.items():   # each object in place or in the trash, byte-identical
        assert middle.get(key) == digest or middle.get(f"{trash}/{key}") == digest, key
    assert main(shlex.split(command)[1:]) == 0
    assert _objects(s3_server, s3_bucket, "run") == before


def test_issue22_storage_page_prunes_a_run_in_a_bucket(tmp_path, s3_server, s3_bucket, finished, monkeypatch) -> None:
    """The app's Storage page plans and deletes through the same functions: the bucket loses exactly the plan."""
    from streamlit.testing.v1 import AppTest

    from analysis.remote import set_storage_options
    from conftest import REPO

    url = upload_tree(_tiny(tmp_path), s3_server.endpoint, s3_bucket, "runs/tiny")
    before = _objects(s3_server, s3_bucket, "runs/tiny")
    set_storage_options(None)   # the app gets them as `ui --storage-options` gives them, in its environment
    monkeypatch.setenv("CKPT_SELECT_STORAGE_OPTIONS", json.dumps(
        {"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}}))
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CKPT_SELECT_RUN", url)
    monkeypatch.delenv("CKPT_SELECT_ROOT", raising=False)
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=90)
    at.run()
    at.switch_page("views/storage.py").run()
    assert not at.exception, at.exception
    at.text_input(key="prune_keep").set_value("newest:3").run()
    table = at.dataframe[0].value
    deleted = set(table[table["action"] == "delete"]["checkpoint"])
    assert len(deleted) == 7 and "named by the recipe" in " ".join(table["why"])   # 12 - 3 newest - 2 in the recipe
    at.checkbox(key="prune_confirm").check().run()
    at.button(key="prune_button").click().run()
    assert not at.exception and "Deleted 7 checkpoints" in at.success[0].value
    assert _objects(s3_server, s3_bucket, "runs/tiny") == {k: v for k, v in before.items() if k not in deleted}


_KILLABLE = """import sys
from analysis import unreadable
unreadable.BEING_WRITTEN_SECONDS = 0.0   # as the `finished` fixture: objects uploaded a moment ago count as finished
from analysis.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_issue22_kill_9_during_a_bucket_prune_loses_no_object(tmp_path, s3_server, s3_bucket) -> None:
    """kill -9 a real `prune --yes` process at random moments after its manifest: every object of the run stays in
    place, in the trash or in both, byte-identical, and --restore gives back the run as it was."""
    import random

    template = write_tiny_run(tmp_path / "template", list(range(10, 210, 10)))
    options = json.dumps({"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}})
    rng, client = random.Random(22), _client(s3_server)
    s3_server.latency_s = 0.03   # each of the ~55 copies, checks and deletes waits: the prune outlasts the kill's 0.6 s
    try:
        for trial in range(4):
            _kill_one_prune(trial, template, options, rng, client, s3_server, s3_bucket)
    finally:
        s3_server.latency_s = 0.0


def _kill_one_prune(trial: int, template: Path, options: str, rng, client, s3_server, s3_bucket: str) -> None:
    """One trial: upload the run, start the prune, kill it mid-move, check nothing is lost, restore."""
    import signal
    import subprocess
    import sys

    from analysis.prune import restore_trash
    from conftest import REPO

    url = upload_tree(template, s3_server.endpoint, s3_bucket, f"run{trial}")
    original = _objects(s3_server, s3_bucket, f"run{trial}")
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, "prune", url, "--keep", "newest:2", "--yes",
                             *(["--keep-trash"] if trial % 2 else []), "--storage-options", options],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not client.list_objects_v2(
            Bucket=s3_bucket, Prefix=f"run{trial}/{TRASH_FOLDER}/").get("KeyCount"):
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.6))
    assert proc.poll() is None, "the prune ended before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    now = _objects(s3_server, s3_bucket, f"run{trial}")
    trashes = sorted({k.split("/")[1] for k in now if k.startswith(TRASH_FOLDER + "/")})
    trashed = {k.split("/", 2)[2]: h for k, h in now.items() if k.startswith(TRASH_FOLDER + "/")}
    for key, digest in original.items():
        assert now.get(key) == digest or trashed.get(key) == digest, (trial, key)
    reset_stores()
    for trash in trashes:
        restore_trash(f"{url}/{TRASH_FOLDER}/{trash}")
    assert _objects(s3_server, s3_bucket, f"run{trial}") == original, trial
