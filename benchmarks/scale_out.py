"""The merge on a Ray cluster: 1 and 2 workers against the local merge, on 8 Llama-layout checkpoints (issue 22).

What it shows on one machine, where a cluster cannot be faster than the cores it has: how the work is
split (bytes read per worker: each at most 0.55 of the total with 2 workers), how it is read (reads and
object-storage requests per tensor), what a worker holds (peak RSS, at most 1 GB) and that the result is
bit-identical to the local merge. Wall times are printed too, with the machine; on 2 shared cores they do
not halve (docs/cluster.md projects them to real nodes).

Inputs: 8 checkpoints of a small Llama config with random bf16 weights, written by safetensors into
``--cache`` (made once), or ``--inputs DIR_OR_URL`` (a folder or prefix of checkpoint folders, e.g. the same
uploaded to S3, with ``--storage-options JSON`` for its endpoint and credentials). Usage:
``python benchmarks/scale_out.py [--inputs DIR_OR_URL] [--storage-options JSON] [--layers 12]``;
writes ``benchmarks/results/scale_out.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from analysis.executors import Resources  # noqa: E402
from analysis.merge import merge_checkpoints  # noqa: E402
from analysis.remote import as_path, set_storage_options  # noqa: E402
from analysis.run import checkpoint_ref  # noqa: E402

GB = 1e9


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    """A Llama config as transformers writes it (the shapes below follow it)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": vocab, "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def llama_state(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 weights in the Llama layout: embeddings, attention, MLP and norms of every layer, the head."""
    gen = torch.Generator().manual_seed(seed)
    h, m, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    state = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": rand(h), "lm_head.weight": rand(v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        state.update({f"{p}.self_attn.{n}.weight": rand(h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        state.update({f"{p}.mlp.gate_proj.weight": rand(m, h), f"{p}.mlp.up_proj.weight": rand(m, h),
                      f"{p}.mlp.down_proj.weight": rand(h, m), f"{p}.input_layernorm.weight": rand(h),
                      f"{p}.post_attention_layernorm.weight": rand(h)})
    return state


def make_inputs(cache: Path, count: int, config: dict) -> list[Path]:
    """``count`` checkpoint folders (config.json + model.safetensors) under ``cache``, made once."""
    key = "-".join(str(config[k]) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"))
    folders = [cache / key / f"checkpoint-{100 * (i + 1)}" for i in range(count)]
    for i, folder in enumerate(folders):
        if not (folder / "model.safetensors").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(config, indent=2))
            save_file(llama_state(config, i), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folders


class Recording:
    """An executor that keeps every unit's result (pid, bytes read, reads, peak RSS) for the table."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.slots, self.results = inner, inner.name, inner.slots, []

    def map(self, fn, units, resources=Resources(), progress=None):
        for result in self.inner.map(fn, units, resources, progress):
            self.results.append(result)
            yield result


def tensors(folder: Path) -> dict[str, bytes]:
    """Every tensor of a merge output, as raw bytes."""
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            found.update({k: f.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes() for k in f.keys()})
    return found


def run_ray(refs, out: Path, workers: int, temp: str) -> tuple[float, Recording]:
    """The merge on a fresh local Ray cluster of ``workers`` CPUs (one unit per worker at a time)."""
    import ray

    from analysis.executors.ray_cluster import RayExecutor

    ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp,
             logging_level="WARNING", log_to_driver=False)
    try:
        executor = Recording(RayExecutor("auto"))
        began = time.perf_counter()
        merge_checkpoints(refs, [1.0] * len(refs), out, executor=executor)
        return time.perf_counter() - began, executor
    finally:
        ray.shutdown()


