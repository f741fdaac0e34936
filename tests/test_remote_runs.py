"""Runs read straight from object storage (issue 22): discovery, readers, budgets, caches, errors, the CLI.

Every run here is made by the real libraries (safetensors, torch.save, transformers, torch DCP), uploaded
with boto3 to moto's S3 server on 127.0.0.1 (``s3_server``), and read back by URL; the results are
compared with the same run read from disk, and requests and bytes are counted at the server.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from analysis.checkpoints import open_checkpoint
from analysis.checkpoints import safetensors_file, torch_remote
from analysis.cli import main
from analysis.errors import InvalidArgument, RemoteError
from analysis.paths import is_within, resolve_within
from analysis.remote import RemotePath, set_storage_options
from analysis.run import open_run
from ckpt_factories import dcp_checkpoint, hf_checkpoint, lightning_ckpt, nanogpt_ckpt
from conftest import upload_tree, write_tiny_run
from remote_checks import safetensors_run, same_recommendation, same_run, same_tensors


# --- discovery and readers ------------------------------------------------------------------------------

def test_hf_trainer_run_by_url_equals_the_local_run(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: checkpoint-N folders (single and sharded safetensors, optimizer.pt, trainer_state.json) by URL."""
    run = tmp_path / "hf"
    hf_checkpoint(run / "checkpoint-100", 100, seed=0)
    hf_checkpoint(run / "checkpoint-200", 200, seed=1, shard=True)
    (run / "train_log.csv").write_text("step,loss\n" + "".join(f"{s},{3 - s / 100:.3f}\n" for s in range(1, 201)))
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "runs/hf")
    s3_server.counts.reset()
    remote = open_run(url)
    assert s3_server.counts.requests.get("GET", 0) >= 1
    local = open_run(run)
    same_run(local, remote)
    assert str(remote.path) == url and str(remote.checkpoints[0].path) == f"{url}/checkpoint-100"
    assert [r.layout for r in remote.checkpoints] == ["hf_folder", "hf_folder"]
    for a, b in zip(local.checkpoints, remote.checkpoints):
        same_tensors(a, b)
        with open_checkpoint(a.path) as x, open_checkpoint(b.path) as y:   # optimizer.pt, fetched whole (small)
            assert [i.name for i in x.optimizer_state()] == [i.name for i in y.optimizer_state()]
            first = x.optimizer_state()[0].name
            assert torch.equal(x.read_optimizer(first), y.read_optimizer(first))


