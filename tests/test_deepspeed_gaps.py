"""DeepSpeed ZeRO-3 tags and fp16 shards with a pickled loss scaler, written as DeepSpeed's saver writes them (issue 21).

DeepSpeed is not installed: the files are ``torch.save`` of the very structures ``engine.save_checkpoint``
writes for stage 3 (``zero_pp_rank_R_mp_rank_00_model_states.pt`` with empty parameter placeholders,
``param_shapes`` per sub-group, frozen fragments; ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` whose
``optimizer_state_dict`` holds ``fp32_flat_groups`` and the inner Adam state dict, ``ZeroStageEnum.weights``
and the ``LossScaler``). Each parameter is cut as ZeRO-3 cuts it: ceil(numel / world) elements per rank, the
last rank padded. The DeepSpeed classes the pickles name are made in a module registered in ``sys.modules``
only while the files are WRITTEN, and removed before reading: the reader needs no DeepSpeed import.
"""

from __future__ import annotations

import enum
import math
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from analysis.checkpoints import detect_layout, open_checkpoint, optimizer_state
from analysis.checkpoints.deepspeed import SKIPPED_NOTE
from analysis.cli import main
from analysis.run import open_run
from test_field_layouts import write_deepspeed_tag

DS_VERSION = "0.16.4"
WORLD = 2


class OddNet(nn.Module):
    """Every parameter has an odd element count, so a world of 2 pads each one; a buffer and a frozen matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(7, 3)
        self.ln = nn.LayerNorm(3)
        self.fc = nn.Linear(3, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.frozen = nn.Parameter(torch.randn(3, 3), requires_grad=False)
        self.register_buffer("pos", torch.arange(5, dtype=torch.float32) / 3)


def _classes(module: types.ModuleType, names: dict[str, type]) -> None:
    """Put ``names`` in ``module`` and ``module`` (with its parent packages) in ``sys.modules``."""
    for name, cls in names.items():
        cls.__module__, cls.__qualname__, cls.__name__ = module.__name__, name, name
        setattr(module, name, cls)
    parts = module.__name__.split(".")
    for depth in range(1, len(parts)):
        sys.modules.setdefault(".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    sys.modules[module.__name__] = module


@pytest.fixture
def deepspeed_writing() -> Iterator[dict[str, type]]:
    """DeepSpeed's pickled classes at their module paths, in ``sys.modules`` only while the test writes files."""
    class LossScaler:
        def __init__(self, scale: float = 1) -> None:
            self.cur_scale, self.dynamic = scale, False

    class DynamicLossScaler:
        def __init__(self, init_scale: float, scale_window: int, min_scale: float) -> None:
            self.cur_scale, self.dynamic, self.cur_iter, self.last_overflow_iter = init_scale, True, 0, -1
            self.scale_factor, self.scale_window, self.min_scale = 2.0, scale_window, min_scale
            self.delayed_shift = self.cur_hysteresis = 2
            self.consecutive_hysteresis, self.raise_error_at_min_scale, self.dtype = False, True, torch.half

    ZeroStageEnum = enum.IntEnum("ZeroStageEnum", {"disabled": 0, "optimizer_states": 1, "gradients": 2, "weights": 3})
    scaler = types.ModuleType("deepspeed.runtime.fp16.loss_scaler")
    config = types.ModuleType("deepspeed.runtime.zero.config")
    assert "deepspeed" not in sys.modules   # DeepSpeed is not installed here; nothing else made one
    _classes(scaler, {"LossScaler": LossScaler, "DynamicLossScaler": DynamicLossScaler})
    _classes(config, {"ZeroStageEnum": ZeroStageEnum})
    try:
        yield {"LossScaler": LossScaler, "DynamicLossScaler": DynamicLossScaler, "ZeroStageEnum": ZeroStageEnum}
    finally:
        forget_deepspeed()


def forget_deepspeed() -> None:
    """Take every ``deepspeed`` module out of ``sys.modules`` (reading must not need one)."""
    for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
        del sys.modules[name]


