"""Checks shared by the object-storage tests (S3 and GCS): a run read by URL equals the same run read from disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from analysis.checkpoints import open_checkpoint


def relative(run, ref) -> str:
    """A checkpoint's path relative to its run, the same text for a local and a remote run."""
    return str(ref.path.relative_to(run.path))


def same_run(local, remote) -> None:
    """Two reads of one run agree on everything discovery finds: steps, layouts, sizes, files, logs, metrics."""
    assert [(r.step, relative(local, r), r.layout, r.size_bytes, r.step_source) for r in local.checkpoints] == \
        [(r.step, relative(remote, r), r.layout, r.size_bytes, r.step_source) for r in remote.checkpoints]
    assert [sorted(str(f.relative_to(local.path)) for f in r.files) for r in local.checkpoints] == \
        [sorted(str(f.relative_to(remote.path)) for f in r.files) for r in remote.checkpoints]
    assert sorted(str(t.path.relative_to(local.path)) for t in local.logs) == \
        sorted(str(t.path.relative_to(remote.path)) for t in remote.logs)
    assert local.metrics.equals(remote.metrics)
    assert local.unreadable == remote.unreadable == ()


def same_tensors(local_ref, remote_ref) -> None:
    """Both checkpoints hold the same tensors, metadata and bytes."""
    with open_checkpoint(local_ref.path) as a, open_checkpoint(remote_ref.path) as b:
        assert a.tensors() == b.tensors()
        assert a.metadata() == b.metadata()
        for info in a.tensors():
            assert torch.equal(a.read(info.name), b.read(info.name)), info.name


def safetensors_run(root: Path, k: int = 3) -> Path:
    """K safetensors checkpoints of ~4 MiB (8 tensors of 512 KiB, steps 100, 200, ...) and a train-loss log."""
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    base = {f"blocks.{i}.weight": torch.randn(256, 512, generator=gen) for i in range(8)}
    for index in range(k):
        step = 100 * (index + 1)
        state = {name: value + 0.01 * step + 0.001 * torch.randn(value.shape, generator=gen)
                 for name, value in base.items()}
        save_file(state, str(root / f"step_{step}.safetensors"), metadata={"step": str(step)})
    rows = [{"step": s, "train_loss": 3.0 * math.exp(-s / 200) + 1.0} for s in range(1, 100 * k + 1)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every weights file in ``folder``."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def assert_same_model(a: Path, b: Path, same_files: bool = True) -> None:
    """Every tensor equal, bit for bit (torch.equal), under the same names (and in the same files)."""
    if same_files:
        assert sorted(p.name for p in a.glob("*.safetensors")) == sorted(p.name for p in b.glob("*.safetensors"))
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def same_recommendation(main, capsys, local: str, remote: str) -> dict:
    """``recommend --json`` of the run on disk and by URL agree on checkpoints, weights, method and summary;
    the remote document."""
    assert main(["recommend", local, "--json"]) == 0
    local_rec = json.loads(capsys.readouterr().out)
    assert main(["recommend", remote, "--json"]) == 0
    remote_rec = json.loads(capsys.readouterr().out)
    assert [(c["step"], c["weight"]) for c in local_rec["checkpoints"]] == \
        [(c["step"], c["weight"]) for c in remote_rec["checkpoints"]]
    assert local_rec["method"] == remote_rec["method"] and local_rec["summary"] == remote_rec["summary"]
    return remote_rec

