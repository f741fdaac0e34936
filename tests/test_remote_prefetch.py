"""The sketch pass fetches a remote checkpoint's next tensors ahead, in windows (issue 22, read-ahead).

Checkpoints are written by safetensors, uploaded with boto3 to moto's S3 server (``s3_server``) and
sketched by URL; sketches, statistics and ``analyze --json`` are compared with the local files and
with the read-ahead turned off (``PREFETCH_BYTES = 0``: one request a tensor, as before), and
requests and bytes are counted at the server. Nothing here is timed (benchmarks/remote_analyze.py is).
"""

from __future__ import annotations

import json
import math
import threading
from contextlib import closing
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from analysis.checkpoints import open_checkpoint, readahead
from analysis.checkpoints.location import locate
from analysis.cli import main
from analysis.errors import RemoteError
from analysis.run import open_run
from analysis.signals.sketch import plan_sketch_units, sketch_checkpoint, sketch_unit
from conftest import upload_tree

SMALL = 32 * 32 * 4   # bytes of one small tensor


def _many_tensors(path: Path, step: int, n: int = 120, seed: int = 0) -> Path:
    """A checkpoint of ``n`` 4 KiB float32 tensors, a bf16 embedding, an fp16 norm, an int tensor (not
    sketched: a gap between the sketched tensors' bytes) and an empty tensor, as a trainer's small model."""
    gen = torch.Generator().manual_seed(seed + step)
    state = {f"layers.{i:03d}.weight": torch.randn(32, 32, generator=gen) for i in range(n)}
    state["embed.weight"] = torch.randn(300, 256, generator=gen).to(torch.bfloat16)
    state["norm.weight"] = torch.randn(64, generator=gen).to(torch.float16)
    state["position_ids"] = torch.arange(64)
    state["empty.bias"] = torch.empty(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"step": str(step)})
    return path


def _run(root: Path, k: int = 4, n: int = 120) -> Path:
    """K many-tensor checkpoints and a loss log."""
    for index in range(k):
        _many_tensors(root / f"step_{100 * (index + 1)}.safetensors", 100 * (index + 1), n)
    rows = [{"step": s, "train_loss": 3.0 * math.exp(-s / 200) + 1.0} for s in range(1, 100 * k + 1)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _same_sketch(a, b) -> None:
    """Bit for bit: every sketch, every exact statistic, the header counts."""
    assert list(a.weights) == list(b.weights) and list(a.stats) == list(b.stats)
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    assert a.stats == b.stats   # floats compared exactly
    assert (a.exact, a.n_tensors, a.bytes_by_dtype) == (b.exact, b.n_tensors, b.bytes_by_dtype)


def _floating_bytes(path: Path) -> tuple[int, int]:
    """(bytes, count) of the non-empty floating tensors: what a sketch pass must fetch, each once."""
    with open_checkpoint(path) as handle:
        sizes = [i.size_bytes for i in handle.tensors() if i.is_floating and i.size_bytes]
    return sum(sizes), len(sizes)


def _readahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sketch-readahead"]


def test_remote_sketch_with_readahead_equals_local_and_serial_bit_for_bit(tmp_path, s3_server, s3_bucket,
                                                                          monkeypatch) -> None:
    """issue 22 read-ahead: a remote checkpoint sketched from windows fetched ahead gives the local file's
    sketches and statistics bit for bit (bf16, fp16, fp32, an empty tensor, an int tensor skipped), and the
    same as one request a tensor."""
    local = _many_tensors(tmp_path / "run" / "step_100.safetensors", 100)
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "bits")
    ref_local, ref_remote = open_run(tmp_path / "run").checkpoints[0], open_run(url).checkpoints[0]
    monkeypatch.setattr(readahead, "WINDOW_BYTES", 64 << 10)   # many windows, a tensor larger than one
    ahead = sketch_checkpoint(ref_remote, use_cache=False)
    _same_sketch(sketch_checkpoint(ref_local, use_cache=False), ahead)
    monkeypatch.setattr(readahead, "PREFETCH_BYTES", 0)
    _same_sketch(ahead, sketch_checkpoint(ref_remote, use_cache=False))
    assert local.stat().st_size > 600_000 and len(ahead.weights) == 123 and not _readahead_threads()


