"""No checkpoint ever runs code (issue 4): crafted malicious pickles in every pickle-based layout.

Each case hides a ``__reduce__`` that would run a shell command or write a file. The
reader must refuse it with CheckpointReadError naming the file and the global it
wanted, the side effect must not happen, and ``python -m analysis analyze`` exits 2.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.checkpoints import open_checkpoint
from analysis.errors import CheckpointReadError
from ckpt_factories import Evil, EvilWriter, dcp_checkpoint, hf_checkpoint, plain_state_dict

REPO = Path(__file__).resolve().parents[1]


def _plain(run: Path, payload: object) -> Path:
    torch.save({"w": torch.ones(3), "evil": payload}, run / "step_100.pt")
    return run / "step_100.pt"


def _legacy(run: Path, payload: object) -> Path:
    torch.save({"w": torch.ones(3), "evil": payload}, run / "step_100.pth", _use_new_zipfile_serialization=False)
    return run / "step_100.pth"


def _nanogpt(run: Path, payload: object) -> Path:
    out = run / "out"
    out.mkdir()
    torch.save({"model": {"w": torch.ones(3)}, "iter_num": 5, "model_args": {"n_layer": payload}}, out / "ckpt.pt")
    return out / "ckpt.pt"


def _lightning(run: Path, payload: object) -> Path:
    torch.save({"state_dict": {"model.w": torch.ones(3)}, "global_step": 7,
                "callbacks": {"ModelCheckpoint": {"best_model_score": payload}}}, run / "epoch=0-step=7.ckpt")
    return run / "epoch=0-step=7.ckpt"


def _timm(run: Path, payload: object) -> Path:
    torch.save({"state_dict": {"w": torch.ones(3)}, "state_dict_ema": payload, "epoch": 1}, run / "checkpoint-1.pth.tar")
    return run / "checkpoint-1.pth.tar"


def _hf_bin(run: Path, payload: object) -> Path:
    folder = run / "checkpoint-10"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"model.w": torch.ones(3), "evil": payload}, folder / "pytorch_model.bin")
    return folder


def _hf_bin_shard(run: Path, payload: object) -> Path:
    folder = run / "checkpoint-20"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"a": torch.ones(3)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": payload}, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    return folder


def _dcp_metadata(run: Path, payload: object) -> Path:
    folder = run / "dcp_step_30"
    dcp_checkpoint(folder)
    (folder / ".metadata").write_bytes(pickle.dumps(payload))   # torch itself would pickle.load this
    return folder


LAYOUTS = {"plain_pt": _plain, "legacy_pth": _legacy, "nanogpt": _nanogpt, "lightning": _lightning,
           "timm": _timm, "hf_bin": _hf_bin, "hf_bin_shard": _hf_bin_shard, "dcp_metadata": _dcp_metadata}
PAYLOADS = {"os_system": (Evil, "posix.system"), "exec_write": (EvilWriter, "exec")}


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, layout: str, payload: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    make, wanted = PAYLOADS[payload]
    path = LAYOUTS[layout](run, make(marker))
    with pytest.raises(CheckpointReadError, match="refused") as info:
        open_checkpoint(path)
    assert wanted in str(info.value)
    assert not marker.exists()
    if payload != "os_system":
        return   # the CLI path is the same for both payloads; one subprocess per layout keeps the test quick
    result = subprocess.run([sys.executable, "-m", "analysis", "analyze", str(run)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "refused" in result.stderr and wanted in result.stderr
    assert not marker.exists()


def test_malicious_optimizer_pt_is_refused_when_moments_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    hf_checkpoint(folder, 5)
    marker = tmp_path / "pwned"
    torch.save({"state": {0: {"exp_avg": Evil(marker)}}, "param_groups": []}, folder / "optimizer.pt")
    with open_checkpoint(folder) as handle:
        assert handle.tensors()                     # the weights are fine and stay readable
        with pytest.raises(CheckpointReadError, match=r"optimizer\.pt.*posix\.system"):
            handle.optimizer_state()
    assert not marker.exists()


def test_a_malicious_param_group_lr_in_a_dcp_folder_runs_nothing(tmp_path: Path) -> None:
    # DCP keeps non-tensor optimizer settings as pickled blobs; the saved LR is read weights-only.
    import warnings

    import torch.distributed.checkpoint as dcp
    folder = tmp_path / "dcp_step_30"
    marker = tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.ones(3)}, "optimizer": {"param_groups.w.lr": Evil(marker)}},
                 checkpoint_id=str(folder), no_dist=True)
    with open_checkpoint(folder) as handle:
        assert "optimizer.lr" not in handle.metadata() and [t.name for t in handle.tensors()] == ["w"]
    assert not marker.exists()


def test_refusal_is_not_retried_unsafely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every torch.load call made by the reader keeps weights_only=True, even after a refusal."""
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Evil(tmp_path / "pwned")}, path)
    calls: list[dict] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(CheckpointReadError, match="evil.pt"):
        open_checkpoint(path)
    assert calls and all(c.get("weights_only") is True for c in calls)
    assert not (tmp_path / "pwned").exists()


def test_plain_state_dict_still_loads(tmp_path: Path) -> None:
    """The guard refuses code, not checkpoints: an ordinary state dict opens."""
    sd = plain_state_dict(tmp_path / "ok.pt")
    with open_checkpoint(tmp_path / "ok.pt") as handle:
        assert {i.name for i in handle.tensors()} == set(sd)


def test_dcp_metadata_cannot_reach_os_through_an_allowed_module(tmp_path: Path) -> None:
    """Protocol-4 dotted names ("os.system" looked up on DCP's filesystem module) are refused too."""
    folder = tmp_path / "dcp"
    dcp_checkpoint(folder)
    marker = tmp_path / "pwned"
    module, name = b"torch.distributed.checkpoint.filesystem", b"os.system"
    command = f"touch {marker}".encode()
    payload = (b"\x80\x04" + b"\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name
               + b"\x93" + b"\x8c" + bytes([len(command)]) + command + b"\x85R.")
    (folder / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointReadError, match=r"refused.*os\.system"):
        open_checkpoint(folder)
    assert not marker.exists()
