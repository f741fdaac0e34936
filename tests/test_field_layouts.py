"""DeepSpeed and Megatron-LM checkpoint layouts, written as their savers write them (issue 21).

DeepSpeed is not installed in CI: its files are made with ``torch.save`` of the very dict structure
``engine.save_checkpoint`` writes (``mp_rank_00_model_states.pt``, ``zero_pp_rank_R_mp_rank_00_optim_states.pt``,
``latest``), each group's parameters flattened, padded to 2 x world size and cut into one partition per rank
as ZeRO-1/2 does. Real shards pickle DeepSpeed's ``LossScaler``: a stand-in class of that module path
(``deepspeed.runtime.fp16.loss_scaler``) made in a temporary folder on ``sys.path`` writes that pickle.
The Adam moments are compared with ``torch.optim.AdamW``'s own per-parameter state, computed apart.
"""

from __future__ import annotations

import json
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from safetensors.torch import save_file

from analysis.checkpoints import detect_layout, open_checkpoint, optimizer_state
from analysis.cli import main
from analysis.run import open_run
from analysis.signals.noise import iterate_noise
from ckpt_factories import trained

DS_VERSION = "0.16.4"
STEPS = (10, 20, 30)


# Stand-ins for the DeepSpeed classes real shards pickle, at DeepSpeed's module paths (class bodies as DeepSpeed's).
STANDINS = {
    "deepspeed/runtime/fp16/loss_scaler.py":
        "class LossScaler:\n    def __init__(self, scale):\n        self.cur_scale = scale\n",
    "deepspeed/utils/tensor_fragment.py":
        "from dataclasses import dataclass\n@dataclass\nclass fragment_address:\n    numel: int\n    start: int\n",
    "deepspeed/runtime/zero/config.py":
        "from enum import IntEnum\nclass ZeroStageEnum(IntEnum):\n    disabled = 0\n    optimizer_states = 1\n"
        "    gradients = 2\n    weights = 3\n",
}


@pytest.fixture
def deepspeed_standins(tmp_path: Path) -> Iterator[None]:
    """The stand-in ``deepspeed`` package on ``sys.path`` for the test only, removed after."""
    root = tmp_path / "standin"
    for relative, source in STANDINS.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)
        for folder in target.relative_to(root).parents:
            if folder != Path("."):
                (root / folder / "__init__.py").touch()
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
            del sys.modules[name]


@pytest.fixture
def loss_scaler_class(deepspeed_standins: None) -> type:
    """The stand-in ``deepspeed.runtime.fp16.loss_scaler.LossScaler``."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    return LossScaler


def _partitions(flat: torch.Tensor, world: int) -> tuple[list[torch.Tensor], list[int]]:
    """ZeRO-1/2's cut of one group: pad to 2 x world, equal partitions, (partitions, per-rank padding)."""
    align = 2 * world
    padded = math.ceil(flat.numel() / align) * align
    full = torch.cat([flat, flat.new_zeros(padded - flat.numel())])
    size = padded // world
    parts = [full[r * size:(r + 1) * size].clone() for r in range(world)]
    pads = [max(0, min(size, (r + 1) * size - flat.numel())) for r in range(world)]
    return parts, pads