def test_gets_drop_from_one_per_tensor_to_one_per_window_and_no_byte_twice(tmp_path, s3_server, s3_bucket,
                                                                           monkeypatch) -> None:
    """issue 22 read-ahead: sketching a checkpoint of 122 small tensors costs one GET a tensor serially and
    one a window (contiguous tensors coalesced) ahead; the server serves each sketched byte once."""
    path = _many_tensors(tmp_path / "run" / "step_100.safetensors", 100)
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "gets")
    ref = open_run(url).checkpoints[0]
    want_bytes, want_tensors = _floating_bytes(path)
    counts = {}
    for name, budget, window in (("serial", 0, None), ("ahead", 256 << 10, 64 << 10), ("default", None, None)):
        if budget is not None:
            monkeypatch.setattr(readahead, "PREFETCH_BYTES", budget)
            monkeypatch.setattr(readahead, "WINDOW_BYTES", window)
        else:
            monkeypatch.undo()
        s3_server.counts.reset()
        sketch_checkpoint(ref, use_cache=False)   # the header is kept in memory from the run's discovery
        counts[name] = (s3_server.counts.gets, s3_server.counts.get_bytes)
    assert counts["serial"] == (want_tensors, want_bytes) == (122, 120 * SMALL + 300 * 256 * 2 + 64 * 2)
    windows = math.ceil(want_bytes / (64 << 10))   # 64 KiB windows of 4 KiB tensors, the 150 KiB one alone
    assert windows <= counts["ahead"][0] <= windows + 3 and counts["ahead"][1] == want_bytes
    assert counts["default"] == (1, want_bytes)   # one window, the floating tensors one contiguous run


def test_analyze_json_of_a_remote_run_is_the_same_with_readahead(tmp_path, s3_server, s3_bucket, monkeypatch,
                                                                 capsys) -> None:
    """issue 22 read-ahead: `analyze --json` of a 4-checkpoint run by URL equals the local analysis and the
    one-request-a-tensor analysis (paths aside), in far fewer GETs, within 1.05 x the tensor and log bytes."""
    run = _run(tmp_path / "run")
    url = upload_tree(run, s3_server.endpoint, s3_bucket, "run")   # the same run name as the local folder
    docs = {}
    for name, target, budget in (("local", str(run), None), ("serial", url, 0), ("ahead", url, None)):
        monkeypatch.setenv("CKPT_SELECT_CACHE_DIR", str(tmp_path / f"cache-{name}"))   # each sketches anew
        if budget is not None:
            monkeypatch.setattr(readahead, "PREFETCH_BYTES", budget)
        s3_server.counts.reset()
        assert main(["analyze", target, "--json"]) == 0
        text = capsys.readouterr().out.replace(url, "RUN").replace(str(run), "RUN")
        docs[name] = (json.loads(text), s3_server.counts.gets, s3_server.counts.get_bytes)
        monkeypatch.undo()
    io = {name: docs[name][0].pop("io") for name in ("serial", "ahead")}
    assert docs["serial"][0] == docs["ahead"][0]
    local_print, remote_print = docs["local"][0].pop("fingerprint"), docs["ahead"][0].pop("fingerprint")
    assert docs["local"][0] == docs["ahead"][0] and local_print != remote_print   # identity: path+mtime vs URL+ETag
    tensor_bytes = sum(_floating_bytes(p)[0] for p in sorted(run.glob("*.safetensors")))
    assert docs["serial"][1] >= 4 * 122 and docs["ahead"][1] <= 4 * 2 + 2   # headers+tensor windows, listing, log
    assert docs["ahead"][2] <= 1.05 * (tensor_bytes + 4 * 100_000 + (run / "metrics.jsonl").stat().st_size)
    assert io["ahead"]["s3"]["requests"] == docs["ahead"][1] and io["ahead"]["s3"]["retries"] == 0


