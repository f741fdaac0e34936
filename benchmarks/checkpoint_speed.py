"""Checkpoint ingestion speed and I/O (issue 4). Not a test: run it and read the numbers.

1. Listing: 100 sharded checkpoints of a Llama-7B layout (32 layers, hidden 4096, bf16,
   2 shards each, ~13.5 GB apparent per checkpoint) written as *sparse* files: a real
   safetensors header, then a hole up to the full size. Listing reads headers only, so
   it must take well under 2 s for all 100.
2. One tensor from a large shard: a real 1 GiB shard of 16 x 64 MiB tensors. The shard's
   pages are evicted from the page cache first (posix_fadvise DONTNEED), then one
   tensor is read; /proc/self/io read_bytes (storage I/O) and RssFile (mapped pages
   touched) show the cost is that tensor's bytes, not the shard's. Same for a torch.save
   file opened with mmap=True.

Usage: python benchmarks/checkpoint_speed.py [--out DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.checkpoints import open_checkpoint  # noqa: E402
from analysis.checkpoints.safetensors_writer import SafetensorsWriter  # noqa: E402
from analysis.checkpoints.base import TensorInfo  # noqa: E402

MiB = 1 << 20


def llama7b_layout() -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of Llama-2-7B, in the order of its model.safetensors.index.json."""
    hidden, inter, vocab = 4096, 11008, 32000
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(32):
        p = f"model.layers.{i}."
        names += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                  (p + "mlp.down_proj.weight", (hidden, inter)),
                  (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    return names + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_sparse_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], step: int) -> None:
    """A valid safetensors header followed by a hole as long as the data would be."""
    header, offset = {"__metadata__": {"format": "pt", "step": str(step)}}, 0
    for name, shape in tensors:
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def make_sparse_run(root: Path, count: int) -> list[Path]:
    layout = llama7b_layout()
    half = len(layout) // 2
    folders = []
    for n in range(count):
        folder = root / f"checkpoint-{(n + 1) * 1000}"
        folder.mkdir(parents=True)
        weight_map = {}
        for i, part in enumerate((layout[:half], layout[half:]), start=1):
            shard = f"model-{i:05d}-of-00002.safetensors"
            write_sparse_shard(folder / shard, part, (n + 1) * 1000)
            weight_map.update({name: shard for name, _ in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
        folders.append(folder)
    return folders


def bench_listing(root: Path, count: int) -> dict:
    folders = make_sparse_run(root / "sparse", count)
    apparent = sum(f.stat().st_size for d in folders for f in d.iterdir())
    on_disk = sum(f.stat().st_blocks * 512 for d in folders for f in d.iterdir())
    start = time.perf_counter()
    n_tensors = 0
    for folder in folders:
        with open_checkpoint(folder) as handle:
            n_tensors += len(handle.tensors())
            handle.metadata()
    seconds = time.perf_counter() - start
    return {"checkpoints": count, "tensors_listed": n_tensors, "seconds": round(seconds, 3),
            "apparent_gb": round(apparent / 1e9, 1), "on_disk_mb": round(on_disk / 1e6, 2)}


def _io() -> tuple[int, int]:
    """(read_bytes from storage, RssFile bytes) of this process."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(io["read_bytes"]), int(status["RssFile"].strip().split()[0]) * 1024


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_one_tensor(root: Path, n_tensors: int = 16, tensor_mib: int = 64) -> list[dict]:
    numel = tensor_mib * MiB // 4
    infos = [TensorInfo(f"layer.{i}.weight", (numel,), "float32", numel * 4) for i in range(n_tensors)]
    shard = root / "big.safetensors"
    with SafetensorsWriter(shard, infos) as writer:   # one tensor in memory at a time
        for info in infos:
            writer.write(info.name, torch.full((numel,), 1.0))
    pickle_file = root / "big.pt"
    torch.save({info.name: torch.full((numel,), 2.0) for info in infos[:8]}, pickle_file)
    results = []
    for path, name in ((shard, "layer.7.weight"), (pickle_file, "layer.3.weight")):
        _evict(path)
        read0, rss0 = _io()
        with open_checkpoint(path) as handle:
            listed = len(handle.tensors())
            read1, rss1 = _io()
            value = float(handle.read(name).sum())
            read2, rss2 = _io()
        results.append({"file": path.name, "file_mib": round(path.stat().st_size / MiB), "tensor_mib": tensor_mib,
                        "tensors": listed, "open_read_mib": round((read1 - read0) / MiB, 2),
                        "tensor_read_mib": round((read2 - read1) / MiB, 2),
                        "rss_file_growth_mib": round((rss2 - rss0) / MiB, 2), "checksum": value})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="ckpt-speed-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        report = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
                             f"Python {platform.python_version()}, torch {torch.__version__}",
                  "date": time.strftime("%Y-%m-%d"),
                  "listing": bench_listing(root, args.count), "one_tensor": bench_one_tensor(root)}
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