def write_deepspeed_tag(tag: Path, step: int, seed: int, world: int = 1, scaler: object | None = None,
                        bf16_optimizer: bool = False, stage: object = 2) -> dict:
    """A ``global_stepN/`` folder as DeepSpeed's engine saves it; returns the weights and moments written."""
    model, opt = trained(seed)
    named = dict(model.named_parameters())
    groups = [[n for n, p in named.items() if p.dim() >= 2], [n for n, p in named.items() if p.dim() < 2]]
    # A flat group has moments for every element: a parameter that got no gradient keeps zeros (Adam's start).
    moments = {n: {k: opt.state[p].get(k, torch.zeros_like(p)).detach().clone() for k in ("exp_avg", "exp_avg_sq")}
               for n, p in named.items()}
    tag.mkdir(parents=True)
    module = OrderedDict((k, v.to(torch.bfloat16)) for k, v in model.state_dict().items())
    torch.save({"module": module, "buffer_names": [], "optimizer": None,
                "param_shapes": [OrderedDict((n, named[n].shape) for n in g) for g in groups],
                "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
                "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(),
                "skipped_steps": 0, "global_steps": step, "global_samples": step * 8, "dp_world_size": world,
                "mp_world_size": 1, "ds_config": {"train_batch_size": 8, "zero_optimization": {"stage": 2}},
                "ds_version": DS_VERSION}, tag / "mp_rank_00_model_states.pt")
    flat = {key: [_partitions(torch.cat([moments[n][key].reshape(-1) for n in g]), world) for g in groups]
            for key in ("exp_avg", "exp_avg_sq")}
    master = [_partitions(torch.cat([named[n].detach().reshape(-1) for n in g]), world) for g in groups]
    for rank in range(world):
        pads = [master[g][1][rank] for g in range(len(groups))]
        base = {"state": {g: {"step": torch.tensor(float(step)), "exp_avg": flat["exp_avg"][g][0][rank],
                              "exp_avg_sq": flat["exp_avg_sq"][g][0][rank]} for g in range(len(groups))},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": wd, "params": [g]}
                                 for g, wd in enumerate((0.1, 0.0))]}
        lean = [master[g][0][rank][:master[g][0][rank].numel() - pads[g]].clone() for g in range(len(groups))]
        if bf16_optimizer:   # BF16_Optimizer.state_dict(): padded fp32 partitions, fragment addresses, no stage
            from deepspeed.utils.tensor_fragment import fragment_address
            state = {"clip_grad": 1.0, "base_optimizer_state": base,
                     "single_partition_of_fp32_groups": [master[g][0][rank] for g in range(len(groups))],
                     "group_paddings": pads, "partition_count": [world] * len(groups), "ds_version": DS_VERSION,
                     "param_slice_mappings": [OrderedDict((n, fragment_address(numel=named[n].numel(), start=0))
                                                          for n in g) for g in groups]}
        else:
            state = {"dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0, "base_optimizer_state": base,
                     "single_partition_of_fp32_groups": lean, "zero_stage": stage, "group_paddings": pads,
                     "partition_count": [world] * len(groups), "ds_version": DS_VERSION}
        if scaler is not None:
            state = {"loss_scaler": scaler, **state}
        prefix = "bf16_" if bf16_optimizer else ""
        torch.save({"optimizer_state_dict": state, "ds_config": {"train_batch_size": 8}, "ds_version": DS_VERSION},
                   tag / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return {"module": module, "moments": moments, "lr": 1e-3}


def write_deepspeed_run(root: Path, scaler: object | None = None, world: int = 1) -> dict[int, dict]:
    """Three DeepSpeed saves, a ``latest`` file and a JSONL log whose val loss falls then flattens."""
    written = {s: write_deepspeed_tag(root / f"global_step{s}", s, seed=s, world=world, scaler=scaler) for s in STEPS}
    (root / "latest").write_text(f"global_step{STEPS[-1]}")
    rows = [{"step": s, "train/loss": 3.0 - 0.01 * s} for s in range(0, 31)]
    rows += [{"step": s, "val/loss": v} for s, v in zip(STEPS, (2.60, 2.55, 2.54))]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return written


def test_deepspeed_run_with_a_pickled_loss_scaler_opens_with_folder_steps(tmp_path: Path, loss_scaler_class: type,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """Issue 21: optimizer shards are not checkpoints; their pickled LossScaler is read as plain data."""
    run_dir = tmp_path / "ds_run"
    write_deepspeed_run(run_dir, scaler=loss_scaler_class(1.0))
    run = open_run(run_dir)
    assert [(c.step, c.layout, c.path.name) for c in run.checkpoints] == [
        (s, "deepspeed", f"global_step{s}") for s in STEPS]
    assert not any("optim_states" in str(f) for c in run.checkpoints for f in c.files)
    from analysis.run import checkpoint_ref   # the model states file named alone: its step is global_steps
    assert checkpoint_ref(run_dir / "global_step20" / "mp_rank_00_model_states.pt").step == 20
    # Even a tag folder whose model states are gone does not turn its optimizer shard into a checkpoint.
    assert detect_layout(run_dir / "global_step10" / "zero_pp_rank_0_mp_rank_00_optim_states.pt") is None
    assert not run.unreadable
    # The pickled LossScaler is read as plain data now (tests/test_deepspeed_gaps.py): nothing is skipped.
    assert not [n for n in run.notes if "optimizer state skipped" in n]
    val = run.metric("val_loss")
    assert list(val["step"]) == list(STEPS)   # the log attaches: its steps are the checkpoints' steps
    with open_checkpoint(run.checkpoints[0].path) as handle:
        assert handle.metadata()["step"] == "10" and len(optimizer_state(handle)) == 2 * len(handle.tensors())
        assert handle.read("lm_head.weight").dtype == torch.bfloat16
    recipe_path = tmp_path / "recipe.yaml"
    assert main(["recommend", str(run_dir), "-o", str(recipe_path)]) == 0
    out = capsys.readouterr().out
    recipe = yaml.safe_load(recipe_path.read_text())
    steps = [c["step"] for c in recipe["checkpoints"]]
    assert out.count("aken with weight") == len(steps) and set(steps) <= set(STEPS)
    assert {int(k) for k in recipe["reasons"]} == set(STEPS)   # keyed by the real steps, not one '0' (issue 21)


def test_deepspeed_moments_equal_adams_own_state(tmp_path: Path) -> None:
    """Issue 21: a loadable shard's flat groups are cut back into each parameter's Adam moments."""
    for world in (1, 3):
        tag = tmp_path / f"w{world}" / "global_step20"
        written = write_deepspeed_tag(tag, 20, seed=4, world=world)
        assert detect_layout(tag) == "deepspeed"
        with open_checkpoint(tag) as handle:
            names = {i.name for i in optimizer_state(handle)}
            assert names == {f"{n}.{k}" for n in written["moments"] for k in ("exp_avg", "exp_avg_sq")}
            for name, moments in written["moments"].items():
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(handle.read_optimizer(f"{name}.{key}"), moments[key])
            assert float(handle.metadata()["optimizer.lr"]) == 1e-3


def test_bf16_optimizer_shards_with_plain_data_globals_are_read(tmp_path: Path, deepspeed_standins: None) -> None:
    """Issue 21: BF16_Optimizer shards pickle fragment_address (and ZeRO-1/2 a ZeroStageEnum): plain data, read."""
    from deepspeed.runtime.zero.config import ZeroStageEnum
    bf16 = tmp_path / "bf16" / "global_step40"
    zero2 = tmp_path / "zero2" / "global_step40"
    written = write_deepspeed_tag(bf16, 40, seed=7, world=2, bf16_optimizer=True)
    assert written["moments"].keys() == write_deepspeed_tag(zero2, 40, seed=7, world=2,
                                                            stage=ZeroStageEnum.gradients)["moments"].keys()
    for tag in (bf16, zero2):
        with open_checkpoint(tag) as handle:
            assert "ckpt_select_skipped" not in handle.metadata()
            for name, moments in written["moments"].items():
                assert torch.equal(handle.read_optimizer(f"{name}.exp_avg_sq"), moments["exp_avg_sq"])


def test_hf_trainer_zero2_folder_uses_the_adam_state_in_global_step(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """Issue 21: HF Trainer + ZeRO-2 (model.safetensors beside global_stepN/) reads the moments for the noise."""
    run_dir = tmp_path / "hf_ds"
    for step in STEPS:
        folder = run_dir / f"checkpoint-{step}"
        written = write_deepspeed_tag(folder / f"global_step{step}", step, seed=step)
        save_file({k: v.float().contiguous() for k, v in written["module"].items()}, str(folder / "model.safetensors"))
        (folder / "latest").write_text(f"global_step{step}")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": [
            {"step": s, "loss": 3.0 - 0.01 * s} for s in range(1, step + 1)]}))
    run = open_run(run_dir)
    assert [(c.step, c.layout) for c in run.checkpoints] == [(s, "deepspeed") for s in STEPS]
    assert all(c.path.name == f"checkpoint-{c.step}" for c in run.checkpoints)
    assert [f.name for f in run.checkpoints[0].files][:1] == ["model.safetensors"]
    assert main(["recommend", str(run_dir)]) == 0
    assert "keep the optimizer state" not in capsys.readouterr().out   # it was kept, in global_stepN/
    noise = iterate_noise(run.checkpoints[-1])
    assert noise is not None and noise.step == STEPS[-1]
    expected = sum(float(m["exp_avg_sq"].double().sqrt().sum()) for m in written["moments"].values())
    assert noise.sqrt_v_sum == pytest.approx(expected, rel=1e-9)