def test_bytes_ahead_stay_within_the_budget_and_a_larger_tensor_comes_alone(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22 read-ahead: with a 48 KiB budget (12 KiB windows) and a consumer that never hurries, at most 48
    KiB are ever fetched ahead, save the 150 KiB embedding, fetched alone once nothing else is ahead."""
    path = _many_tensors(tmp_path / "run" / "step_100.safetensors", 100, n=40)
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "budget")
    with open_checkpoint(f"{url}/step_100.safetensors") as remote, open_checkpoint(path) as local:
        infos = [i for i in remote.tensors() if i.is_floating]
        members = [readahead.Member(i, locate(remote, i.name)) for i in infos]
        windows = readahead.plan_windows(members, 12 << 10)
        peaks = []
        with readahead.Readahead(windows, 48 << 10) as ahead:
            for info in infos:
                assert torch.equal(ahead.tensor(info), local.read(info.name)), info.name
                peaks.append((info.name, ahead.peak))
    embed = 300 * 256 * 2
    assert [len(w) for w in windows if any(m.info.name == "embed.weight" for m in w)] == [1]
    before = [peak for name, peak in peaks[:[n for n, _ in peaks].index("embed.weight")]]
    assert len(before) >= 40 and max(before) <= 48 << 10
    assert ahead.peak == embed   # the embedding alone: nothing else was ahead while it was held
    assert not _readahead_threads()


def test_a_consumer_that_stops_early_stops_the_thread_and_fetches_at_most_the_budget(tmp_path, s3_server,
                                                                                     s3_bucket, monkeypatch) -> None:
    """issue 22 read-ahead: closing the pass after one tensor (a failed sketch) stops the thread; the server
    served no more than the budget ahead, never the whole checkpoint."""
    path = _many_tensors(tmp_path / "run" / "step_100.safetensors", 100, n=400)
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "early")
    monkeypatch.setattr(readahead, "WINDOW_BYTES", 64 << 10)
    with open_checkpoint(f"{url}/step_100.safetensors") as handle:
        infos = [i for i in handle.tensors() if i.is_floating]
        s3_server.counts.reset()
        with closing(readahead.read_in_order(handle, infos, budget=256 << 10)) as tensors:
            info, tensor = next(tensors)
        assert not _readahead_threads()
    with open_checkpoint(path) as local:
        assert torch.equal(tensor, local.read(info.name))
    assert s3_server.counts.get_bytes <= (256 << 10) + SMALL < _floating_bytes(path)[0] // 4


def test_a_vanished_object_is_one_error_naming_its_url_and_the_thread_ends(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22 read-ahead: an object deleted after its header was read fails the sketch with the RemoteError
    naming its URL (raised in the sketch, not lost on the thread), and no read-ahead thread is left behind."""
    import boto3

    _many_tensors(tmp_path / "run" / "step_100.safetensors", 100)
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "gone")
    ref = open_run(url).checkpoints[0]
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").delete_object(
        Bucket=s3_bucket, Key="gone/step_100.safetensors")
    with pytest.raises(RemoteError, match="step_100.safetensors"):
        sketch_checkpoint(ref, use_cache=False)
    assert not _readahead_threads()


def test_sketch_units_read_ahead_on_their_worker_and_equal_the_local_units(tmp_path, s3_server, s3_bucket,
                                                                           monkeypatch) -> None:
    """issue 22 read-ahead: the sketch units an executor (Ray) runs read their tensors ahead the same way and
    give the local units' parts bit for bit, in one GET a window; an empty first tensor is planned too."""
    path = _many_tensors(tmp_path / "run" / "step_100.safetensors", 100)
    url = upload_tree(tmp_path / "run", s3_server.endpoint, s3_bucket, "units")
    ref_local, ref_remote = open_run(tmp_path / "run").checkpoints[0], open_run(url).checkpoints[0]
    local_units = plan_sketch_units(0, ref_local, group_bytes=200 << 10)
    remote_units = plan_sketch_units(0, ref_remote, group_bytes=200 << 10)
    assert [u.names for u in local_units] == [u.names for u in remote_units] and len(remote_units) >= 3
    s3_server.counts.reset()
    for a, b in zip(map(sketch_unit, local_units), map(sketch_unit, remote_units)):
        assert a.stats == b.stats and a.bytes_read == b.bytes_read
        assert all(torch.equal(a.sketches[n], b.sketches[n]) for n in a.sketches)
    assert s3_server.counts.get_bytes == _floating_bytes(path)[0]
    assert s3_server.counts.gets <= 2 * len(remote_units)   # a header and a window a unit, not a tensor each


def test_local_files_keep_the_handles_own_reads(tmp_path) -> None:
    """issue 22 read-ahead: a local checkpoint is read through ``handle.read`` (no thread, no window)."""
    path = _many_tensors(tmp_path / "step_100.safetensors", 100, n=8)
    with open_checkpoint(path) as handle:
        infos = [i for i in handle.tensors() if i.is_floating]
        got = []
        for info, tensor in readahead.read_in_order(handle, infos):
            got.append(torch.equal(tensor, handle.read(info.name)))
            assert not _readahead_threads()
    assert got == [True] * len(infos) == [True] * 11
