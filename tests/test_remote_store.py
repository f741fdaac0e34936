"""The remote I/O layer against a real S3 server (moto, 127.0.0.1): exact ranges, one listing, errors (issue 22)."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

import torch
from analysis.checkpoints.safetensors_file import read_header
from analysis.errors import RemoteError
from analysis.remote import RemotePath, Store, is_transient, is_url
from conftest import upload_tree


def test_url_rules() -> None:
    assert is_url("s3://b/k") and is_url("memory://x") and is_url("hf://org/repo")
    assert not is_url("file:///tmp/x") and not is_url("/tmp/x") and not is_url("C:\\x")


def test_header_costs_one_ranged_request_and_tensor_its_exact_bytes(tmp_path, s3_server, s3_bucket) -> None:
    """A safetensors header is one ranged GET; listing the prefix is one request (issue 22)."""
    tensors = {f"w{i}": torch.full((256, 256), float(i)) for i in range(4)}   # 4 x 256 KiB
    save_file(tensors, tmp_path / "model.safetensors", metadata={"step": "7"})
    url = upload_tree(tmp_path, s3_server.endpoint, s3_bucket, "run")
    s3_server.counts.reset()
    path = RemotePath(url) / "model.safetensors"
    entries, metadata, data_start = read_header(path)
    assert metadata == {"step": "7"} and set(entries) == set(tensors)
    # one listing (to learn the size) + one ranged GET for the header
    assert s3_server.counts.gets == 2 and s3_server.counts.ranged_gets == 1
    assert s3_server.counts.get_bytes < 120_000
    start, end = entries["w2"]["data_offsets"]
    before = s3_server.counts.get_bytes
    blob = path.read_range(data_start + start, data_start + end)
    assert torch.frombuffer(bytearray(blob), dtype=torch.float32).eq(2.0).all()
    assert s3_server.counts.get_bytes - before == end - start


def test_long_header_costs_two_requests(tmp_path, s3_server, s3_bucket) -> None:
    """A header longer than the first guess costs exactly one more request."""
    tensors = {f"layer.{i}.a_rather_long_parameter_name.weight": torch.zeros(1) for i in range(3000)}
    save_file(tensors, tmp_path / "m.safetensors")
    url = upload_tree(tmp_path, s3_server.endpoint, s3_bucket, "run")
    path = RemotePath(url) / "m.safetensors"
    path.stat()
    s3_server.counts.reset()
    entries, _, _ = read_header(path)
    assert len(entries) == 3000
    assert s3_server.counts.ranged_gets == 2


def test_listing_answers_names_without_requests(tmp_path, s3_server, s3_bucket) -> None:
    for name in ("a/x.json", "a/b/y.safetensors", "c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"{}")
    root = RemotePath(upload_tree(tmp_path, s3_server.endpoint, s3_bucket, "run"))
    root.list()
    s3_server.counts.reset()
    assert [p.name for p in root.iterdir()] == ["a", "c.txt"]
    assert (root / "a").is_dir() and not (root / "a").is_file() and (root / "c.txt").is_file()
    assert not (root / "nope").exists()
    assert [str(p) for p in root.rglob("*.safetensors")] == [f"s3://{s3_bucket}/run/a/b/y.safetensors"]
    walked = [(str(d.relative_to(root)), dirs, files) for d, dirs, files in root.walk()]
    assert walked == [(".", ["a"], ["c.txt"]), ("a", ["b"], ["x.json"]), ("a/b", [], ["y.safetensors"])]
    assert (root / "c.txt").stat().st_size == 2
    assert s3_server.counts.gets == 0


def test_missing_object_is_one_line_naming_the_url(s3_bucket) -> None:
    path = RemotePath(f"s3://{s3_bucket}/nothing/here.safetensors")
    with pytest.raises(RemoteError, match=rf"s3://{s3_bucket}/nothing/here.safetensors: no such object"):
        path.read_range(0, 8)


def test_transient_errors_are_retried_and_counted() -> None:
    class Flaky:
        calls = 0

        def cat_ranges(self, paths, starts, ends, on_error="raise"):   # fsspec's signature
            Flaky.calls += 1
            if Flaky.calls < 3:
                raise OSError("503 SlowDown: please reduce your request rate")
            return [b"abcd"]

    store = Store(Flaky(), "s3", sleep=lambda s: None)
    assert store.read_range("b/k", 0, 4) == b"abcd"
    assert store.stats.retries == 2 and store.stats.requests == 1
    assert is_transient(ConnectionResetError()) and not is_transient(PermissionError("403 AccessDenied"))
    assert not is_transient(FileNotFoundError("b/k"))


def test_a_bare_500_from_the_server_is_retried_and_counted(tmp_path, s3_server, s3_bucket) -> None:
    """issue 22: an HTTP 500 without S3's XML (s3fs: "[Errno 121] Internal Server Error") is transient like
    S3's InternalError: one retry, counted, then the exact bytes; before, it ended the read at once."""
    from analysis.remote import all_stats, store_for

    (tmp_path / "obj.bin").write_bytes(bytes(range(256)) * 40)
    url = upload_tree(tmp_path, s3_server.endpoint, s3_bucket, "run") + "/obj.bin"
    store, key = store_for(url)
    s3_server.inject("GET", r"/run/obj\.bin$", kind="500")
    s3_server.counts.reset()
    assert store.read_range(key, 100, 600) == (bytes(range(256)) * 40)[100:600]
    assert s3_server.counts.gets == 2 and all_stats()["s3"]["retries"] == 1


def test_open_checkpoint_by_url_reads_exact_tensors(tmp_path, s3_server, s3_bucket) -> None:
    """open_checkpoint takes a URL; each tensor is its own exact range (issue 22)."""
    from analysis.checkpoints import open_checkpoint

    tensors = {"a": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), "b": torch.ones(5, dtype=torch.int64)}
    save_file(tensors, tmp_path / "m.safetensors")
    url = upload_tree(tmp_path, s3_server.endpoint, s3_bucket, "run") + "/m.safetensors"
    with open_checkpoint(url) as handle:
        assert sorted(i.name for i in handle.tensors()) == ["a", "b"]
        s3_server.counts.reset()
        assert torch.equal(handle.read("a"), tensors["a"]) and torch.equal(handle.read("b"), tensors["b"])
        assert s3_server.counts.gets == 2 and s3_server.counts.get_bytes == 24 + 40