def mcore_state_dict(seed: int, layers: int = 2, dim: int = 8, vocab: int = 16) -> dict[str, torch.Tensor]:
    """Full (unsplit) weights under Megatron-core's names."""
    gen = torch.Generator().manual_seed(seed)
    sd = {"embedding.word_embeddings.weight": torch.randn(vocab, dim, generator=gen)}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        sd.update({p + "input_layernorm.weight": torch.randn(dim, generator=gen),
                   p + "self_attention.linear_qkv.weight": torch.randn(3 * dim, dim, generator=gen),
                   p + "self_attention.linear_qkv.bias": torch.randn(3 * dim, generator=gen),
                   p + "self_attention.linear_proj.weight": torch.randn(dim, dim, generator=gen),
                   p + "self_attention.linear_proj.bias": torch.randn(dim, generator=gen),
                   p + "mlp.linear_fc1.weight": torch.randn(4 * dim, dim, generator=gen),
                   p + "mlp.linear_fc2.weight": torch.randn(dim, 4 * dim, generator=gen)})
    sd["decoder.final_layernorm.weight"] = torch.randn(dim, generator=gen)
    sd["output_layer.weight"] = torch.randn(vocab, dim, generator=gen)
    return sd


def _tp_slice(name: str, tensor: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Rank ``rank``'s slice, as Megatron's column/row-parallel layers hold it."""
    if any(k in name for k in ("linear_qkv", "linear_fc1", "word_embeddings", "output_layer")):
        return tensor.chunk(tp, dim=0)[rank].clone()
    if any(k in name for k in ("linear_proj", "linear_fc2")) and name.endswith("weight"):
        return tensor.chunk(tp, dim=1)[rank].clone()
    return tensor.clone()


def write_megatron_legacy(folder: Path, full: dict[str, torch.Tensor], iteration: int, tp: int = 2, pp: int = 1) -> None:
    """``iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt`` as Megatron's save_checkpoint writes it."""
    import argparse
    import random

    import numpy as np
    layers = sorted({int(n.split(".")[2]) for n in full if n.startswith("decoder.layers.")})
    per_stage = len(layers) // pp
    for stage in range(pp):
        own = {}
        for name, tensor in full.items():
            if name.startswith("decoder.layers."):
                index = int(name.split(".")[2])
                if index // per_stage != stage:
                    continue
                name = name.replace(f"layers.{index}.", f"layers.{index - stage * per_stage}.", 1)
            elif ("embedding" in name and stage != 0) or (("final_layernorm" in name or "output_layer" in name)
                                                          and stage != pp - 1):
                continue
            own[name] = tensor
        for rank in range(tp):
            sub = folder / (f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else ""))
            sub.mkdir(parents=True)
            args = argparse.Namespace(num_layers=len(layers), tensor_model_parallel_size=tp,
                                      pipeline_model_parallel_size=pp, params_dtype=torch.float32, lr=3e-4)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration,
                        "model": {n: _tp_slice(n, t, rank, tp) for n, t in own.items()},
                        "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                                       "torch_rng_state": torch.get_rng_state()}]}, sub / "model_optim_rng.pt")