def trained_oddnet(seed: int, steps: int = 3) -> tuple[OddNet, torch.optim.Optimizer, list[list[str]], list[int]]:
    """OddNet after ``steps`` AdamW steps; its ZeRO-3 sub-groups (names) and each sub-group's param group."""
    torch.manual_seed(seed)
    model = OddNet()
    named = dict(model.named_parameters())
    # Param group 0 (decay) split into two sub-groups as sub_group_size does; group 1 (no decay) is one.
    sub_groups = [["wte.weight", "fc.weight"], ["head.weight"], ["ln.weight", "ln.bias", "fc.bias"]]
    owner = [0, 0, 1]
    opt = torch.optim.AdamW([{"params": [named[n] for g in sub_groups[:2] for n in g], "weight_decay": 0.1},
                             {"params": [named[n] for n in sub_groups[2]], "weight_decay": 0.0}], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        x = model.ln(model.wte(torch.arange(7)))
        loss = model.head(model.fc(x) + model.pos).square().mean()
        loss.backward()
        opt.step()
    return model, opt, sub_groups, owner


def zero3_pieces(flat: torch.Tensor, world: int) -> list[torch.Tensor]:
    """ZeRO-3's cut of one parameter: ceil(numel / world) elements per rank, the last padded with zeros."""
    part = math.ceil(flat.numel() / world)
    padded = torch.cat([flat, flat.new_zeros(part * world - flat.numel())])
    return [padded[r * part:(r + 1) * part].clone() for r in range(world)]


def _rank_flat(tensors: list[torch.Tensor], rank: int, world: int) -> torch.Tensor:
    """One sub-group's flat partition on ``rank``: its parameters' pieces one after another."""
    return torch.cat([zero3_pieces(t.detach().reshape(-1).float(), world)[rank] for t in tensors])


def write_zero3_tag(tag: Path, step: int, seed: int, classes: dict[str, type], world: int = WORLD,
                    scaler: object | None = None) -> dict:
    """A ZeRO-3 ``global_stepN/`` folder as DeepSpeed's engine saves it; returns what was written."""
    model, opt, sub_groups, owner = trained_oddnet(seed)
    named = dict(model.named_parameters())
    tag.mkdir(parents=True)
    stage = classes["ZeroStageEnum"].weights
    scaler = scaler if scaler is not None else classes["LossScaler"](1.0)
    for rank in range(world):
        module = OrderedDict((k, torch.empty(0, dtype=torch.bfloat16) if k in named else v.to(torch.bfloat16))
                             for k, v in model.state_dict().items())   # placeholders; buffers are real
        torch.save({"module": module, "buffer_names": ["pos"], "optimizer": None,
                    "param_shapes": [OrderedDict((n, named[n].shape) for n in g) for g in sub_groups],
                    "frozen_param_shapes": OrderedDict(frozen=named["frozen"].shape), "shared_params": {},
                    "frozen_param_fragments": OrderedDict(
                        frozen=zero3_pieces(named["frozen"].detach().reshape(-1).bfloat16(), world)[rank]),
                    "lr_scheduler": None, "data_sampler": None, "random_ltd": None,
                    "sparse_tensor_module_names": set(), "skipped_steps": 0, "global_steps": step,
                    "global_samples": step * 8, "dp_world_size": world, "mp_world_size": 1,
                    "ds_config": {"train_batch_size": 8, "zero_optimization": {"stage": 3}}, "ds_version": DS_VERSION},
                   tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        inner = {"state": {i: {"step": torch.tensor(float(opt.state[named[g[0]]]["step"])),
                               **{k: _rank_flat([opt.state[named[n]][k] for n in g], rank, world)
                                  for k in ("exp_avg", "exp_avg_sq")}} for i, g in enumerate(sub_groups)},
                 "param_groups": [{"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": wd,
                                   "params": [i for i, o in enumerate(owner) if o == group]}
                                  for group, wd in enumerate((0.1, 0.0))]}
        state = {"zero_stage": stage, "loss_scaler": scaler, "dynamic_loss_scale": False, "overflow": False,
                 "partition_count": world, "optimizer_state_dict": inner,
                 "fp32_flat_groups": [_rank_flat([named[n] for n in g], rank, world) for g in sub_groups]}
        torch.save({"optimizer_state_dict": state, "ds_config": {"train_batch_size": 8}, "ds_version": DS_VERSION},
                   tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (tag.parent / "latest").write_text(tag.name)
    return {"weights": {**{n: p.detach().clone() for n, p in named.items()}, "pos": model.pos.clone()},
            "moments": {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
                        for n, p in named.items() if p.requires_grad},
            "adam_step": int(opt.state[named["wte.weight"]]["step"])}


def test_zero3_weights_and_moments_gather_exactly(tmp_path: Path, deepspeed_writing: dict[str, type]) -> None:
    """Issue 21: a ZeRO-3 tag (world 2, every parameter padded, 3 sub-groups) reads back every tensor exactly."""
    tag = tmp_path / "run" / "global_step30"
    written = write_zero3_tag(tag, 30, seed=1, classes=deepspeed_writing)
    forget_deepspeed()
    assert detect_layout(tag) == "deepspeed"
    with open_checkpoint(tag) as handle:
        infos = {i.name: i for i in handle.tensors()}
        assert set(infos) == set(written["weights"])
        for name, tensor in written["weights"].items():
            read = handle.read(name)
            expected = tensor.bfloat16() if name in ("frozen", "pos") else tensor   # saved 16-bit, as DeepSpeed does
            assert torch.equal(read, expected), name
            assert infos[name].shape == tuple(tensor.shape)
        names = {i.name for i in optimizer_state(handle)}
        assert names == {f"{n}.{k}" for n in written["moments"] for k in ("exp_avg", "exp_avg_sq")}
        for name, moments in written["moments"].items():
            for key, value in moments.items():
                assert torch.equal(handle.read_optimizer(f"{name}.{key}"), value), (name, key)
        meta = handle.metadata()
        assert meta["step"] == "30" and SKIPPED_NOTE not in meta
        assert meta["optimizer.adam_step"] == str(written["adam_step"]) and float(meta["optimizer.lr"]) == 1e-2
    assert "deepspeed" not in sys.modules


def test_zero3_run_merges_to_the_float32_average(tmp_path: Path, deepspeed_writing: dict[str, type],
                                                 capsys: pytest.CaptureFixture) -> None:
    """Issue 21: merge --checkpoints of two ZeRO-3 tags equals the float32 average of the gathered masters."""
    from safetensors.torch import load_file
    a = write_zero3_tag(tmp_path / "a" / "global_step10", 10, seed=2, classes=deepspeed_writing)
    b = write_zero3_tag(tmp_path / "b" / "global_step20", 20, seed=3, classes=deepspeed_writing)
    forget_deepspeed()
    out = tmp_path / "merged"
    assert main(["merge", "--checkpoints", str(tmp_path / "a" / "global_step10"),
                 "--checkpoints", str(tmp_path / "b" / "global_step20"), "--dtype", "float32", "-o", str(out)]) == 0
    merged = load_file(str(out / "model.safetensors"))
    for name in ("wte.weight", "fc.bias", "head.weight"):
        assert torch.equal(merged[name], (a["weights"][name] + b["weights"][name]) / 2), name


def test_zero3_run_opens_and_its_moments_feed_the_noise(tmp_path: Path, deepspeed_writing: dict[str, type],
                                                        capsys: pytest.CaptureFixture) -> None:
    """Issue 21: a folder of ZeRO-3 tags (and an HF checkpoint-N with ZeRO-3 shards beside model.safetensors) opens
    as one run; the iterate noise reads the gathered second moments; recommend works."""
    import json

    from safetensors.torch import save_file

    from analysis.signals.noise import iterate_noise
    run_dir = tmp_path / "zero3_run"
    written = {s: write_zero3_tag(run_dir / f"global_step{s}", s, seed=s, classes=deepspeed_writing) for s in (10, 20, 30)}
    rows = [{"step": s, "train/loss": 3.0 - 0.01 * s} for s in range(31)]
    rows += [{"step": s, "val/loss": v} for s, v in ((10, 2.6), (20, 2.55), (30, 2.54))]
    rows.sort(key=lambda r: r["step"])
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hf = tmp_path / "hf" / "checkpoint-40"
    moments = write_zero3_tag(hf / "global_step40", 40, seed=9, classes=deepspeed_writing)
    save_file({k: v.contiguous() for k, v in moments["weights"].items()}, str(hf / "model.safetensors"))
    forget_deepspeed()
    run = open_run(run_dir)
    assert [(c.step, c.layout) for c in run.checkpoints] == [(10, "deepspeed"), (20, "deepspeed"), (30, "deepspeed")]
    assert not run.unreadable and not [n for n in run.notes if "optimizer" in n]
    noise = iterate_noise(run.checkpoints[-1])
    expected = sum(float(m["exp_avg_sq"].double().sqrt().sum()) for m in written[30]["moments"].values())
    assert noise is not None and noise.sqrt_v_sum == pytest.approx(expected, rel=1e-9)
    assert main(["recommend", str(run_dir)]) == 0 and "Adam second moments" in capsys.readouterr().out
    with open_checkpoint(hf) as handle:   # HF weights, ZeRO-3 moments from the shards beside them
        assert handle.read("head.weight").dtype == torch.float32
        assert torch.equal(handle.read_optimizer("wte.weight.exp_avg_sq"), moments["moments"]["wte.weight"]["exp_avg_sq"])


def test_zero3_shard_that_does_not_fit_is_one_line(tmp_path: Path, deepspeed_writing: dict[str, type],
                                                    capsys: pytest.CaptureFixture) -> None:
    """Issue 21: a ZeRO-3 shard cut for another world size is refused naming the rank and the counts."""
    tag = tmp_path / "global_step5"
    write_zero3_tag(tag, 5, seed=4, classes=deepspeed_writing, world=3)
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    forget_deepspeed()
    assert main(["merge", "--checkpoints", str(tag), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ZeRO-3" in err and "partition count is 3 but 2" in err
    assert not (tmp_path / "out").exists()


def test_zero3_shard_with_a_global_we_do_not_allow_is_one_line(tmp_path: Path, deepspeed_writing: dict[str, type],
                                                                capsys: pytest.CaptureFixture) -> None:
    """Issue 21: ZeRO-3's weights live in the shards, so a shard we may not unpickle refuses the checkpoint, in one
    line naming the shard and the global, and pointing at zero_to_fp32.py."""
    module = types.ModuleType("deepspeed.runtime.custom_state")

    class Unknown:
        pass
    _classes(module, {"Unknown": Unknown})
    tag = tmp_path / "global_step5"
    write_zero3_tag(tag, 5, seed=4, classes=deepspeed_writing, scaler=Unknown())
    forget_deepspeed()
    assert main(["merge", "--checkpoints", str(tag), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in err
    assert "deepspeed.runtime.custom_state.Unknown" in err and "zero_to_fp32.py" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["LossScaler", "DynamicLossScaler"])
def test_fp16_shard_with_pickled_loss_scaler_reads_its_moments(tmp_path: Path, deepspeed_writing: dict[str, type],
                                                                kind: str) -> None:
    """Issue 21: a shard pickling deepspeed.runtime.fp16.loss_scaler.(Dynamic)LossScaler is read as plain data."""
    cls = deepspeed_writing[kind]
    scaler = cls(1.0) if kind == "LossScaler" else cls(2.0 ** 16, 1000, 1.0)
    tag = tmp_path / "global_step20"
    written = write_deepspeed_tag(tag, 20, seed=5, world=2, scaler=scaler)
    raw = (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes()
    assert b"deepspeed.runtime.fp16.loss_scaler" in raw and kind.encode() in raw
    forget_deepspeed()
    with pytest.raises(pickle.UnpicklingError, match=kind):   # plain weights-only loading refuses it
        torch.load(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)
    with open_checkpoint(tag) as handle:
        assert SKIPPED_NOTE not in handle.metadata()
        for name, moments in written["moments"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(handle.read_optimizer(f"{name}.{key}"), moments[key])
    assert "deepspeed" not in sys.modules


def test_other_deepspeed_global_skips_only_the_optimizer(tmp_path: Path) -> None:
    """Issue 21: a global we do not allow in an optimizer shard skips the moments with a note, never the run."""
    module = types.ModuleType("deepspeed.runtime.custom_state")

    class Unknown:
        def __init__(self) -> None:
            self.value = 1
    _classes(module, {"Unknown": Unknown})
    try:
        tag = tmp_path / "run" / "global_step10"
        write_deepspeed_tag(tag, 10, seed=6, world=1, scaler=Unknown())
    finally:
        forget_deepspeed()
    (tag.parent / "latest").write_text(tag.name)
    run = open_run(tag.parent)
    assert [c.step for c in run.checkpoints] == [10] and not run.unreadable
    notes = [n for n in run.notes if "optimizer state skipped" in n]
    assert len(notes) == 1 and "deepspeed.runtime.custom_state.Unknown" in notes[0]
    with open_checkpoint(tag) as handle:
        assert optimizer_state(handle) == [] and handle.read("lm_head.weight").dtype == torch.bfloat16


# --- Megatron-LM legacy optimizer moments (model_optim_rng.pt, non-distributed optimizer) ---------------------

def _megatron_order(names: list[str], model: dict[str, torch.Tensor]) -> list[str]:
    """Megatron's _get_param_groups order: weight-decayed params (not bias, not 1-D) first, then the rest."""
    decay = [n for n in names if not n.endswith(".bias") and model[n].dim() > 1]
    return decay + [n for n in names if n not in decay]


def add_megatron_optimizer(folder: Path, full_moments: dict[str, dict[str, torch.Tensor]], step: int,
                           per_stage: int) -> None:
    """Re-save each rank's model_optim_rng.pt with the optimizer state dict Megatron's mixed-precision optimizer
    writes (``optimizer``: the Adam state of the rank's own slices, ``grad_scaler``, ``fp32_from_fp16_params``)."""
    from test_field_layouts import _tp_slice
    for shard in sorted(folder.glob("mp_rank_*/model_optim_rng.pt")):
        parts = shard.parent.name.split("_")
        rank, stage = int(parts[2]), int(parts[3]) if len(parts) > 3 else 0
        payload = torch.load(shard, weights_only=False)   # our own file, written just before
        tp = payload["args"].tensor_model_parallel_size
        order = _megatron_order(list(payload["model"]), payload["model"])

        def global_name(name: str) -> str:
            if not name.startswith("decoder.layers."):
                return name
            index = int(name.split(".")[2])
            return name.replace(f"layers.{index}.", f"layers.{index + stage * per_stage}.", 1)
        state = {i: {"step": torch.tensor(float(step)),
                     **{k: _tp_slice(n, full_moments[global_name(n)][k], rank, tp) for k in ("exp_avg", "exp_avg_sq")}}
                 for i, n in enumerate(order)}
        decay = [i for i, n in enumerate(order) if not n.endswith(".bias") and payload["model"][n].dim() > 1]
        groups = [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": wd, "params": ids}
                  for wd, ids in ((0.1, decay), (0.0, [i for i in range(len(order)) if i not in decay]))]
        payload["optimizer"] = {"optimizer": {"state": state, "param_groups": groups},
                                "grad_scaler": {"scale": torch.tensor(65536.0), "growth_factor": 2.0},
                                "fp32_from_fp16_params": [[payload["model"][order[i]].float() for i in g["params"]]
                                                          for g in groups]}
        torch.save(payload, shard)


def test_megatron_legacy_moments_stitch_back_and_feed_the_noise(tmp_path: Path) -> None:
    """Issue 21: Megatron legacy Adam moments (TP=2 x PP=2, mixed-precision optimizer) read back equal to the unsplit
    moments, named like the weights; the iterate noise reads them with Adam's own step count."""
    from analysis.signals.noise import iterate_noise
    from test_field_layouts import mcore_state_dict, write_megatron_legacy
    run_dir = tmp_path / "megatron"
    for it in (100, 200):
        full = mcore_state_dict(seed=it)
        gen = torch.Generator().manual_seed(it + 1)
        moments = {n: {"exp_avg": torch.randn(t.shape, generator=gen) / 100,
                       "exp_avg_sq": torch.rand(t.shape, generator=gen) / 1e4} for n, t in full.items()}
        folder = run_dir / f"iter_{it:07d}"
        write_megatron_legacy(folder, full, it, tp=2, pp=2)
        add_megatron_optimizer(folder, moments, it, per_stage=1)
    (run_dir / "latest_checkpointed_iteration.txt").write_text("200")
    with open_checkpoint(folder) as handle:
        infos = {i.name: i.shape for i in optimizer_state(handle)}
        assert infos == {f"{n}.{k}": tuple(t.shape) for n, t in full.items() for k in ("exp_avg", "exp_avg_sq")}
        for name, moment in moments.items():
            for key, value in moment.items():
                assert torch.equal(handle.read_optimizer(f"{name}.{key}"), value), (name, key)
        assert handle.metadata()["optimizer.adam_step"] == "200" and float(handle.metadata()["optimizer.lr"]) == 3e-4
    run = open_run(run_dir)
    assert [(c.step, c.layout) for c in run.checkpoints] == [(100, "megatron"), (200, "megatron")]
    noise = iterate_noise(run.checkpoints[-1])
    assert noise is not None and noise.step == 200
    expected = sum(float(m["exp_avg_sq"].double().sqrt().sum()) for m in moments.values())
    assert noise.sqrt_v_sum == pytest.approx(expected, rel=1e-9)