def test_torch_pt_run_by_url_equals_the_local_run(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: nanoGPT ckpt.pt and Lightning .ckpt files, read weights-only from fetched bytes."""
    run = tmp_path / "pt"
    run.mkdir()
    nanogpt_ckpt(run / "ckpt_250.pt", seed=0, iter_num=250)
    nanogpt_ckpt(run / "ckpt_500.pt", seed=1, iter_num=500)
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "pt")
    local, remote = open_run(run), open_run(url)
    same_run(local, remote)
    assert [(r.step, r.step_source, r.layout) for r in remote.checkpoints] == \
        [(250, "metadata", "torch_pickle"), (500, "metadata", "torch_pickle")]
    for a, b in zip(local.checkpoints, remote.checkpoints):
        same_tensors(a, b)


def test_lightning_versions_by_url_are_the_same_runs(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: a folder of Lightning version_N runs: find_runs and open_run(run_name=) agree with the local copy."""
    from analysis.run import find_runs

    root = tmp_path / "lightning_logs"
    for version, steps in ((0, (100, 200)), (1, (100, 300))):   # version_1 starts over: a run of its own
        folder = root / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        for index, step in enumerate(steps):
            lightning_ckpt(folder / f"epoch={index}-step={step}.ckpt", seed=step + version, global_step=step)
        (root / f"version_{version}" / "metrics.csv").write_text(
            "epoch,step,train_loss\n" + "".join(f"0,{s},{2 - s / 1000}\n" for s in range(steps[0] - 50, steps[1])))
    url = upload_tree(root, s3_server.endpoint, s3_bucket, "lightning_logs")
    local, remote = find_runs(root), find_runs(url)
    assert [(r.name, str(r.path.relative_to(root)), r.steps) for r in local] == \
        [(r.name, str(r.path.relative_to(RemotePath(url))), r.steps) for r in remote]
    assert [r.name for r in remote] == ["version_0", "version_1"]
    a, b = open_run(root, run_name="version_1"), open_run(url, run_name="version_1")
    same_run(a, b)
    assert [(r.step, r.layout) for r in b.checkpoints] == [(100, "torch_pickle"), (300, "torch_pickle")]
    same_tensors(a.checkpoints[0], b.checkpoints[0])


def test_large_torch_file_is_read_lazily_each_tensor_by_its_own_range(tmp_path, s3_server, s3_bucket,
                                                                       monkeypatch) -> None:
    """issue 22: above WHOLE_FILE_BYTES a torch.save zip is never fetched whole: its ends (zip directory and
    data.pkl) once, then each storage by its own exact range, only when read."""
    state = {f"layer{i}.weight": torch.randn(256, 256) for i in range(6)}   # 6 x 256 KiB
    state["layer0.view"] = state["layer0.weight"][3:5]   # a view sharing a storage
    lightning = {"state_dict": state, "global_step": torch.tensor(900), "epoch": 3}
    torch.save(lightning, tmp_path / "last.ckpt")
    size = (tmp_path / "last.ckpt").stat().st_size
    url = upload_tree(tmp_path, s3_server.endpoint, s3_bucket, "big")
    monkeypatch.setattr(torch_remote, "WHOLE_FILE_BYTES", 1 << 20)
    monkeypatch.setattr(torch_remote, "HEAD_BYTES", 64 << 10)
    monkeypatch.setattr(torch_remote, "TAIL_BYTES", 16 << 10)
    path = RemotePath(url) / "last.ckpt"
    path.stat()
    s3_server.counts.reset()
    with open_checkpoint(path) as handle:
        opened = dict(s3_server.counts.requests), s3_server.counts.get_bytes
        assert handle.metadata()["step"] == "900"   # a scalar tensor: read at load time
        assert opened[1] < 200_000, opened          # the ends and the scalars, no weights
        for name, tensor in state.items():
            before_gets, before_bytes = s3_server.counts.gets, s3_server.counts.get_bytes
            assert torch.equal(handle.read(name), tensor), name
            # one exact range per tensor (a view fetches only the elements it spans)
            assert s3_server.counts.gets - before_gets == 1
            assert s3_server.counts.get_bytes - before_bytes == tensor.numel() * 4
    assert s3_server.counts.get_bytes < size + 100_000   # never the whole file twice: each storage once


def test_dcp_folder_by_url(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: a torch.distributed.checkpoint folder read by URL, .distcp data by ranged, counted reads."""
    saved = dcp_checkpoint(tmp_path / "step-40", step=40)
    url = upload_tree(tmp_path, s3_server.endpoint, s3_bucket, "dcp")
    remote = open_run(url)
    assert [(r.step, r.layout) for r in remote.checkpoints] == [(40, "dcp")]
    with open_checkpoint(remote.checkpoints[0].path) as handle:
        assert {i.name for i in handle.tensors()} == set(saved)
        for name, tensor in saved.items():
            assert torch.equal(handle.read(name), tensor)
        assert handle.optimizer_state()
    from analysis.remote import all_stats
    assert all_stats()["s3"]["bytes_read"] > 0


def test_logs_by_url_jsonl_csv_trainer_state_and_text(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: every log reader reads through RemotePath: the tables equal the local ones."""
    write_tiny_run(tmp_path / "run", [50, 100])
    run = tmp_path / "run"
    (run / "progress.csv").write_text("step,eval_acc\n" + "".join(f"{s},{s / 1000}\n" for s in range(10, 110, 10)))
    (run / "stdout.log").write_text("".join(f"iter {s}: loss {4 - s / 100:.4f}, time 12.00ms, mfu 1.00%\n"
                                            for s in range(0, 100)))
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "logs")
    local, remote = open_run(run), open_run(url)
    same_run(local, remote)
    assert {t.format for t in remote.logs} == {t.format for t in local.logs} and len(remote.logs) == 3
    assert main(["logs", f"{url}/progress.csv", "--json"]) == 0


def test_tensorboard_event_file_by_url(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: tbparse opens files by name: a remote event file is fetched to a temporary copy."""
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    with tensorboard.SummaryWriter(str(tmp_path / "tb")) as writer:
        for step in range(1, 30):
            writer.add_scalar("train/loss", 3.0 / step, step)
    url = upload_tree(tmp_path / "tb", s3_server.endpoint, s3_bucket, "tb")
    from analysis.logs import read_log
    event = next((tmp_path / "tb").glob("events.out.tfevents*"))
    local, remote = read_log(event), read_log(f"{url}/{event.name}")
    assert remote.rows == local.rows == 29 and remote.frame.equals(local.frame)


def test_memory_urls_take_the_generic_fsspec_path(tmp_path) -> None:
    """issue 22: any fsspec protocol: a run in fsspec's memory file system, written by fsspec itself."""
    import fsspec

    run = write_tiny_run(tmp_path / "run", [50, 100, 150])
    fs = fsspec.filesystem("memory")
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        fs.pipe_file(f"/mem-run/{path.relative_to(run).as_posix()}", path.read_bytes())
    try:
        remote, local = open_run("memory://mem-run"), open_run(run)
        same_run(local, remote)
        same_tensors(local.checkpoints[-1], remote.checkpoints[-1])
    finally:
        fs.rm("/mem-run", recursive=True)


# --- budgets, counted at the server -------------------------------------------------------------------------

def test_listing_k_checkpoints_costs_two_requests_per_file_plus_one_listing(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22 budget: headers only (tensors listed, no tensor read): at most 2 requests per file + 1 listing."""
    k = 5
    run = safetensors_run(tmp_path / "run", k)
    (run / "metrics.jsonl").unlink()
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "budget")
    s3_server.counts.reset()
    remote = open_run(url)
    for ref in remote.checkpoints:
        with open_checkpoint(ref.path) as handle:
            assert len(handle.tensors()) == 8
    assert len(remote.checkpoints) == k
    assert s3_server.counts.requests == {"GET": s3_server.counts.gets}   # reads only: no HEAD per file
    assert s3_server.counts.gets <= 2 * k + 1, s3_server.counts.requests
    assert s3_server.counts.get_bytes < k * 120_000   # a header's first guess, never a tensor


def test_analyze_of_a_remote_run_fetches_at_most_105_percent_of_the_local_bytes(tmp_path, s3_server, s3_bucket,
                                                                                  monkeypatch, capsys) -> None:
    """issue 22 budget: `analyze --json` by URL fetches <= 1.05 x the bytes the local analysis reads, and
    both give the same checkpoints, similarities and recommendation."""
    k = 4
    run = safetensors_run(tmp_path / "run", k)
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "analyze")
    local_bytes = _count_local_reads(monkeypatch)
    assert main(["analyze", str(run), "--json"]) == 0
    local_doc = json.loads(capsys.readouterr().out)
    local_read = local_bytes["tensors"] + local_bytes["headers"] + (run / "metrics.jsonl").stat().st_size
    assert local_bytes["tensors"] >= k * 4 * (1 << 20)   # every tensor read at least once
    monkeypatch.undo()
    s3_server.counts.reset()
    assert main(["analyze", url, "--json"]) == 0
    remote_doc = json.loads(capsys.readouterr().out)
    served = s3_server.counts.get_bytes
    assert served <= 1.05 * local_read, (served, local_read)
    io = remote_doc.pop("io")["s3"]
    assert io["bytes_read"] <= served and io["requests"] >= k and io["retries"] == 0 and io["listings"] == 1
    assert "io" not in local_doc
    _same_analysis(local_doc, remote_doc)
    remote_rec = same_recommendation(main, capsys, str(run), url)
    assert remote_rec["recipe"]["checkpoints"][0]["path"].startswith(url)   # the recipe records URLs


def _count_local_reads(monkeypatch) -> dict[str, int]:
    """Bytes a local analysis reads: each tensor a safetensors handle returns, each header parsed."""
    counts = {"tensors": 0, "headers": 0}
    read, header = safetensors_file.SafetensorsHandle.read, safetensors_file._read_raw_header_of

    def counted_read(self, name):
        tensor = read(self, name)
        counts["tensors"] += tensor.numel() * tensor.element_size()
        return tensor

    def counted_header(path):
        size, length, raw = header(path)
        counts["headers"] += 8 + length
        return size, length, raw

    monkeypatch.setattr(safetensors_file.SafetensorsHandle, "read", counted_read)
    monkeypatch.setattr(safetensors_file, "_read_raw_header_of", counted_header)
    return counts


def _same_analysis(local: dict, remote: dict) -> None:
    """Same checkpoints, steps, health and similarity numbers; only the paths differ (file vs URL)."""
    keys = ("step", "finite", "bytes", "val_loss", "spike_contaminated")
    assert [{k: c.get(k) for k in keys} for c in local["checkpoints"]] == \
        [{k: c.get(k) for k in keys} for c in remote["checkpoints"]]
    assert json.dumps(local.get("similarity"), sort_keys=True) == json.dumps(remote.get("similarity"), sort_keys=True)


# --- caches ----------------------------------------------------------------------------------------------------

def test_a_changed_object_is_read_again_its_etag_keys_the_caches(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: the sketch cache and the run fingerprint key an object by URL + size + ETag, not a time."""
    import boto3

    from analysis.signals.sketch import sketch_checkpoint
    run = write_tiny_run(tmp_path / "run", [50, 100])
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "etag")
    first = open_run(url)
    before = sketch_checkpoint(first.checkpoints[-1])
    again = sketch_checkpoint(open_run(url).checkpoints[-1])   # cached: equal, and no tensor fetched
    assert all(torch.equal(before.weights[n], again.weights[n]) for n in before.weights)
    changed = {k: (v * 2 if v.is_floating_point() else v) for k, v in
               __import__("safetensors.torch", fromlist=["load_file"]).load_file(
                   run / "ckpt" / "step_000100.safetensors").items()}
    save_file(changed, str(tmp_path / "same_size.safetensors"), metadata={"step": "100"})
    assert (tmp_path / "same_size.safetensors").stat().st_size == (run / "ckpt" / "step_000100.safetensors").stat().st_size
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").upload_file(
        str(tmp_path / "same_size.safetensors"), s3_bucket, "etag/ckpt/step_000100.safetensors")
    second = open_run(url)
    assert second.fingerprint != first.fingerprint
    after = sketch_checkpoint(second.checkpoints[-1])
    assert not torch.equal(after.weights["layer.weight"], before.weights["layer.weight"])


# --- errors and the CLI ----------------------------------------------------------------------------------------

def test_missing_prefix_bucket_and_object_are_one_line_exit_2(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """issue 22: a missing prefix, bucket or object: exit 2, one line naming the URL."""
    cases = [["analyze", f"s3://{s3_bucket}/no-such-run"], ["analyze", "s3://no-such-bucket-here/run"],
             ["logs", f"s3://{s3_bucket}/none/metrics.jsonl"]]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and argv[1] in err and "Traceback" not in err, err


def test_truncated_object_is_an_error_naming_the_url(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: an object shorter than when it was listed: a RemoteError naming it, never short data."""
    import boto3

    run = write_tiny_run(tmp_path / "run", [50])
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "trunc")
    path = RemotePath(f"{url}/ckpt/step_000050.safetensors")
    size = path.stat().st_size   # listed at its full size
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").put_object(
        Bucket=s3_bucket, Key="trunc/ckpt/step_000050.safetensors", Body=b"\0" * (size // 2))
    with pytest.raises(RemoteError, match=rf"{path.url}: truncated object"):
        path.read_range(0, size)        # short data
    with pytest.raises(RemoteError, match=rf"{path.url}: truncated object"):
        path.read_range(size - 16, size)   # past its end now (HTTP 416)


def test_refused_credentials_are_exit_2_without_showing_them(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """issue 22: --storage-options sets the endpoint and keys for the process; its values are never printed."""
    run = write_tiny_run(tmp_path / "run", [50, 100])
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "opts")
    set_storage_options(None)
    secret = "s3cr3t-never-shown"
    options = json.dumps({"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": secret}})
    assert main(["--storage-options", options, "analyze", url, "--no-similarity", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["io"]["s3"]["requests"] > 0 and secret not in out + err
    assert main(["--storage-options", "{not json", "analyze", url]) == 2
    err = capsys.readouterr().err
    assert "--storage-options" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(InvalidArgument):
        set_storage_options("[1, 2]")


def test_stop_storage_and_recommend_accept_urls(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """issue 22: stop, storage --run and recommend take a URL; --json reports the listing made."""
    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "cmds")
    assert main(["stop", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["io"]["s3"]["listings"] == 1
    assert main(["storage", "--run", url, "--json"]) == 0
    assert "io" in json.loads(capsys.readouterr().out)
    assert main(["recommend", url]) == 0
    assert "step" in capsys.readouterr().out


def test_watch_follows_a_run_by_url(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """issue 22: watch takes a URL (each look: one listing; unchanged objects are not fetched again)."""
    run = write_tiny_run(tmp_path / "run", [50, 100, 150])
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "watch")
    assert main(["watch", url, "--json", "--every", "0.1", "--until-step", "150"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert events and events[-1]["step"] == 150


# --- ui --root with a URL prefix --------------------------------------------------------------------------------

def test_url_roots_confine_by_whole_key_components(s3_bucket) -> None:
    """issue 22: `..` is normalised; protocol, bucket and whole prefix components must match."""
    root = f"s3://{s3_bucket}/runs"
    assert str(resolve_within(f"{root}/a/../b", root)) == f"{root}/b"
    assert str(resolve_within("a/run", root)) == f"{root}/a/run"
    for outside in (f"{root}/../secret", f"s3://{s3_bucket}/runs2/x", "s3://other-bucket/runs/x",
                    "memory://runs/x", "/etc", "../x"):
        with pytest.raises(InvalidArgument, match="outside the allowed"):
            resolve_within(outside, root)
        assert not is_within(outside, root)
    assert is_within(f"{root}/x/y", root) and is_within(root, root) and not is_within("/tmp", root)
    with pytest.raises(InvalidArgument):
        open_run(f"s3://{s3_bucket}/elsewhere", root=root)


def test_deepspeed_and_megatron_folders_by_url(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: DeepSpeed global_stepN/ tags and Megatron iter_N/mp_rank_TT/ shards, read by URL as on disk."""
    from test_field_layouts import mcore_state_dict, write_deepspeed_run, write_megatron_legacy

    write_deepspeed_run(tmp_path / "ds")
    write_megatron_legacy(tmp_path / "mg" / "iter_0000100", mcore_state_dict(seed=1), 100, tp=2)
    for name in ("ds", "mg"):
        url = upload_tree(tmp_path / name, s3_server.endpoint, s3_bucket, name)
        local, remote = open_run(tmp_path / name), open_run(url)
        same_run(local, remote)
        assert {r.layout for r in remote.checkpoints} == {"deepspeed" if name == "ds" else "megatron"}
        same_tensors(local.checkpoints[-1], remote.checkpoints[-1])


def test_refused_request_403_is_one_line_exit_2(tmp_path, s3_server, s3_bucket, capsys, monkeypatch) -> None:
    """issue 22: a 403 (keys the server does not know: moto's IAM checks switched on) is exit 2 naming the URL."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    run = write_tiny_run(tmp_path / "run", [50])
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "denied")
    # What moto's /moto-api/reset-auth does: check every request's credentials from now on (the server is in-process).
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    assert main(["analyze", url]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and url in err and "access denied" in err, err
    assert "testing" not in err   # the key is not shown


def test_looking_again_at_an_unchanged_run_costs_one_listing(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: what watch and the app do each look: the listing again; headers and small logs whose ETag
    did not change are not fetched again."""
    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "again")
    first = open_run(url)
    s3_server.counts.reset()
    second = open_run(url)
    assert s3_server.counts.requests == {"GET": 1}
    assert second.fingerprint == first.fingerprint and len(second.checkpoints) == 12


# --- the whole story: a run in a bucket, recommended and merged by URL --------------------------------------

def test_remote_run_recommended_and_merged_to_bucket_and_disk(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """issue 22 "done when": a run uploaded to S3 is analyzed, recommended (the recipe records URLs, ETags and
    sizes, without downloading the checkpoints to hash them) and merged to S3 and to local disk, bit-identical
    to the same recipe merged from the local copy."""
    from analysis.recipe import load_recipe

    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "story")
    assert main(["analyze", url, "--json"]) == 0
    capsys.readouterr()
    s3_server.counts.reset()
    recipe = tmp_path / "recipe.yaml"
    assert main(["recommend", url, "-o", str(recipe)]) == 0
    capsys.readouterr()
    # analyzed before, so the recommendation costs one listing: no checkpoint is downloaded to hash it
    assert s3_server.counts.requests == {"GET": 1} and s3_server.counts.ranged_gets == 0
    entries = load_recipe(recipe).checkpoints
    assert entries and all(str(e.path).startswith(f"s3://{s3_bucket}/story/") for e in entries)
    assert all(e.etag and e.size_bytes > 0 and not e.sha256 for e in entries)

    assert main(["merge", str(recipe), "-o", str(tmp_path / "on-disk")]) == 0
    assert main(["merge", str(recipe), "-o", f"s3://{s3_bucket}/merged"]) == 0
    local_recipe = tmp_path / "local.yaml"
    local_recipe.write_text(recipe.read_text().replace(f"s3://{s3_bucket}/story", str(run)))
    assert main(["merge", str(local_recipe), "-o", str(tmp_path / "from-local"), "--verify", "none"]) == 0
    capsys.readouterr()
    expected = open_checkpoint(next((tmp_path / "from-local").glob("*.safetensors")))
    for merged in (open_checkpoint(next((tmp_path / "on-disk").glob("*.safetensors"))),
                   open_checkpoint(f"s3://{s3_bucket}/merged/model.safetensors")):
        with merged:
            assert merged.tensors() == expected.tensors()
            for info in expected.tensors():
                assert torch.equal(merged.read(info.name), expected.read(info.name)), info.name
    expected.close()


def test_recipes_written_to_a_bucket_and_foreign_objects_kept(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """issue 22: recommend -o and export -o take URLs (one PUT, whole or nothing); an object CkptSelect did not
    write is never replaced without --force, a checkpoint name never at all; the URL recipe merges."""
    import boto3

    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "rec")
    recipe_url = f"s3://{s3_bucket}/recipes/rec.yaml"
    assert main(["recommend", url, "-o", recipe_url]) == 0
    assert main(["export", recipe_url, "--format", "mergekit", "-o", f"s3://{s3_bucket}/recipes/mk.yaml"]) == 0
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    body = client.get_object(Bucket=s3_bucket, Key="recipes/rec.yaml")["Body"].read().decode()
    assert "ckpt_select_recipe" in body and f"s3://{s3_bucket}/rec/" in body and "testing" not in body
    assert "merge_method: linear" in client.get_object(Bucket=s3_bucket, Key="recipes/mk.yaml")["Body"].read().decode()
    assert main(["recommend", url, "-o", recipe_url]) == 0          # our own recipe: replaced
    client.put_object(Bucket=s3_bucket, Key="recipes/notes.yaml", Body=b"my notes\n")
    capsys.readouterr()
    assert main(["recommend", url, "-o", f"s3://{s3_bucket}/recipes/notes.yaml"]) == 2
    assert "exists and is not a recipe" in capsys.readouterr().err
    assert client.get_object(Bucket=s3_bucket, Key="recipes/notes.yaml")["Body"].read() == b"my notes\n"
    assert main(["recommend", url, "-o", f"{url}/step_000600.safetensors"]) == 2
    assert main(["merge", recipe_url, "-o", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_storage_options_after_the_command_name_too(tmp_path, s3_server, s3_bucket, capsys) -> None:
    """issue 22: `--storage-options` works after the command as before it, on every command that takes a URL."""
    from analysis.remote import reset_stores

    run = write_tiny_run(tmp_path / "run", [50, 100, 150])
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "opts")
    options = json.dumps({"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}})
    for argv in (["analyze", url, "--json"], ["stop", url, "--json"], ["logs", f"{url}/metrics.jsonl", "--json"],
                 ["recommend", url, "--json"]):
        set_storage_options(None)
        reset_stores()
        assert main([*argv, "--storage-options", options]) == 0, argv
        doc = json.loads(capsys.readouterr().out)
        assert options not in json.dumps(doc) and "testing" not in json.dumps(doc)