def test_megatron_legacy_tensor_and_pipeline_shards_stitch_back(tmp_path: Path) -> None:
    """Issue 21: TP=2 (and TP=2 x PP=2) shards read back equal to the unsplit weights, step from ``iteration``."""
    full = mcore_state_dict(seed=1)
    for tp, pp in ((2, 1), (2, 2)):
        folder = tmp_path / f"tp{tp}pp{pp}" / "iter_0000100"
        write_megatron_legacy(folder, full, 100, tp=tp, pp=pp)
        assert detect_layout(folder) == "megatron"
        with open_checkpoint(folder) as handle:
            assert {i.name: i.shape for i in handle.tensors()} == {n: tuple(t.shape) for n, t in full.items()}
            for name, tensor in full.items():
                assert torch.equal(handle.read(name), tensor), name
            assert handle.metadata()["step"] == "100"


def test_megatron_unstitchable_layout_is_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 21: a TP-split tensor whose split dim its name does not tell, or a missing rank, is refused."""
    full = mcore_state_dict(seed=2)
    full["decoder.layers.0.mystery.weight"] = torch.randn(4, 4)
    folder = tmp_path / "iter_0000200"
    write_megatron_legacy(folder, full, 200)
    assert main(["merge", "--checkpoints", str(folder), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mystery.weight" in err and "tensor-parallel" in err
    assert not (tmp_path / "out").exists()
    gap = tmp_path / "gap" / "iter_0000300"
    write_megatron_legacy(gap, mcore_state_dict(seed=3), 300)
    (gap / "mp_rank_01" / "model_optim_rng.pt").rename(gap / "mp_rank_01" / "moved.pt")
    (gap / "mp_rank_01").rename(gap / "mp_rank_03")
    (gap / "mp_rank_03" / "moved.pt").rename(gap / "mp_rank_03" / "model_optim_rng.pt")
    assert main(["merge", "--checkpoints", str(gap), "-o", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mp_rank_01" in err and "missing" in err


def test_megatron_torch_dist_folders_read_through_dcp(tmp_path: Path) -> None:
    """Issue 21: ``iter_NNNNNNN/`` torch_dist folders (.metadata, common.pt, metadata.json) and the tracker file."""
    import argparse
    import warnings

    import torch.distributed.checkpoint as dcp
    run_dir = tmp_path / "megatron_run"
    for it in (100, 200):
        folder = run_dir / f"iter_{it:07d}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weights = mcore_state_dict(seed=it)
            moments = {m: {n: t.square() if m == "exp_avg_sq" else t / 10 for n, t in weights.items()}
                       for m in ("exp_avg", "exp_avg_sq")}
            dcp.save({**weights, "optimizer": {"state": moments}}, checkpoint_id=str(folder), no_dist=True)
        torch.save({"args": argparse.Namespace(num_layers=2, lr=3e-4), "checkpoint_version": 3.0, "iteration": it},
                   folder / "common.pt")
        (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                          "common_backend": "torch", "common_backend_version": 1}))
    (run_dir / "latest_checkpointed_iteration.txt").write_text("200")
    run = open_run(run_dir)
    assert [(c.step, c.layout) for c in run.checkpoints] == [(100, "dcp"), (200, "dcp")]
    assert not run.unreadable
    with open_checkpoint(run.checkpoints[1].path) as handle:
        assert handle.metadata()["iteration"] == "200"
        expected = mcore_state_dict(seed=200)
        fc2 = "decoder.layers.1.mlp.linear_fc2.weight"
        assert torch.equal(handle.read(fc2), expected[fc2])
        assert {i.name for i in handle.tensors()} == set(expected)
        assert torch.equal(handle.read_optimizer(f"{fc2}.exp_avg_sq"), expected[fc2].square())


def test_merge_of_deepspeed_and_megatron_legacy_is_the_float32_average(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Issue 21: merge --checkpoints across the two layouts gives the exact float32 average."""
    from safetensors.torch import load_file
    a, b = mcore_state_dict(seed=5), mcore_state_dict(seed=6)
    tag = tmp_path / "ds" / "global_step100"
    tag.mkdir(parents=True)
    torch.save({"module": OrderedDict(a), "buffer_names": [], "optimizer": None, "param_shapes": None,
                "global_steps": 100, "ds_version": DS_VERSION}, tag / "mp_rank_00_model_states.pt")
    mega = tmp_path / "mg" / "iter_0000100"
    write_megatron_legacy(mega, b, 100)
    out = tmp_path / "merged"
    assert main(["merge", "--checkpoints", str(tag), "--checkpoints", str(mega), "--dtype", "float32",
                 "-o", str(out), "--json"]) == 0
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(a)
    for name in a:
        assert torch.equal(merged[name], (a[name] + b[name]) / 2), name


def test_zero3_partitioned_weights_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 21: a ZeRO-3 tag whose optimizer shards (the partitioned weights) are missing is refused clearly."""
    tag = tmp_path / "global_step50"
    tag.mkdir()
    model, _ = trained(3)
    for rank in range(2):   # ZeRO-3 writes one model states file per rank, its parameters as empty placeholders
        torch.save({"module": OrderedDict((k, torch.empty(0)) for k in model.state_dict()), "buffer_names": [],
                    "param_shapes": [OrderedDict((n, p.shape) for n, p in model.named_parameters())],
                    "global_steps": 50, "ds_version": DS_VERSION},
                   tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    assert detect_layout(tag) == "deepspeed"
    assert main(["merge", "--checkpoints", str(tag), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    # The shards that hold the partitioned weights are gone (ZeRO-3 with them: tests/test_deepspeed_gaps.py).
    assert len(err.splitlines()) == 1 and "ZeRO-3" in err and "_optim_states.pt" in err
    assert not (tmp_path / "out").exists()
