"""Checkpoint readers (issue 4): every layout, lazily, on tiny real files made with the real libraries."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from analysis.checkpoints import (CHECKPOINT_READERS, detect_layout, ema_tensors, open_checkpoint,
                                  optimizer_state)
from analysis.checkpoints.compare import compare_layouts
from analysis.checkpoints.keys import KeyMap, common_wrapper_prefix
from analysis.errors import CheckpointReadError, NotACheckpoint, RunNotFound
from analysis.merge import merge_checkpoints
from analysis.run import checkpoint_ref, open_run
from analysis.signals.health import check_health, layer_of
from ckpt_factories import (dcp_checkpoint, fairseq_ckpt, hf_bin_sharded, hf_checkpoint, hf_model, lightning_ckpt,
                            nanogpt_ckpt, plain_state_dict, timm_ckpt, trained)

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as handle:
        return {i.name: handle.read(i.name).clone() for i in handle.tensors()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


# ---- layouts -----------------------------------------------------------------------------------

def test_registry_lists_folder_layouts_before_file_layouts() -> None:
    # deepspeed first: it claims an HF checkpoint-N/ holding a global_stepN/ (issue 21)
    assert list(CHECKPOINT_READERS)[:5] == ["deepspeed", "megatron", "hf_folder", "dcp", "sharded_index"]
    assert all(r.description for r in CHECKPOINT_READERS.values())


def test_safetensors_file_lists_headers_without_mapping_and_reads_one_tensor(tmp_path: Path) -> None:
    sd = trained()[0].state_dict()
    save_file(sd, tmp_path / "step_7.safetensors", metadata={"step": "7", "tokens": "3584"})
    with open_checkpoint(tmp_path / "step_7.safetensors") as handle:
        infos = {i.name: i for i in handle.tensors()}
        assert handle._file is None            # listing never maps the data
        assert infos["wte.weight"].shape == (16, 8) and infos["wte.weight"].size_bytes == 16 * 8 * 4
        assert handle.metadata()["step"] == "7" and handle.metadata()["tokens"] == "3584"
        assert torch.equal(handle.read("h.1.fc.bias"), sd["h.1.fc.bias"])


def test_hf_sharded_safetensors_folder(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-100"
    sd = hf_checkpoint(folder, 100, shard=True)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    assert detect_layout(folder) == "hf_folder"
    _assert_same(_read_all(folder), sd)
    with open_checkpoint(folder) as handle:
        meta = handle.metadata()
    assert (meta["step"], meta["epoch"], meta["tokens"], meta["best_metric"]) == ("100", "1.0", "51200", "1.5")
    files = {f.name for f in CHECKPOINT_READERS["hf_folder"].files(folder)}
    assert "model.safetensors.index.json" in files and "optimizer.pt" not in files


def test_loose_sharded_index_is_one_checkpoint_and_its_shards_are_not(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    sd = hf_checkpoint(folder, 1, shard=True)
    (folder / "config.json").unlink()
    (folder / "trainer_state.json").unlink()
    index = folder / "model.safetensors.index.json"
    assert detect_layout(folder) is None and detect_layout(index) == "sharded_index"
    assert all(detect_layout(s) is None for s in folder.glob("model-*.safetensors"))
    _assert_same(_read_all(index), sd)


def test_hf_single_file_folder_and_optimizer_moments(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-50"
    sd = hf_checkpoint(folder, 50)
    assert (folder / "model.safetensors").is_file()
    _assert_same(_read_all(folder), sd)
    with open_checkpoint(folder) as handle:
        moments = optimizer_state(handle)
        n_params = sum(1 for i in handle.tensors() if i.is_floating)
        assert len([m for m in moments if m.name.endswith(".exp_avg")]) == n_params
        assert all(handle.read_optimizer(m.name).shape == m.shape for m in moments[:4])
        # The Trainer's decay / no-decay groups are undone via the model class on the meta device.
        assert "model.layers.1.mlp.down_proj.weight.exp_avg" in {m.name for m in moments}
        assert "model.norm.weight.exp_avg_sq" in {m.name for m in moments}
        names = [n for n, _ in hf_model().named_parameters()]
        order = [n for n in names if "norm" not in n] + [n for n in names if "norm" in n]   # the factory's groups
        saved = torch.load(folder / "optimizer.pt", weights_only=True)["state"]
        for index in (0, 5, len(order) - 1):
            assert torch.equal(handle.read_optimizer(f"{order[index]}.exp_avg"), saved[index]["exp_avg"])


def test_hf_pytorch_model_bin_sharded_index(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-200"
    sd = hf_bin_sharded(folder, 200)
    assert detect_layout(folder) == "hf_folder"
    _assert_same(_read_all(folder), sd)
    with open_checkpoint(folder) as handle:
        assert handle.metadata()["step"] == "200"


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
@pytest.mark.parametrize("name", ["w.pt", "w.pth", "pytorch_model.bin"])
def test_plain_state_dicts_normalise_wrapper_prefixes(tmp_path: Path, prefix: str, name: str) -> None:
    sd = plain_state_dict(tmp_path / name, prefix=prefix)
    with open_checkpoint(tmp_path / name) as handle:
        assert [i.name for i in handle.tensors()] == [k.removeprefix(prefix) for k in sd]
        first = next(iter(sd))
        assert torch.equal(handle.read(first.removeprefix(prefix)), sd[first])   # normalised name
        assert torch.equal(handle.read(first), sd[first])                        # original name
        assert handle.original_name(first.removeprefix(prefix)) == first


def test_legacy_torch_save_format_loads_without_mmap(tmp_path: Path) -> None:
    sd = plain_state_dict(tmp_path / "old.pt", legacy=True)
    _assert_same(_read_all(tmp_path / "old.pt"), sd)


def test_nanogpt_ckpt(tmp_path: Path) -> None:
    ckpt = nanogpt_ckpt(tmp_path / "ckpt.pt", iter_num=250)
    model, opt = trained()
    with open_checkpoint(tmp_path / "ckpt.pt") as handle:
        meta = handle.metadata()
        assert (meta["step"], meta["iter_num"], meta["best_metric"], meta["best_metric_name"]) == (
            "250", "250", "2.5", "best_val_loss")
        assert meta["model_args.n_layer"] == "2"
        assert [i.name for i in handle.tensors()] == list(model.state_dict())   # _orig_mod. stripped
        # nanoGPT's decay/no-decay groups are undone: moments are keyed by parameter name.
        names = {id(p): n for n, p in model.named_parameters()}
        assert len(opt.state) >= 8
        for param, state in opt.state.items():
            assert torch.equal(handle.read_optimizer(f"{names[id(param)]}.exp_avg"), state["exp_avg"])
        assert handle.original_name("wte.weight") == "_orig_mod.wte.weight"
    assert ckpt["iter_num"] == 250


def test_lightning_ckpt_with_ema_and_model_checkpoint_callbacks(tmp_path: Path) -> None:
    lightning_ckpt(tmp_path / "epoch=3-step=300.ckpt")
    sd = trained()[0].state_dict()
    with open_checkpoint(tmp_path / "epoch=3-step=300.ckpt") as handle:
        meta = handle.metadata()
        assert (meta["step"], meta["epoch"], meta["best_metric"], meta["monitor"]) == ("300", "3", "1.75", "val_loss")
        assert [i.name for i in handle.tensors()] == list(sd)                  # model. stripped
        assert len(ema_tensors(handle)) == len(sd)
        assert torch.equal(handle.read_ema("wte.weight"), sd["wte.weight"] * 0.5)
        assert {m.name for m in optimizer_state(handle)} >= {"wte.weight.exp_avg", "lm_head.weight.exp_avg_sq"}


def test_timm_and_fairseq_checkpoints(tmp_path: Path) -> None:
    timm_ckpt(tmp_path / "checkpoint-5.pth.tar")
    fairseq_ckpt(tmp_path / "checkpoint_best.pt")
    sd = trained()[0].state_dict()
    with open_checkpoint(tmp_path / "checkpoint-5.pth.tar") as handle:
        assert handle.metadata()["epoch"] == "5" and handle.metadata()["best_metric"] == "0.81"
        assert torch.equal(handle.read_ema("wte.weight"), sd["wte.weight"] + 1)
        assert torch.equal(handle.read("wte.weight"), sd["wte.weight"])
    with open_checkpoint(tmp_path / "checkpoint_best.pt") as handle:
        assert handle.metadata()["step"] == "1000"
        assert [i.name for i in handle.tensors()] == list(sd)


def test_dcp_folder_single_process(tmp_path: Path) -> None:
    folder = tmp_path / "step-40"
    sd = dcp_checkpoint(folder, step=40)
    assert any(folder.glob("__*_*.distcp"))
    assert detect_layout(folder) == "dcp"
    _assert_same(_read_all(folder), sd)
    model, opt = trained()
    with open_checkpoint(folder) as handle:
        assert handle.metadata()["step"] == "40"
        assert handle.original_name("wte.weight") == "wte.weight"          # the model's key, not DCP's "model.wte.weight"
        assert torch.equal(handle.read("model.wte.weight"), sd["wte.weight"])
        param = dict(model.named_parameters())["h.0.fc.weight"]
        assert torch.equal(handle.read_optimizer("h.0.fc.weight.exp_avg_sq"), opt.state[param]["exp_avg_sq"])
    assert not torch.distributed.is_initialized()


# ---- discovery and cross-checkpoint use --------------------------------------------------------

def test_open_run_finds_hf_dcp_and_pickle_checkpoints_with_metadata_steps(tmp_path: Path) -> None:
    hf_checkpoint(tmp_path / "hf" / "checkpoint-100", 100, shard=True)
    hf_checkpoint(tmp_path / "hf" / "checkpoint-200", 200)
    run = open_run(tmp_path / "hf")
    assert [(c.step, c.layout, c.step_source) for c in run.checkpoints] == [
        (100, "hf_folder", "metadata"), (200, "hf_folder", "metadata")]
    dcp_checkpoint(tmp_path / "dcp" / "ckpt_a", step=10)
    dcp_checkpoint(tmp_path / "dcp" / "ckpt_b", step=20)
    assert [(c.step, c.layout) for c in open_run(tmp_path / "dcp").checkpoints] == [(10, "dcp"), (20, "dcp")]
    (tmp_path / "nano" / "out").mkdir(parents=True)
    nanogpt_ckpt(tmp_path / "nano" / "out" / "ckpt.pt", iter_num=600)
    assert [(c.step, c.layout) for c in open_run(tmp_path / "nano").checkpoints] == [(600, "torch_pickle")]
    assert [c.step for c in open_run(tmp_path / "dcp" / "ckpt_a").checkpoints] == [10]


def test_merge_across_wrapper_prefixes_writes_newest_inputs_names(tmp_path: Path) -> None:
    a = plain_state_dict(tmp_path / "step_1.pt", seed=1, prefix="module.")
    b = plain_state_dict(tmp_path / "step_2.pt", seed=2, prefix="_orig_mod.")
    refs = [checkpoint_ref(tmp_path / "step_1.pt"), checkpoint_ref(tmp_path / "step_2.pt")]
    result = merge_checkpoints(refs, [0.5, 0.5], tmp_path / "merged")
    merged = load_file(result.model_file)
    assert set(merged) == set(b)
    for key in b:
        plain = key.removeprefix("_orig_mod.")
        assert torch.allclose(merged[key], (a["module." + plain] + b[key]) / 2)


def test_layout_mismatch_is_reported_precisely(tmp_path: Path) -> None:
    sd = trained()[0].state_dict()
    save_file(sd, tmp_path / "step_1.safetensors")
    changed = dict(sd, **{"wte.weight": torch.zeros(20, 8)})
    del changed["h.1.fc.bias"]
    save_file(changed, tmp_path / "step_2.safetensors")
    with open_checkpoint(tmp_path / "step_1.safetensors") as a, open_checkpoint(tmp_path / "step_2.safetensors") as b:
        diff = compare_layouts(a.tensors(), b.tensors())
    assert diff.missing == ("h.1.fc.bias",) and diff.extra == ()
    assert diff.reshaped == (("wte.weight", (20, 8), (16, 8)),)
    assert diff.describe() == "1 missing: h.1.fc.bias; 1 shape differs: wte.weight (20, 8) vs (16, 8)"
    result = _cli("analyze", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    mismatch = json.loads(result.stdout)["checkpoints"][0]["mismatch"]
    assert "wte.weight" in mismatch and "h.1.fc.bias" in mismatch


def test_health_reports_per_layer_norms_and_nonfinite_tensors(tmp_path: Path) -> None:
    sd = trained()[0].state_dict()
    sd["h.1.fc.weight"][0, 0] = float("nan")
    save_file(sd, tmp_path / "step_3.safetensors")
    health = check_health(checkpoint_ref(tmp_path / "step_3.safetensors"))
    assert not health.finite and health.nonfinite_tensors == ("h.1.fc.weight",)
    layers = dict(health.layer_norms)
    assert set(layers) == {"wte", "h.0", "h.1", "lm_head"}
    assert math.isclose(sum(v * v for v in layers.values()), health.norm ** 2, rel_tol=1e-6)
    assert math.isclose(layers["h.0"], math.sqrt(sum(float(t.square().sum()) for k, t in sd.items() if k.startswith("h.0."))), rel_tol=1e-6)
    assert layer_of("model.layers.11.mlp.up_proj.weight") == "model.layers.11"


# ---- bad input ---------------------------------------------------------------------------------

def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("header,data,problem", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed header"),
])
def test_lying_safetensors_header_exits_2(tmp_path: Path, header: dict, data: bytes, problem: str) -> None:
    path = tmp_path / "step_1.safetensors"
    path.write_bytes(_safetensors_bytes(header, data))
    with pytest.raises(CheckpointReadError, match=problem):
        open_checkpoint(path)
    if problem != "truncated":
        return   # one CLI round trip covers the exit code; the reader pins each message
    result = _cli("analyze", str(tmp_path))
    assert result.returncode == 2 and "step_1.safetensors" in result.stderr and problem in result.stderr


@pytest.mark.parametrize("kind", ["safetensors", "pt", "ckpt", "distcp", "dcp_metadata"])
def test_truncated_files_are_refused(tmp_path: Path, kind: str) -> None:
    sd = trained()[0].state_dict()
    if kind == "safetensors":
        path = tmp_path / "step_1.safetensors"
        save_file(sd, path)
    elif kind in ("pt", "ckpt"):
        path = tmp_path / f"step_1.{kind}"
        lightning_ckpt(path)
    else:
        folder = tmp_path / "step_1"
        dcp_checkpoint(folder)
        path = next(folder.glob("*.distcp")) if kind == "distcp" else folder / ".metadata"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    target = path.parent if kind.startswith("dcp") or kind == "distcp" else path
    with pytest.raises(CheckpointReadError, match=path.parent.name if target != path else path.name):
        with open_checkpoint(target) as handle:   # a truncated .distcp fails on the first read
            for info in handle.tensors():
                handle.read(info.name)
    # Nothing half-loaded: a run with nothing readable is refused as a whole, naming the file (issue 19).
    with pytest.raises(RunNotFound, match=f"nothing here could be read: checkpoint .*{target.name}"):
        open_run(tmp_path)


def test_index_pointing_at_missing_shard(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-100"
    hf_checkpoint(folder, 100, shard=True)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointReadError, match=f"missing shard.*{shard.name}"):
        open_checkpoint(folder)
    # The run still opens on its trainer_state.json log; the checkpoint is listed as unreadable (issue 19).
    result = _cli("analyze", str(tmp_path))
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert f"passed over checkpoint {folder} (step 100): " in result.stdout and shard.name in result.stdout


def test_empty_folder_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFound):
        open_run(tmp_path / "empty")
    with pytest.raises(CheckpointReadError, match="not a checkpoint layout"):
        open_checkpoint(tmp_path / "empty")
    result = _cli("analyze", str(tmp_path / "empty"))
    assert result.returncode == 2 and "empty" in result.stderr


def test_data_only_globals_are_allowed_numpy_scalars_and_namespace(tmp_path: Path) -> None:
    """nanoGPT forks store np.float64 losses and fairseq stores argparse args: plain data, read safely."""
    import argparse

    import numpy as np
    sd = trained()[0].state_dict()
    torch.save({"model": sd, "iter_num": np.int64(900), "best_val_loss": np.float64(1.25),
                "args": argparse.Namespace(lr=3e-4, arch="tiny")}, tmp_path / "ckpt.pt")
    with open_checkpoint(tmp_path / "ckpt.pt") as handle:
        meta = handle.metadata()
    assert (meta["step"], meta["best_metric"], meta["args.arch"]) == ("900", "1.25", "tiny")
    assert not torch.serialization.get_safe_globals() or argparse.Namespace not in torch.serialization.get_safe_globals()


def test_pickle_without_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save({"hello": "world", "n": 3}, tmp_path / "notes.pt")
    with pytest.raises(NotACheckpoint, match="holds no state dict"):
        open_checkpoint(tmp_path / "notes.pt")


# ---- properties --------------------------------------------------------------------------------

_names = st.lists(st.from_regex(r"[a-z]{1,6}(\.[a-z0-9]{1,4}){0,3}", fullmatch=True), min_size=1, max_size=8, unique=True)


@settings(max_examples=60, deadline=None)
@given(names=_names, wrappers=st.lists(st.sampled_from(["module.", "_orig_mod.", "model."]), max_size=3))
def test_wrapper_prefixes_never_change_normalised_names(names: list[str], wrappers: list[str]) -> None:
    prefix = "".join(wrappers)
    plain, wrapped = KeyMap(names), KeyMap([prefix + n for n in names])
    assert [plain.normalize(n) for n in names] == [wrapped.normalize(prefix + n) for n in names]
    assert all(wrapped.original(wrapped.normalize(prefix + n)) == prefix + n for n in names)


def test_prefix_is_only_stripped_when_every_key_has_it() -> None:
    assert common_wrapper_prefix(["model.layers.0.w", "lm_head.weight"]) == ""
    assert common_wrapper_prefix(["module.model.a", "module.model.b"]) == "module.model."
