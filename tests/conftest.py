"""Shared fixtures. Markers: ``browser`` (real Chromium), ``slow`` (more than a few seconds).

Options:
    --update-golden   rewrite tests/golden/**/<case>.expected.csv from the current
                      readers (review the git diff before committing).

Fixtures build tiny but real artifacts in code (safetensors files written by the
safetensors library, JSONL logs), so tests never depend on mocks of the libraries.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RUN = REPO / "sample_runs" / "stdlib-gpt"
# The app's modules import each other as top-level modules (Streamlit puts app/ on the path).
sys.path.insert(0, str(REPO / "app"))
# Sketch caches and recent-run memory go to a scratch folder, never the user's home
# (subprocesses started by tests inherit these).
_SCRATCH = tempfile.mkdtemp(prefix="ckpt-select-tests-")
# Removed when this test process exits (each xdist worker has its own), so runs do not pile up in /tmp.
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
os.environ.setdefault("CKPT_SELECT_CACHE_DIR", os.path.join(_SCRATCH, "cache"))
os.environ.setdefault("CKPT_SELECT_SCORES_DIR", os.path.join(_SCRATCH, "scores"))
os.environ.setdefault("CKPT_SELECT_STATE_DIR", os.path.join(_SCRATCH, "state"))


def tiny_state(seed: int, step: int) -> dict[str, torch.Tensor]:
    """A small 'model': float tensors drifting with the step, plus an integer buffer."""
    gen = torch.Generator().manual_seed(seed)
    base = {"layer.weight": torch.randn(8, 4, generator=gen), "layer.bias": torch.randn(4, generator=gen)}
    drift = {k: v + 0.01 * step + 0.001 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    drift["num_batches"] = torch.tensor(step, dtype=torch.int64)
    return drift


def write_tiny_run(root: Path, steps: list[int], *, spike_steps: tuple[int, ...] = (), nan_step: int | None = None,
                   dtype: torch.dtype = torch.float32, val_every: int | None = None) -> Path:
    """A flat run folder: ``ckpt/step_N.safetensors`` and a ``metrics.jsonl`` with a loss curve.

    The train loss decays exponentially with small deterministic noise; steps in
    ``spike_steps`` get +2.0 for five steps; val loss is logged at every checkpoint.
    """
    (root / "ckpt").mkdir(parents=True, exist_ok=True)
    rows = []
    last = max(steps)
    for step in range(1, last + 1):
        loss = 3.0 * math.exp(-step / (last / 4)) + 1.0 + 0.01 * math.sin(step * 1.7)
        if any(s <= step < s + 5 for s in spike_steps):
            loss += 2.0
        rows.append({"step": step, "train_loss": loss, "lr": 1e-3, "grad_norm": 1.0 + 0.05 * math.cos(step)})
        if step in steps or (val_every and step % val_every == 0):
            rows.append({"step": step, "val_loss": loss + 0.05})
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for index, step in enumerate(steps):
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tiny_state(index, step).items()}
        if step == nan_step:
            state["layer.bias"][0] = float("nan")
        save_file(state, str(root / "ckpt" / f"step_{step:06d}.safetensors"), metadata={"step": str(step)})
    return root


def rewrite_metrics(run: Path, change) -> None:
    """Apply ``change(row)`` to every row of a run's metrics.jsonl (a row it maps to None is dropped)."""
    path = run / "metrics.jsonl"
    rows = [change(json.loads(line)) for line in path.read_text().splitlines()]
    path.write_text("\n".join(json.dumps(r) for r in rows if r is not None) + "\n")


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """12 checkpoints every 50 steps, a spike at step 300 (checkpoint 300 is inside it)."""
    return write_tiny_run(tmp_path / "run", list(range(50, 650, 50)), spike_steps=(298,))


@pytest.fixture
def sample_run() -> Path:
    """The real sample run shipped in the repository."""
    assert SAMPLE_RUN.is_dir(), f"{SAMPLE_RUN} is missing: regenerate it with `make sample-run`"
    return SAMPLE_RUN


# --- golden files (log readers) --------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite golden expected files instead of comparing against them")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True when the run was started with --update-golden."""
    return bool(request.config.getoption("--update-golden"))


def wait_for_merge(at, seconds: float = 60) -> None:
    """Rerun an AppTest until the Merge page's background merge reports (AppTest does not tick
    run_every fragments, so the page's progress fragment never polls by itself)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        at.run()
        if any("Merged" in s.value for s in at.success) or at.error:
            return
        time.sleep(0.2)
    raise AssertionError("merge did not finish")


# --- object storage (issue 22): one moto S3 server per test session, a fresh bucket per test ---------

@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 HTTP server on 127.0.0.1, started once per session (per xdist worker) and stopped after it.

    Credentials are dummies in the environment, as a user's would be; the endpoint reaches s3fs
    through the same ``--storage-options`` a user with a non-AWS endpoint passes.
    """
    from s3_server import S3Server

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    os.environ.pop("AWS_PROFILE", None)
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new empty bucket on the session's server, the stores reset and the server's counters zeroed.

    Yields the bucket name; ``s3_server.counts`` holds what the server served during the test.
    """
    import boto3

    name = _bucket_name(request)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    with _stores_on(s3_server, {"s3": {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}}):
        yield name


def _bucket_name(request) -> str:
    """A bucket name of the test's own (lowercase, ≤ 63 characters), unique per xdist worker."""
    import re

    return "t-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"


@contextmanager
def _stores_on(server, options: dict):
    """The process's stores pointed at ``server`` with ``options`` and its counters zeroed; afterwards the
    faults a test injected (issue 22), the options and the stores are undone."""
    from analysis.remote import reset_stores, set_storage_options

    set_storage_options(options)
    reset_stores()
    server.counts.reset()
    try:
        yield
    finally:
        server.clear_faults()
        set_storage_options(None)
        reset_stores()


def upload_tree(local: Path, endpoint: str, bucket: str, prefix: str) -> str:
    """Upload a local folder to ``s3://bucket/prefix`` with boto3 (not our code); returns the URL."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


# --- Google Cloud Storage (issue 22): one gcp-storage-emulator per test session, a fresh bucket per test ------

@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator's GCS JSON API on 127.0.0.1, in memory, started once per session (per xdist
    worker) and stopped after it; ``gcs_server.counts`` counts requests and GET bytes at the server."""
    from gcs_server import GcsServer

    server = GcsServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server, request):
    """A new empty bucket on the session's GCS server, the ``gs`` storage options pointing at it (anonymous),
    the stores reset and the server's counters zeroed. Yields the bucket name."""
    name = _bucket_name(request)
    gcs_server.create_bucket(name)
    with _stores_on(gcs_server, {"gs": {"endpoint_url": gcs_server.endpoint, "token": "anon", "project": "test"}}):
        yield name


# --- Ray (issue 22): one local cluster per test session, held by one xdist worker (xdist_group "ray") ---------

@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (2 CPUs, loopback, no dashboard, usage stats off), started once per session.

    Yields its GCS address (``HOST:PORT``), which a driver in another process joins with ``--ray-address``.
    Its temp folder is short (Ray's socket paths must fit 107 characters) and removed at the end.
    """
    ray = pytest.importorskip("ray")
    import logging

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp,
             logging_level=logging.WARNING, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