def row(label: str, seconds: float, recording: Recording | None, n_tensors: int, total_read: int,
        identical: bool) -> dict:
    """One line of the table: per worker bytes read (share of the total) and peak RSS."""
    per_worker: dict[int, dict] = {}
    for r in (recording.results if recording else []):
        w = per_worker.setdefault(r.pid, {"bytes_read": 0, "peak_rss": 0, "reads": 0, "requests": 0, "units": 0})
        w["bytes_read"] += r.bytes_read
        w["peak_rss"] = max(w["peak_rss"], r.peak_rss)
        w["reads"] += r.reads
        w["requests"] += r.requests
        w["units"] += 1
    workers = list(per_worker.values())
    return {"run": label, "seconds": round(seconds, 2), "workers": len(workers) or 1,
            "bytes_read_per_worker": [w["bytes_read"] for w in workers],
            "max_share_per_worker": round(max((w["bytes_read"] for w in workers), default=total_read) / total_read, 3),
            "peak_rss_per_worker_mb": [round(w["peak_rss"] / 1e6) for w in workers],
            "reads_per_tensor": round(sum(w["reads"] for w in workers) / n_tensors, 1) if workers else None,
            "requests_per_tensor": round(sum(w["requests"] for w in workers) / n_tensors, 2) if workers else None,
            "bit_identical_to_local": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", help="A folder or URL prefix holding the checkpoint folders (default: generated).")
    parser.add_argument("--storage-options", help="JSON storage options for --inputs URLs (endpoint, credentials).")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ckpt-select-scale-out")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--moto", action="store_true",
                        help="Upload the generated inputs to a local S3 server (moto, 127.0.0.1) and read them by URL.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Result JSON (default: benchmarks/results/scale_out[_s3].json).")
    args = parser.parse_args()
    args.out = args.out or REPO / "benchmarks" / "results" / ("scale_out_s3.json" if args.moto else "scale_out.json")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    server = None
    if args.moto:
        server = start_moto()
        config = llama_config(args.layers, args.hidden, args.intermediate, args.vocab)
        args.inputs = upload(make_inputs(args.cache, args.count, config), server.endpoint)
        args.storage_options = json.dumps({"s3": {"endpoint_url": server.endpoint}})
        server.counts.reset()
    if args.storage_options:
        set_storage_options(args.storage_options)
    if args.inputs:
        base = as_path(args.inputs)
        sources = sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name)[:args.count]
    else:
        config = llama_config(args.layers, args.hidden, args.intermediate, args.vocab)
        sources = make_inputs(args.cache, args.count, config)
    refs = [checkpoint_ref(str(s) if args.inputs else s, step=100 * (i + 1)) for i, s in enumerate(sources)]
    work = Path(tempfile.mkdtemp(prefix="so-", dir=args.cache if args.cache.is_dir() else None))
    try:
        results = measure(refs, work, server)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if server is not None:
            server.stop()
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other work while measured)",
           "inputs": args.inputs or f"{args.count} generated Llama-layout checkpoints", **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)


def start_moto():
    """moto's S3 server on a free loopback port, counting what it serves (the tests' server, tests/s3_server.py)."""
    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import start_quiet_server

    return start_quiet_server()


def upload(folders: list[Path], endpoint: str, bucket: str = "scale-out") -> str:
    """Upload the checkpoint folders with boto3 (not our code) and return their prefix URL."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for folder in folders:
        for path in sorted(folder.iterdir()):
            client.upload_file(str(path), bucket, f"run/{folder.name}/{path.name}")
    return f"s3://{bucket}/run"


def measure(refs, work: Path, server=None) -> dict:
    """The local merge, then 1 and 2 Ray workers; each compared with the local output bit for bit.

    With a local S3 ``server``, each row also gets the bytes and GET requests the server served for it.
    """
    began = time.perf_counter()
    local = merge_checkpoints(refs, [1.0] * len(refs), work / "local")
    local_seconds = time.perf_counter() - began
    expected = tensors(work / "local")
    total_read = sum(r.size_bytes for r in refs)
    rows = [row("local (1 process)", local_seconds, None, local.n_tensors, total_read, True)]
    rows[0].update(_served(server))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        for workers in (1, 2):
            out = work / f"ray{workers}"
            seconds, recording = run_ray(refs, out, workers, temp)
            served = _served(server)
            total_read = sum(r.bytes_read for r in recording.results)
            rows.append(row(f"ray, {workers} worker{'s' * (workers > 1)}", seconds, recording, local.n_tensors,
                            total_read, tensors(out) == expected))
            rows[-1].update(served)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return {"checkpoints": len(refs), "tensors": local.n_tensors, "bytes_per_checkpoint": refs[0].size_bytes,
            "bytes_read": total_read, "rows": rows}


def _served(server) -> dict:
    """What the local S3 server served since the last call (GETs, bytes), then zeroed; {} without a server."""
    if server is None:
        return {}
    served = {"server_gets": server.counts.gets, "server_get_bytes": server.counts.get_bytes}
    server.counts.reset()
    return served


def print_table(doc: dict) -> None:
    print(f"{doc['checkpoints']} x {doc['bytes_per_checkpoint'] / 1e6:.0f} MB ({doc['tensors']} tensors), "
          f"{doc['machine']}, {doc['date']}")
    s3 = "server_gets" in doc["rows"][0]
    extra = (" GETs at the server | GB served | requests / tensor |", "---|---|---|") if s3 else ("", "")
    print(f"| run | wall s | bytes read per worker (share) | peak RSS per worker | reads / tensor | bit-identical |{extra[0]}")
    print(f"|---|---|---|---|---|---|{extra[1]}")
    for r in doc["rows"]:
        shares = ", ".join(f"{b / 1e6:.0f} MB" for b in r["bytes_read_per_worker"]) or "-"
        rss = ", ".join(f"{m} MB" for m in r["peak_rss_per_worker_mb"]) or "-"
        tail = (f" {r['server_gets']} | {r['server_get_bytes'] / 1e9:.3f} | {r['requests_per_tensor'] or '-'} |"
                if s3 else "")
        print(f"| {r['run']} | {r['seconds']} | {shares} ({r['max_share_per_worker']:.2f}) | {rss} | "
              f"{r['reads_per_tensor'] or '-'} | {'yes' if r['bit_identical_to_local'] else 'NO'} |{tail}")


if __name__ == "__main__":
    main()
