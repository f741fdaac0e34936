"""A first `analyze` of a run in object storage, tensors one request each against read ahead in windows (issue 22).

Why: before the read-ahead, the sketch pass fetched a remote checkpoint's tensors one exact range after
another, so a first analysis cost a round trip per tensor. moto's S3 server (tests/s3_server.py) runs
on 127.0.0.1 with ``latency_s`` added to every request (S3's first byte takes 20-100 ms); a run of
``--checkpoints`` safetensors checkpoints of ``--tensors`` float32 tensors each, plus a loss log, is
uploaded with boto3 and analysed by ``python -m analysis analyze URL --json`` in a fresh process with
an empty sketch cache, once with the read-ahead off (``PREFETCH_BYTES = 0``: the old path) and once on,
round after round (interleaved, so a load change on a shared machine hits both). Per mode: the
fastest and the median wall time, the GETs and bytes the server served, and whether the two ``--json``
outputs are equal. Usage: ``python benchmarks/remote_analyze.py [--latency-ms 20] [--rounds 2]``;
writes ``benchmarks/results/remote_analyze.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from merge_speed import describe_machine  # noqa: E402

# The analysis in a fresh process, the read-ahead set from argv[1] (0: off, one request a tensor).
_ANALYZE = ("import sys; from analysis.checkpoints import readahead; readahead.PREFETCH_BYTES = int(sys.argv[1]); "
            "from analysis.cli import main; sys.exit(main(sys.argv[2:]))")
MODES = {"one request a tensor (before)": 0, "read ahead in windows (after)": 64 << 20}


def make_run(root: Path, checkpoints: int, tensors: int, elements: int) -> Path:
    """``checkpoints`` safetensors files of ``tensors`` float32 tensors of ``elements`` each, and a loss log."""
    gen = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    for index in range(checkpoints):
        step = 100 * (index + 1)
        state = {f"model.layers.{i // 8}.w{i % 8}": torch.randn(elements, generator=gen) for i in range(tensors)}
        save_file(state, str(root / f"step_{step}.safetensors"), metadata={"step": str(step)})
    rows = [{"step": s, "train_loss": 3.0 * math.exp(-s / 200) + 1.0} for s in range(1, 100 * checkpoints + 1)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def start_server():
    """The tests' moto S3 server on a free loopback port (no latency yet: the upload need not wait)."""
    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import start_quiet_server

    return start_quiet_server()


def upload(run: Path, endpoint: str, bucket: str = "remote-analyze") -> str:
    """The run's files as objects, with boto3 (not our code); the run's URL."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for path in sorted(run.iterdir()):
        client.upload_file(str(path), bucket, f"run/{path.name}")
    return f"s3://{bucket}/run"


def analyze_once(url: str, endpoint: str, prefetch: int, cache: Path, server) -> tuple[float, dict, int, int]:
    """Wall seconds of one first `analyze --json` (empty caches, fresh process), its output, GETs and bytes served."""
    options = json.dumps({"s3": {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}})
    env = {**os.environ, "CKPT_SELECT_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    server.counts.reset()
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _ANALYZE, str(prefetch), "--storage-options", options,
                           "analyze", url, "--json"], env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - began
    doc = json.loads(done.stdout)
    doc.pop("io", None)
    return seconds, doc, server.counts.gets, server.counts.get_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--elements", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "remote_analyze.json")
    args = parser.parse_args()
    server = start_server()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = make_run(work / "run", args.checkpoints, args.tensors, args.elements)
        url = upload(run, server.endpoint)
        server.latency_s = args.latency_ms / 1000   # after the upload: only the analysis waits
        results = {name: [] for name in MODES}
        for round_ in range(args.rounds):
            for name, prefetch in MODES.items():
                results[name].append(analyze_once(url, server.endpoint, prefetch, work / f"cache-{round_}-{prefetch}",
                                                  server))
    server.stop()
    doc = summarize(args, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)


def summarize(args: argparse.Namespace, results: dict[str, list]) -> dict:
    """Per mode: fastest and median wall time, GETs and bytes served; whether every output was the same."""
    outputs = [json.dumps(doc, sort_keys=True) for runs in results.values() for _, doc, _, _ in runs]
    rows = [{"mode": name, "fastest_s": round(min(r[0] for r in runs), 2),
             "median_s": round(statistics.median(r[0] for r in runs), 2),
             "gets": runs[0][2], "bytes_served": runs[0][3]} for name, runs in results.items()]
    return {"machine": describe_machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "latency_ms": args.latency_ms, "checkpoints": args.checkpoints, "tensors": args.tensors,
            "bytes_per_tensor": args.elements * 4, "rounds": args.rounds,
            "same_output": len(set(outputs)) == 1, "rows": rows}


def print_table(doc: dict) -> None:
    print(f"{doc['checkpoints']} checkpoints x {doc['tensors']} tensors of {doc['bytes_per_tensor'] // 1024} KiB, "
          f"{doc['latency_ms']:.0f} ms a request, {doc['machine']}, {doc['date']}, {doc['rounds']} rounds; "
          f"same --json output: {doc['same_output']}")
    print("| first `analyze --json` | fastest s | median s | GETs at the server | bytes served |")
    print("|---|---|---|---|---|")
    for row in doc["rows"]:
        print(f"| {row['mode']} | {row['fastest_s']:.2f} | {row['median_s']:.2f} | {row['gets']} | "
              f"{row['bytes_served']:,} |")


if __name__ == "__main__":
    main()
