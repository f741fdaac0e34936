"""Issue 21: a merge written as a torch.save state dict (``--out-format torch``) or a Lightning
``{"state_dict": ...}`` file (``--out-format lightning``), streamed one block at a time.

Every file here is loaded back by torch itself (``torch.load(weights_only=True, mmap=True)``) and
compared bit for bit with the safetensors merge of the same inputs; the Lightning output is
loaded by a real LightningModule, strictly; the inputs of the Lightning test come from a real
``lightning.Trainer`` run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from analysis.checkpoints.base import TensorInfo, raw_bits
from analysis.checkpoints.torch_writer import ALIGNMENT, TorchWriter
from analysis.cli import main
from analysis.merge.read import BLOCK_ELEMENTS
from analysis.run import open_run
from ckpt_factories import TinyGPT, lightning_ckpt, nanogpt_ckpt
from conftest import REPO


def _merge(inputs: list[Path], out: Path, *extra: str) -> int:
    args = [a for p in inputs for a in ("--checkpoints", str(p))]
    return main(["merge", *args, "-o", str(out), *extra])


def _mixed_inputs(root: Path) -> list[Path]:
    """Three safetensors checkpoints with every kind of tensor a real model has: fp32, bf16, fp16, an int buffer,
    a scalar, an empty tensor, and one larger than a read block (so it arrives in several blocks)."""
    paths = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        state = {"big.weight": torch.randn(3, BLOCK_ELEMENTS, generator=gen),
                 "emb.weight": torch.randn(50, 16, generator=gen).to(torch.bfloat16),
                 "half.bias": torch.randn(7, generator=gen).half(),
                 "scale": torch.randn((), generator=gen),
                 "empty": torch.zeros(0, 4),
                 "num_batches": torch.tensor([10 * seed + 3])}
        paths.append(root / f"step_{seed + 1}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def _equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    same = a.dtype == b.dtype and a.shape == b.shape
    return same and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", ["same", "float32", "bfloat16"])
def test_issue21_torch_and_lightning_outputs_equal_the_safetensors_merge_bit_for_bit(tmp_path: Path,
                                                                                      dtype: str) -> None:
    inputs = _mixed_inputs(tmp_path)
    for fmt in ("safetensors", "torch", "lightning"):
        assert _merge(inputs, tmp_path / fmt, "--out-format", fmt, "--dtype", dtype, "--weights", "1",
                      "--weights", "2", "--weights", "3") == 0
    expected = load_file(str(tmp_path / "safetensors" / "model.safetensors"))
    plain = torch.load(tmp_path / "torch" / "model.pt", weights_only=True, mmap=True)
    wrapped = torch.load(tmp_path / "lightning" / "model.ckpt", weights_only=True, mmap=True)
    assert type(plain) is dict and list(plain) == list(expected)   # a plain dict of tensors, in the input's order
    assert list(wrapped) == ["state_dict"] and list(wrapped["state_dict"]) == list(expected)
    for name, tensor in expected.items():
        assert _equal_bits(plain[name], tensor), name
        assert _equal_bits(wrapped["state_dict"][name], tensor), name
    assert plain["num_batches"].tolist() == [23]                 # non-floating tensors: the newest input's
    assert {p.name for p in (tmp_path / "torch").iterdir()} == {"model.pt", "recipe.yaml", "mergekit_config.yml"}


def test_issue21_records_are_aligned_and_the_merge_is_marked_as_ours(tmp_path: Path) -> None:
    inputs = _mixed_inputs(tmp_path)
    assert _merge(inputs, tmp_path / "run" / "merges" / "m", "--out-format", "torch") == 0
    path = tmp_path / "run" / "merges" / "m" / "model.pt"
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        for info in archive.infolist():
            name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
                int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
            assert (info.header_offset + 30 + name_len + extra_len) % ALIGNMENT == 0, info.filename
            assert info.compress_type == zipfile.ZIP_STORED
    assert names[:4] == ["archive/data.pkl", "archive/.format_version", "archive/.storage_alignment",
                         "archive/byteorder"]
    assert names[-1] == "archive/version" and sum(n.startswith("archive/data/") for n in names) == 6
    # Put inside a run, the merge is recognised as ours (the marker record), never read as a checkpoint.
    for p in inputs:
        p.rename(tmp_path / "run" / p.name)
    run = open_run(tmp_path / "run")
    assert [c.step for c in run.checkpoints] == [1, 2, 3]
    assert path.parent in {Path(p).parent for p in run.merged_outputs} or path in set(run.merged_outputs)


def test_issue21_recipe_records_the_format_and_a_recipe_merge_uses_it(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    inputs = _mixed_inputs(tmp_path)
    assert _merge(inputs, tmp_path / "first", "--out-format", "lightning") == 0
    recipe = yaml.safe_load((tmp_path / "first" / "recipe.yaml").read_text())
    assert recipe["output_format"] == "lightning"
    # Re-running the recipe written beside the merge gives the same file format, byte-identical tensors.
    assert main(["merge", str(tmp_path / "first" / "recipe.yaml"), "-o", str(tmp_path / "again")]) == 0
    first = torch.load(tmp_path / "first" / "model.ckpt", weights_only=True)["state_dict"]
    again = torch.load(tmp_path / "again" / "model.ckpt", weights_only=True)["state_dict"]
    assert all(_equal_bits(first[k], again[k]) for k in first)
    # --force replaces an earlier torch merge (it is recognised as ours) ...
    assert _merge(inputs, tmp_path / "first", "--out-format", "torch", "--force") == 0
    assert (tmp_path / "first" / "model.pt").is_file() and not (tmp_path / "first" / "model.ckpt").exists()
    capsys.readouterr()
    # ... a bad format in a recipe or a shard size for a one-file format is one line, exit 2, nothing written.
    recipe["output_format"] = "onnx"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "bad")]) == 2
    assert "output_format 'onnx' is not one of safetensors, torch, lightning" in capsys.readouterr().err
    assert _merge(inputs, tmp_path / "sharded", "--out-format", "torch", "--out-shard-size", "1MB") == 2
    err = capsys.readouterr().err
    assert "--out-shard-size applies to safetensors output only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists() and not (tmp_path / "sharded").exists()


def test_issue21_json_result_names_the_format(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = _mixed_inputs(tmp_path)
    assert _merge(inputs, tmp_path / "out", "--out-format", "torch", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["out_format"] == "torch" and doc["model_file"] == str(tmp_path / "out" / "model.pt")
    assert doc["bytes"] == (tmp_path / "out" / "model.pt").stat().st_size


class _TinyModule:
    """Built lazily: importing lightning costs seconds, only the Lightning tests pay it."""

    @staticmethod
    def make():
        import lightning as L

        class TinyModule(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = TinyGPT()

            def training_step(self, batch, batch_idx):
                tokens = batch[0]
                logits = self.model.lm_head(self.model.h[1]["ln"](self.model.wte(tokens)))
                return torch.nn.functional.cross_entropy(logits.reshape(-1, 16), tokens.reshape(-1))

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-2)

        return TinyModule


def _lightning_run(root: Path) -> list[Path]:
    """Three checkpoints of a real ``lightning.Trainer`` fit (steps 1-3), as ModelCheckpoint saves them."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 16, (12, 4))), batch_size=4)
    saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=3, callbacks=[saver], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(_TinyModule.make()(), data)
    return sorted(root.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))


