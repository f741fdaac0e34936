"""Issue 22, merging to and from object storage, against a real S3 server (moto, 127.0.0.1).

Inputs are read by exact ranges, the output's recipe is the last object written (the commit
marker), a killed or failed merge leaves nothing finished-looking, and every result is
bit-identical to the same merge of local copies.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from safetensors.torch import save_file

from analysis.cli import main
from analysis.merge.bucket import remove_stale_scratch
from analysis.remote import RemotePath, reset_stores
from analysis.remote.outputs import incomplete_output
from conftest import REPO, upload_tree
from remote_checks import assert_same_model, tensors_of

# Tensors a few blocks long (a block is 128 Ki elements) plus odd sizes and an integer buffer.
SHAPES = {"embed.weight": (300, 1000), "layer.0.weight": (512, 700), "layer.0.bias": (700,), "norm.weight": (17,)}


def state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {name: torch.randn(shape, generator=gen).to(torch.bfloat16) for name, shape in SHAPES.items()}
    out["position_ids"] = torch.arange(64, dtype=torch.int64)
    return out


def write_run(folder: Path, steps: tuple[int, ...] = (100, 200, 300)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in steps:
        save_file(state(step), folder / f"step_{step}.safetensors", metadata={"step": str(step)})
        paths.append(folder / f"step_{step}.safetensors")
    return paths


def client(s3_server):
    return boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")


def objects(s3_server, bucket: str, prefix: str) -> dict[str, dict]:
    listed = client(s3_server).list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: o for o in listed}


def download(s3_server, bucket: str, prefix: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    for name in objects(s3_server, bucket, prefix):
        client(s3_server).download_file(bucket, f"{prefix}/{name}", str(into / name))
    return into


def test_issue22_s3_inputs_merge_to_local_bit_identical(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """S3 -> local, glob expanded against one listing; equal to the merge of local copies; bytes read exactly."""
    write_run(tmp_path / "run")
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "run")
    assert main(["merge", "--checkpoints", str(tmp_path / "run" / "step_100.safetensors"),
                 str(tmp_path / "run" / "step_200.safetensors"), str(tmp_path / "run" / "step_300.safetensors"),
                 "-o", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    s3_server.counts.reset()
    assert main(["merge", "--checkpoints", f"{url}/step_*.safetensors", "-o", str(tmp_path / "from_s3"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert_same_model(tmp_path / "local", tmp_path / "from_s3")
    recipe = yaml.safe_load((tmp_path / "from_s3" / "recipe.yaml").read_text())
    assert [c["path"] for c in recipe["checkpoints"]] == [f"{url}/step_{s}.safetensors" for s in (100, 200, 300)]
    assert all(c["etag"] and c["bytes"] == (tmp_path / "run" / Path(c["path"]).name).stat().st_size
               for c in recipe["checkpoints"])
    assert "testing" not in (tmp_path / "from_s3" / "recipe.yaml").read_text()   # no credentials
    io = doc["io"]["s3"]
    tensor_bytes = sum(t.numel() * t.element_size() for t in state(0).values()) * 3
    # every tensor byte once, + per file two header reads of <= 100 KB (the step, then the merge); no quick
    # hash: a remote input is fingerprinted by its ETag, from the listing
    assert tensor_bytes <= io["bytes_read"] <= tensor_bytes + 3 * 2 * 100_000
    # one listing; per file 2 header requests; per (tensor, input) one ranged GET (tensors < one window)
    assert io["listings"] == 1 and io["requests"] <= 1 + 3 * 2 + 3 * len(SHAPES) + 1
    # at the server: the same GETs, and the same bytes plus the listing's XML
    assert s3_server.counts.gets == io["requests"] and 0 <= s3_server.counts.get_bytes - io["bytes_read"] < 5000


def test_issue22_local_inputs_merge_to_s3_single_file(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """local -> S3: one model object, the recipe last; bit-identical; the reader calls it complete."""
    paths = [str(p) for p in write_run(tmp_path / "run")]
    assert main(["merge", "--checkpoints", *paths, "-o", str(tmp_path / "local")]) == 0
    assert main(["merge", "--checkpoints", *paths, "-o", f"s3://{s3_bucket}/merged"]) == 0
    listed = objects(s3_server, s3_bucket, "merged")
    assert set(listed) == {"model.safetensors", "recipe.yaml", "mergekit_config.yml"}
    assert_same_model(tmp_path / "local", download(s3_server, s3_bucket, "merged", tmp_path / "back"))
    reset_stores()
    assert incomplete_output(RemotePath(f"s3://{s3_bucket}/merged")) is None


def put_order(caplog: pytest.LogCaptureFixture, bucket: str, prefix: str) -> list[str]:
    """The object names PUT under ``prefix``, in the order the server logged them (werkzeug's request log)."""
    found = [re.search(rf'"PUT /{bucket}/{prefix}/([^ ?]+)', r.getMessage()) for r in caplog.records]
    return [m.group(1) for m in found if m]


def test_issue22_s3_to_s3_sharded_index_and_recipe_last(tmp_path, s3_server, s3_bucket, capsys, caplog) -> None:
    """S3 -> S3 sharded: every shard, then the index, then the recipe (upload order seen at the server);
    a recipe read from its URL merges again to the same bits, and --verify checks size + ETag."""
    paths = write_run(tmp_path / "run")
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "run")
    assert main(["merge", "--checkpoints", *map(str, paths), "-o", str(tmp_path / "local"),
                 "--out-shard-size", "400KB"]) == 0
    caplog.set_level(logging.INFO, logger="werkzeug")
    caplog.clear()
    # --verbose: the CLI otherwise turns logging off for the command, the server's request log with it
    assert main(["--verbose", "merge", "--checkpoints", f"{url}/step_*.safetensors", "-o", f"s3://{s3_bucket}/merged",
                 "--out-shard-size", "400KB"]) == 0
    listed = objects(s3_server, s3_bucket, "merged")
    shards = sorted(n for n in listed if n.startswith("model-"))
    assert len(shards) >= 3 and "model.safetensors.index.json" in listed
    # the order the server received them: every shard, then the index, the mergekit config, the recipe last
    assert put_order(caplog, s3_bucket, "merged") == [*shards, "model.safetensors.index.json",
                                                      "mergekit_config.yml", "recipe.yaml"]
    assert all(listed["recipe.yaml"]["LastModified"] >= o["LastModified"] for o in listed.values())
    back = download(s3_server, s3_bucket, "merged", tmp_path / "back")
    assert_same_model(tmp_path / "local", back)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert index["metadata"]["ckpt_select_shard_bytes"] == {s: listed[s]["Size"] for s in shards}
    reset_stores()
    assert incomplete_output(RemotePath(f"s3://{s3_bucket}/merged")) is None
    # the recipe, read from its URL, merges again (verify quick: size + ETag) to the same bits
    capsys.readouterr()
    s3_server.counts.reset()
    assert main(["merge", f"s3://{s3_bucket}/merged/recipe.yaml", "-o", str(tmp_path / "again"), "--json"]) == 0
    assert_same_model(tmp_path / "local", tmp_path / "again", same_files=False)
    # --verify quick on remote inputs recorded with their ETag reads no byte beyond the merge's own
    io = json.loads(capsys.readouterr().out)["io"]["s3"]
    tensor_bytes = sum(t.numel() * t.element_size() for t in state(0).values()) * 3
    assert io["bytes_read"] <= tensor_bytes + 4 * 100_000


