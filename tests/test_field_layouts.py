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


@pytest.fixture
def loss_scaler_class(tmp_path: Path) -> Iterator[type]:
    """A stand-in ``deepspeed.runtime.fp16.loss_scaler.LossScaler``, importable only during the test."""
    root = tmp_path / "standin"
    package = root / "deepspeed" / "runtime" / "fp16"
    package.mkdir(parents=True)
    for folder in (root / "deepspeed", root / "deepspeed" / "runtime", package):
        (folder / "__init__.py").write_text("")
    (package / "loss_scaler.py").write_text(
        "class LossScaler:\n    def __init__(self, scale):\n        self.cur_scale = scale\n")
    sys.path.insert(0, str(root))
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler   # the stand-in just written
        yield LossScaler
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
            del sys.modules[name]


def _partitions(flat: torch.Tensor, world: int) -> tuple[list[torch.Tensor], list[int]]:
    """ZeRO-1/2's cut of one group: pad to 2 x world, equal partitions, (partitions, per-rank padding)."""
    align = 2 * world
    padded = math.ceil(flat.numel() / align) * align
    full = torch.cat([flat, flat.new_zeros(padded - flat.numel())])
    size = padded // world
    parts = [full[r * size:(r + 1) * size].clone() for r in range(world)]
    pads = [max(0, min(size, (r + 1) * size - flat.numel())) for r in range(world)]
    return parts, pads


def write_deepspeed_tag(tag: Path, step: int, seed: int, world: int = 1, scaler: object | None = None) -> dict:
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
        state = {"dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0, "base_optimizer_state": base,
                 "single_partition_of_fp32_groups": lean, "zero_stage": 2, "group_paddings": pads,
                 "partition_count": [world] * len(groups), "ds_version": DS_VERSION}
        if scaler is not None:
            state = {"loss_scaler": scaler, **state}
        torch.save({"optimizer_state_dict": state, "ds_config": {"train_batch_size": 8}, "ds_version": DS_VERSION},
                   tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
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
    """Issue 21: optimizer shards are not checkpoints; their LossScaler skips the optimizer part, never the run."""
    run_dir = tmp_path / "ds_run"
    write_deepspeed_run(run_dir, scaler=loss_scaler_class(1.0))
    run = open_run(run_dir)
    assert [(c.step, c.layout, c.path.name) for c in run.checkpoints] == [
        (s, "deepspeed", f"global_step{s}") for s in STEPS]
    assert not any("optim_states" in str(f) for c in run.checkpoints for f in c.files)
    assert not run.unreadable
    skipped = [n for n in run.notes if "optimizer state skipped" in n]
    assert len(skipped) == 3 and "deepspeed.runtime.fp16.loss_scaler.LossScaler" in skipped[0]
    assert "re-save the weights" not in " ".join(skipped)
    val = run.metric("val_loss")
    assert list(val["step"]) == list(STEPS)   # the log attaches: its steps are the checkpoints' steps
    with open_checkpoint(run.checkpoints[0].path) as handle:
        assert handle.metadata()["step"] == "10" and optimizer_state(handle) == []
        assert handle.read("lm_head.weight").dtype == torch.bfloat16
    recipe_path = tmp_path / "recipe.yaml"
    assert main(["recommend", str(run_dir), "-o", str(recipe_path)]) == 0
    out = capsys.readouterr().out
    recipe = yaml.safe_load(recipe_path.read_text())
    steps = [c["step"] for c in recipe["checkpoints"]]
    assert out.count("aken with weight") == len(steps) and set(steps) <= set(STEPS)
    assert set(recipe.get("reasons", {})) <= {*STEPS, *map(str, STEPS)} and len(recipe.get("reasons", {})) >= len(steps)


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


def test_hf_trainer_zero2_folder_uses_the_adam_state_in_global_step(tmp_path: Path) -> None:
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
    noise = iterate_noise(run.checkpoints[-1])
    assert noise is not None and noise.step == STEPS[-1]
    expected = sum(float(m["exp_avg_sq"].double().sqrt().sum()) for m in written["moments"].values())
    assert noise.sqrt_v_sum == pytest.approx(expected, rel=1e-9)