def test_issue21_a_lightning_module_loads_the_lightning_output_strictly(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    inputs = _lightning_run(tmp_path / "run")
    assert [p.name for p in inputs] == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    capsys.readouterr()
    assert _merge(inputs, tmp_path / "plain") == 0
    assert "--out-format lightning" in capsys.readouterr().err   # the hint for Lightning inputs
    assert _merge(inputs, tmp_path / "light", "--out-format", "lightning") == 0
    assert "--out-format lightning" not in capsys.readouterr().err
    module = _TinyModule.make()()
    result = module.load_state_dict(torch.load(tmp_path / "light" / "model.ckpt", weights_only=True)["state_dict"])
    assert not result.missing_keys and not result.unexpected_keys
    states = [torch.load(p, weights_only=True)["state_dict"] for p in inputs]
    expected = load_file(str(tmp_path / "plain" / "model.safetensors"))
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
        mean = sum(s[name].float() for s in states) / 3
        torch.testing.assert_close(tensor, mean, rtol=1e-6, atol=1e-7)


def test_issue21_nanogpt_and_lightning_dict_inputs_keep_their_stored_names(tmp_path: Path) -> None:
    """The torch output keeps the newest input's own keys (nanoGPT's ``_orig_mod.``, Lightning's ``model.``)."""
    nano = [tmp_path / f"ckpt_{i}.pt" for i in range(2)]
    for i, path in enumerate(nano):
        nanogpt_ckpt(path, seed=i, iter_num=100 * (i + 1))
    light = [tmp_path / f"epoch={i}.ckpt" for i in range(2)]
    for i, path in enumerate(light):
        lightning_ckpt(path, seed=i, global_step=100 * (i + 1))
    assert _merge(nano, tmp_path / "nano", "--out-format", "torch") == 0
    assert _merge(light, tmp_path / "light", "--out-format", "torch") == 0
    nano_out = torch.load(tmp_path / "nano" / "model.pt", weights_only=True, mmap=True)
    light_out = torch.load(tmp_path / "light" / "model.pt", weights_only=True, mmap=True)
    assert set(nano_out) == set(torch.load(nano[-1], weights_only=True)["model"])
    assert set(light_out) == set(torch.load(light[-1], weights_only=True)["state_dict"])
    model = TinyGPT()
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in nano_out.items()})   # strict