def test_issue22_verify_catches_a_rewritten_remote_input(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """A recipe records each remote input's ETag; an object rewritten with the same size fails --verify."""
    paths = write_run(tmp_path / "run")
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "run")
    assert main(["merge", "--checkpoints", f"{url}/step_*.safetensors", "-o", str(tmp_path / "m1")]) == 0
    recipe_url = upload_tree(tmp_path / "m1", s3_server.endpoint, s3_bucket, "m1") + "/recipe.yaml"
    data = bytearray(paths[0].read_bytes())
    data[-1] ^= 0xFF                                 # same size, other bytes: a new ETag
    client(s3_server).put_object(Bucket=s3_bucket, Key="run/step_100.safetensors", Body=bytes(data))
    reset_stores()
    capsys.readouterr()
    assert main(["merge", recipe_url, "-o", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert f"{url}/step_100.safetensors: ETag differs" in err and not (tmp_path / "m2").exists()


def test_issue22_truncated_input_object_exits_2_naming_the_url(tmp_path, s3_server, s3_bucket, capsys) -> None:
    paths = write_run(tmp_path / "run")
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "run")
    client(s3_server).put_object(Bucket=s3_bucket, Key="run/step_200.safetensors",
                                 Body=paths[1].read_bytes()[:-5000])
    reset_stores()
    code = main(["merge", "--checkpoints", f"{url}/step_*.safetensors", "-o", f"s3://{s3_bucket}/out"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{url}/step_200.safetensors" in err and "truncated" in err
    assert objects(s3_server, s3_bucket, "out") == {}


def test_issue22_missing_input_object_exits_2_and_uploads_nothing(tmp_path, s3_server, s3_bucket, capsys) -> None:
    write_run(tmp_path / "run")
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "run")
    code = main(["merge", "--checkpoints", f"{url}/step_100.safetensors", f"{url}/step_999.safetensors",
                 "-o", f"s3://{s3_bucket}/out"])
    err = capsys.readouterr().err
    assert code == 2 and f"{url}/step_999.safetensors" in err
    assert objects(s3_server, s3_bucket, "out") == {}


def test_issue22_refuses_a_prefix_holding_objects_it_did_not_write(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """No --force: any object refuses; --force: only an earlier merge output of ours is replaced."""
    paths = [str(p) for p in write_run(tmp_path / "run")]
    client(s3_server).put_object(Bucket=s3_bucket, Key="theirs/notes.txt", Body=b"keep me")
    for force in ([], ["--force"]):
        reset_stores()
        assert main(["merge", "--checkpoints", *paths, "-o", f"s3://{s3_bucket}/theirs", *force]) == 2
    err = capsys.readouterr().err
    assert "already holds 1 object" in err and "a merge does not write (e.g. notes.txt)" in err
    assert set(objects(s3_server, s3_bucket, "theirs")) == {"notes.txt"}
    assert main(["merge", "--checkpoints", *paths[:2], "-o", f"s3://{s3_bucket}/ours", "--out-shard-size", "400KB"]) == 0
    reset_stores()
    assert main(["merge", "--checkpoints", *paths, "-o", f"s3://{s3_bucket}/ours"]) == 2
    reset_stores()
    assert main(["merge", "--checkpoints", *paths, "-o", f"s3://{s3_bucket}/ours", "--force"]) == 0
    # the earlier sharded output is gone entirely, the new single-file one is complete
    assert set(objects(s3_server, s3_bucket, "ours")) == {"model.safetensors", "recipe.yaml", "mergekit_config.yml"}
    recipe = yaml.safe_load(client(s3_server).get_object(Bucket=s3_bucket, Key="ours/recipe.yaml")["Body"].read())
    assert len(recipe["checkpoints"]) == 3


def test_issue22_dry_run_on_urls_reads_sizes_from_the_listing(tmp_path, s3_server, s3_bucket, capsys) -> None:
    paths = write_run(tmp_path / "run")
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "run")
    capsys.readouterr()
    assert main(["merge", "--checkpoints", f"{url}/step_*.safetensors", "-o", f"s3://{s3_bucket}/out",
                 "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [i["bytes"] for i in doc["inputs"]] == [p.stat().st_size for p in paths]
    assert doc["out_dir"] == f"s3://{s3_bucket}/out" and not doc["replaces_existing"]
    assert objects(s3_server, s3_bucket, "out") == {}


def test_issue22_killed_merge_to_s3_leaves_no_index_or_recipe(tmp_path, s3_server, s3_bucket) -> None:
    """kill -9 while shards upload: no index, no recipe; our reader calls the prefix incomplete."""
    gen = torch.Generator().manual_seed(0)
    folder = tmp_path / "big"
    folder.mkdir()
    names = []
    for step in (1, 2):   # 8 tensors of 2 MiB (fp32): 16 shards of ~2 MB
        save_file({f"w{i}": torch.randn(512, 1024, generator=gen) for i in range(8)}, folder / f"s{step}.safetensors")
        names.append(str(folder / f"s{step}.safetensors"))
    options = json.dumps({"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}})
    # its own temp root: a bucket merge in another test worker on this host would otherwise clean
    # this killed merge's scratch (as it should) before the check below looks for it
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch_root)}
    proc = subprocess.Popen([sys.executable, "-m", "analysis", "merge", "--checkpoints", *names,
                             "-o", f"s3://{s3_bucket}/killed", "--out-shard-size", "2MB", "--storage-options", options],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if any(n.startswith("model-") for n in objects(s3_server, s3_bucket, "killed")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = objects(s3_server, s3_bucket, "killed")
    assert any(n.startswith("model-") for n in listed)
    assert "recipe.yaml" not in listed and "model.safetensors.index.json" not in listed
    reset_stores()
    note = incomplete_output(RemotePath(f"s3://{s3_bucket}/killed"))
    assert note is not None and "incomplete merge output" in note and "recipe.yaml" in note
    # its local scratch (one shard at most) goes with the next bucket merge on this host
    scratch = list(scratch_root.glob(f"ckpt-select-merge-{socket.gethostname()}-{proc.pid}-*"))
    assert len(scratch) == 1 and scratch[0].is_dir()
    assert remove_stale_scratch(scratch_root) == scratch and not scratch[0].exists()
    # the killed merge's shards carry our marker: --force replaces them, and the result is complete
    assert main(["merge", "--checkpoints", *names, "-o", f"s3://{s3_bucket}/killed", "--force",
                 "--out-shard-size", "2MB"]) == 0
    reset_stores()
    assert incomplete_output(RemotePath(f"s3://{s3_bucket}/killed")) is None


@pytest.mark.parametrize("target", ["s3", "local"])
def test_issue22_failed_merge_removes_the_shards_it_uploaded(tmp_path, s3_server, s3_bucket, target) -> None:
    """An input object truncated mid-merge (after shards were written): RemoteError naming its URL, and
    every object this merge uploaded is deleted again (the prefix is empty), or no local folder is left."""
    from analysis.errors import RemoteError
    from analysis.merge import merge_checkpoints
    from analysis.run import checkpoint_ref

    gen = torch.Generator().manual_seed(1)
    for step in (1, 2):
        save_file({f"w{i}": torch.randn(512, 1024, generator=gen) for i in range(8)}, tmp_path / f"s{step}.safetensors")
    url = upload_tree(tmp_path, s3_server.endpoint, s3_bucket, "run")
    refs = [checkpoint_ref(f"{url}/s{step}.safetensors") for step in (1, 2)]
    seen: list[str] = []

    out = tmp_path / "merged"
    out.mkdir()

    def progress(fraction: float, message: str) -> None:
        if fraction > 0.4 and not seen:   # shards already written: truncate the newest input
            seen.extend(objects(s3_server, s3_bucket, "out") if target == "s3" else
                        [p.name for p in out.rglob("model-*")])
            client(s3_server).put_object(Bucket=s3_bucket, Key="run/s2.safetensors",
                                         Body=(tmp_path / "s2.safetensors").read_bytes()[:3_000_000])

    destination = f"s3://{s3_bucket}/out" if target == "s3" else out / "m"
    with pytest.raises(RemoteError) as caught:
        merge_checkpoints(refs, [0.5, 0.5], destination, progress=progress, out_shard_size=2_000_000)
    assert caught.value.url == f"{url}/s2.safetensors" and "truncated object" in caught.value.reason
    assert any(name.startswith("model-") for name in seen)
    assert objects(s3_server, s3_bucket, "out") == {} and list(out.iterdir()) == []


def test_issue22_merge_refuses_an_incomplete_merge_output_as_input(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """A sharded merge output whose recipe (the commit marker) is missing is not taken as a checkpoint."""
    paths = [str(p) for p in write_run(tmp_path / "run")]
    assert main(["merge", "--checkpoints", *paths, "-o", f"s3://{s3_bucket}/m", "--out-shard-size", "400KB"]) == 0
    client(s3_server).delete_object(Bucket=s3_bucket, Key="m/recipe.yaml")
    reset_stores()
    capsys.readouterr()
    assert main(["merge", "--checkpoints", f"s3://{s3_bucket}/m/model.safetensors.index.json", paths[0],
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "an incomplete merge output (no recipe.yaml" in err and not (tmp_path / "out").exists()


def test_issue22_sha256_of_remote_inputs_from_ranged_reads(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """--sha256 on remote inputs: the recipe's sha256 equals sha256sum of each file, hashed from the merge's own
    ranged reads plus the gaps (headers), never a second download; --verify full then checks it."""
    import hashlib

    paths = write_run(tmp_path / "run")
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "run")
    capsys.readouterr()
    assert main(["merge", "--checkpoints", f"{url}/step_*.safetensors", "-o", str(tmp_path / "m"), "--sha256",
                 "--json"]) == 0
    io = json.loads(capsys.readouterr().out)["io"]["s3"]
    recipe = yaml.safe_load((tmp_path / "m" / "recipe.yaml").read_text())
    assert [c["sha256"] for c in recipe["checkpoints"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert io["bytes_read"] <= sum(p.stat().st_size for p in paths) + 3 * 2 * 100_000
    recipe_url = upload_tree(tmp_path / "m", s3_server.endpoint, s3_bucket, "m") + "/recipe.yaml"
    reset_stores()
    assert main(["merge", recipe_url, "-o", str(tmp_path / "again"), "--verify", "full"]) == 0
    assert_same_model(tmp_path / "m", tmp_path / "again")
    assert main(["export", recipe_url]) == 0
    assert f"model: {url}/step_300.safetensors" in capsys.readouterr().out


def test_issue22_hf_sharded_folders_s3_to_s3_load_with_from_pretrained(tmp_path, s3_server, s3_bucket) -> None:
    """Sharded Hugging Face folders in a bucket merged into a bucket: side files copied by range reads, the
    downloaded output loads with from_pretrained and equals the local merge bit for bit."""
    import transformers

    from ckpt_factories import hf_checkpoint

    for step in (10, 20):
        hf_checkpoint(tmp_path / "run" / f"checkpoint-{step}", step, seed=step, shard=True)
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "run")
    local = [str(tmp_path / "run" / f"checkpoint-{s}") for s in (10, 20)]
    assert main(["merge", "--checkpoints", *local, "-o", str(tmp_path / "local")]) == 0
    assert main(["merge", "--checkpoints", f"{url}/checkpoint-*", "-o", f"s3://{s3_bucket}/out"]) == 0
    listed = objects(s3_server, s3_bucket, "out")
    assert {"config.json", "model.safetensors.index.json", "recipe.yaml"} <= set(listed)
    back = download(s3_server, s3_bucket, "out", tmp_path / "back")
    assert_same_model(tmp_path / "local", back)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(back))
    expected = tensors_of(tmp_path / "local")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items() if k in model.state_dict())


def test_issue22_many_windows_mixed_local_remote_and_dtypes(tmp_path, s3_server, s3_bucket, monkeypatch) -> None:
    """Small windows and request parts (tensors span many windows, windows many requests), a local input
    beside remote ones, a float32 input beside bfloat16 ones: still bit-identical to the local merge."""
    from analysis.merge import read

    monkeypatch.setattr(read, "REMOTE_WINDOW_BYTES", 600_000)
    monkeypatch.setattr(read, "MIN_WINDOW_BYTES", 200_000)
    monkeypatch.setattr(read, "REMOTE_PART_BYTES", 100_000)
    paths = write_run(tmp_path / "run")
    wide = {k: (v.float() if v.is_floating_point() else v) for k, v in state(400).items()}
    save_file(wide, tmp_path / "run" / "step_400.safetensors")
    paths.append(tmp_path / "run" / "step_400.safetensors")
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "run")
    assert main(["merge", "--checkpoints", *map(str, paths), "-o", str(tmp_path / "local"), "--dtype", "float32"]) == 0
    mixed = [str(paths[0]), f"{url}/step_200.safetensors", f"{url}/step_300.safetensors", f"{url}/step_400.safetensors"]
    assert main(["merge", "--checkpoints", *mixed, "-o", f"s3://{s3_bucket}/mixed", "--dtype", "float32"]) == 0
    assert_same_model(tmp_path / "local", download(s3_server, s3_bucket, "mixed", tmp_path / "back"))


def test_issue22_incomplete_output_names_a_missing_or_resized_shard(tmp_path, s3_server, s3_bucket) -> None:
    """The completeness rule: recipe present is not enough, every shard the index names must be there at its size."""
    paths = [str(p) for p in write_run(tmp_path / "run")]
    assert main(["merge", "--checkpoints", *paths, "-o", f"s3://{s3_bucket}/m", "--out-shard-size", "400KB"]) == 0
    reset_stores()
    prefix = RemotePath(f"s3://{s3_bucket}/m")
    assert incomplete_output(prefix) is None
    client(s3_server).put_object(Bucket=s3_bucket, Key="m/model-00002-of-00005.safetensors", Body=b"short")
    reset_stores()
    note = incomplete_output(RemotePath(f"s3://{s3_bucket}/m"))
    assert note is not None and "shard model-00002-of-00005.safetensors named by the index" in note
    client(s3_server).delete_object(Bucket=s3_bucket, Key="m/model-00002-of-00005.safetensors")
    reset_stores()
    assert "missing or of the wrong size" in incomplete_output(RemotePath(f"s3://{s3_bucket}/m"))
    # a folder that is no merge output (no marker anywhere) is not called incomplete
    assert incomplete_output(RemotePath(upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "plain"))) is None