def test_issue21_the_writer_holds_one_block_never_a_tensor(tmp_path: Path) -> None:
    """The writer's own account: the most it was handed at once is one block, not the tensor."""
    tensor = torch.randn(8, 4096)
    info = TensorInfo("w", (8, 4096), "float32", tensor.numel() * 4)
    bits = raw_bits(tensor).reshape(-1)
    with TorchWriter(tmp_path / "w.pt", [info]) as writer:
        for start in range(0, bits.size, 1024):
            writer.write_block("w", start, bits[start:start + 1024])
    assert writer.largest_block_bytes == 1024 * 4 < info.size_bytes
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True, mmap=True)["w"], tensor)


_PEAK_SCRIPT = """
import sys, tracemalloc
from pathlib import Path
from analysis.cli import main
tracemalloc.start()
inputs = sys.argv[2:]
args = [a for p in inputs for a in ("--checkpoints", p)]
assert main(["merge", *args, "-o", sys.argv[1], "--out-format", "torch", "--no-verify"]) == 0
print(tracemalloc.get_traced_memory()[1])
"""


def test_issue21_peak_memory_of_a_torch_merge_stays_far_below_the_model(tmp_path: Path) -> None:
    """A 64 MB model (4 tensors of 16 MB) merged to model.pt: Python's peak allocation stays under 16 MB."""
    paths = []
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        paths.append(tmp_path / f"step_{seed}.safetensors")
        save_file({f"layer.{i}.weight": torch.randn(2048, 2048, generator=gen) for i in range(4)}, str(paths[-1]))
    model_bytes = 4 * 2048 * 2048 * 4
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "out"), *map(str, paths)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.strip().splitlines()[-1])
    assert peak < model_bytes // 4, f"peak {peak / 1e6:.1f} MB for a {model_bytes / 1e6:.0f} MB model"
    merged = torch.load(tmp_path / "out" / "model.pt", weights_only=True, mmap=True)
    assert merged["layer.3.weight"].shape == (2048, 2048)


def _kill_inputs(root: Path) -> list[Path]:
    paths = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        paths.append(root / f"step_{seed}.safetensors")
        save_file({f"layer.{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(6)}, str(paths[-1]))
    return paths


@pytest.mark.slow
def test_issue21_kill_9_mid_write_leaves_no_finished_looking_pt(tmp_path: Path) -> None:
    """As tests/test_merge_engine.py does for safetensors: kill -9 while the hidden folder is written."""
    paths = _kill_inputs(tmp_path)
    args = [a for p in paths for a in ("--checkpoints", str(p))]
    cmd = [sys.executable, "-m", "analysis", "merge", *args, "--out-format", "torch", "--no-verify"]
    start = time.perf_counter()
    assert subprocess.run([*cmd, "-o", str(tmp_path / "whole")], cwd=REPO, capture_output=True).returncode == 0
    duration = time.perf_counter() - start
    expected = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    rng = random.Random(21)
    mid_write = 0
    for attempt in range(8):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen([*cmd, "-o", str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.perf_counter() + 2 * duration + 5
        while not list(tmp_path.glob(f".out{attempt}.partial-*/model.pt")) and proc.poll() is None \
                and time.perf_counter() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.01))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = list(tmp_path.glob(f".out{attempt}.partial-*"))
        mid_write += bool(partial)
        if out.exists():   # complete, or nothing at all: never a half-written model.pt at the target
            merged = torch.load(out / "model.pt", weights_only=True)
            assert all(torch.equal(merged[k], v) for k, v in expected.items())
        else:
            assert not list(tmp_path.glob(f"out{attempt}/model.pt"))
    assert mid_write > 0, "no kill fell while the temporary folder was being written"
    assert not [p for p in tmp_path.glob("out*/model.pt") if p.parent.name != "whole"
                and not zipfile.is_zipfile(p)]
