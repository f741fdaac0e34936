"""Issue 6, the merge engine: exact arithmetic, output layouts, interop, and safety.

Each test builds real checkpoints (safetensors, transformers' save_pretrained, torch.save)
and checks the merged files against an independent implementation in plain torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from analysis.merge import verify as merge_checks
from analysis.cli import main
from analysis.errors import MergeError
from analysis.merge.fused import fused_kernel
from analysis.merge import merge_checkpoints, merge_recipe, plan_merge
from analysis.recipe import build_recipe, load_recipe, write_recipe
from analysis.run import checkpoint_ref
from analysis.merge.read import BLOCK_ELEMENTS
from ckpt_factories import hf_checkpoint
from conftest import REPO

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def reference_average(states: list[dict[str, torch.Tensor]], weights: list[float], dtype: str) -> dict[str, torch.Tensor]:
    """The documented arithmetic on whole tensors: acc = 0; acc += w * x.float(); round once."""
    total = sum(weights)
    weights = [w / total for w in weights]
    out = {}
    for name, newest in states[-1].items():
        if not newest.is_floating_point():
            out[name] = newest
            continue
        acc = torch.zeros(newest.shape, dtype=torch.float32)
        for state, weight in zip(states, weights):
            acc += weight * state[name].float()
        out[name] = acc.to(newest.dtype if dtype == "same" else DTYPES[dtype])
    return out


def random_state(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors smaller, equal to and larger than a block, odd sizes, -0.0 values and an int buffer."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        "embed.weight": torch.randn(BLOCK_ELEMENTS // 64 + 3, 64 + 1, generator=gen),
        "block.0.weight": torch.randn(BLOCK_ELEMENTS, generator=gen) * 1e-3,
        "block.0.bias": torch.randn(7, generator=gen),
        "norm.scale": torch.tensor([-0.0, 0.0, -0.0]),
        "empty": torch.zeros(0),
    }
    state = {k: v.to(dtype) for k, v in state.items()}
    state["num_batches_tracked"] = torch.tensor(seed, dtype=torch.int64)
    return state


@pytest.mark.parametrize("in_dtype,out_dtype", [("bfloat16", "same"), ("bfloat16", "float32"),
                                                ("float32", "same"), ("float32", "bfloat16"), ("float16", "float16")])
def test_bit_identical_to_independent_float32_accumulation(tmp_path: Path, in_dtype: str, out_dtype: str) -> None:
    states = [random_state(seed, DTYPES[in_dtype]) for seed in range(5)]
    paths = []
    for index, state in enumerate(states):
        paths.append(tmp_path / f"step_{index}.safetensors")
        save_file(state, str(paths[-1]))
    weights = [0.1, 0.3, 0.05, 0.2, 0.35]
    result = merge_checkpoints([checkpoint_ref(p) for p in paths], weights, tmp_path / "out", out_dtype)
    merged = load_file(str(result.model_file))
    expected = reference_average(states, weights, out_dtype)
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert merged[name].dtype == tensor.dtype, name
        assert torch.equal(merged[name].view(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    assert merged["num_batches_tracked"].item() == 4   # copied from the newest, never averaged


def special_values_state(seed: int) -> dict[str, torch.Tensor]:
    """Values where conversions disagree if anything is off: signed zeros, infinities, NaN,
    subnormals of every width, ties at the bfloat16 and float16 rounding points, overflow."""
    gen = torch.Generator().manual_seed(seed)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 1e-45,
                             6e-8, -6e-8, 65504.0, 65520.0, 7e4, 3.0e38, -3.0e38, 1 + 2 ** -8, 1 + 3 * 2 ** -8,
                             1 + 2 ** -11, 1 + 3 * 2 ** -11])
    random = torch.randn(3 * BLOCK_ELEMENTS // 2 + 5, generator=gen) * torch.logspace(-30, 30, 3 * BLOCK_ELEMENTS // 2 + 5)
    return {"specials": specials.roll(seed), "random": random}


@pytest.mark.parametrize("in_dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("out_dtype", ["same", "float32", "bfloat16", "float16"])
def test_numpy_and_torch_adders_write_the_same_bits_as_the_reference(tmp_path: Path, in_dtype: str,
                                                                     out_dtype: str) -> None:
    from analysis.merge.plan import output_layout
    from analysis.merge.read import BlockReader
    from analysis.checkpoints import open_checkpoint
    from analysis.merge.fused import FusedAdder
    from analysis.merge.arithmetic import NumpyAdder
    from analysis.merge.torch_adder import TorchAdder, as_tensor

    states = [{k: v.to(getattr(torch, in_dtype)) for k, v in special_values_state(seed).items()} for seed in range(3)]
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for state, path in zip(states, paths):
        save_file(state, str(path))
    weights = [0.2, 0.3, 0.5]
    expected = reference_average(states, weights, out_dtype)
    handles = [open_checkpoint(p) for p in paths]
    layout = output_layout(handles[-1].tensors(), out_dtype)
    kernel = fused_kernel()
    adders = {"NumpyAdder": NumpyAdder, "TorchAdder": TorchAdder}
    if kernel is not None:      # test_fused_kernel asserts it is built wherever a C compiler is
        adders["FusedAdder"] = lambda weights, block: FusedAdder(weights, block, kernel)
    for adder_name, adder_type in adders.items():
        reader = BlockReader(handles, layout)
        adder = adder_type(weights, reader.block)
        got: dict[str, list[torch.Tensor]] = {}
        for block in reader:
            got.setdefault(block.info.name, []).append(as_tensor(adder.add(block).copy(), block.info.dtype))
        for name, tensor in expected.items():
            merged = torch.cat(got[name])
            assert merged.dtype == tensor.dtype, (adder_name, name)
            nan = tensor.isnan()
            assert torch.equal(merged.isnan(), nan), (adder_name, name)
            raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
            # Every non-NaN element bit for bit; a NaN's payload is whatever the conversion makes of it.
            assert torch.equal(merged[~nan].view(raw), tensor[~nan].view(raw)), (adder_name, name)


def test_a_nan_in_a_bfloat16_output_has_the_bits_torch_writes(tmp_path: Path) -> None:
    states = [{"w": torch.tensor([float("nan"), 1.0, -float("nan")], dtype=torch.bfloat16)} for _ in range(2)]
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for state, path in zip(states, paths):
        save_file(state, str(path))
    merged = load_file(str(merge_checkpoints([checkpoint_ref(p) for p in paths], [1, 1], tmp_path / "out").model_file))
    expected = reference_average(states, [1, 1], "same")["w"]
    assert merged["w"].view(torch.int16).tolist() == expected.view(torch.int16).tolist()


def test_float8_inputs_take_the_torch_adder_with_the_same_arithmetic(tmp_path: Path) -> None:
    states = [{"w": (torch.randn(1000, generator=torch.Generator().manual_seed(s)) * 4).to(torch.float8_e4m3fn),
               "step": torch.tensor(s)} for s in range(3)]
    paths = [tmp_path / f"{s}.safetensors" for s in range(3)]
    for state, path in zip(states, paths):
        save_file(state, str(path))
    for out_dtype in ("same", "bfloat16"):
        out = tmp_path / f"out-{out_dtype}"
        merged = load_file(str(merge_checkpoints([checkpoint_ref(p) for p in paths], [1, 2, 3], out, out_dtype).model_file))
        expected = reference_average(states, [1, 2, 3], out_dtype)
        assert merged["w"].dtype == expected["w"].dtype
        assert torch.equal(merged["w"].view(torch.uint8 if out_dtype == "same" else torch.int16),
                           expected["w"].view(torch.uint8 if out_dtype == "same" else torch.int16))
        assert merged["step"].item() == 2


def test_mixed_input_dtypes_average_as_the_reference(tmp_path: Path) -> None:
    base = random_state(7, torch.float32)
    states = [{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in base.items()}
              for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for state, path in zip(states, paths):
        save_file(state, str(path))
    merged = load_file(str(merge_checkpoints([checkpoint_ref(p) for p in paths], [1, 1, 2], tmp_path / "out").model_file))
    for name, tensor in reference_average(states, [1, 1, 2], "same").items():
        assert torch.equal(merged[name], tensor), name


@pytest.mark.parametrize("sharded", [False, True])
def test_merging_safetensors_never_imports_torch(tmp_path: Path, sharded: bool) -> None:
    """The merge of safetensors inputs (one file or shards behind an index) runs in numpy: torch's
    ~1.3 s import would be most of its time."""
    for step in (1, 2):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        state = random_state(step, torch.bfloat16)
        if sharded:
            names = sorted(state)
            shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
            for file_name, keys in shards.items():
                save_file({k: state[k] for k in keys}, str(folder / file_name))
            index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        else:
            save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}")
    script = (
        "import sys\n"
        "from analysis.cli import main\n"
        "from analysis.recipe import build_recipe, write_recipe\n"
        "from analysis.run import checkpoint_ref\n"
        "from pathlib import Path\n"
        "refs = [checkpoint_ref(Path(sys.argv[1]) / f'checkpoint-{s}') for s in (1, 2)]\n"
        "write_recipe(build_recipe('sma', refs, (0.5, 0.5)), Path(sys.argv[2]))\n"
        "try:\n"
        "    main(['merge', sys.argv[2], '-o', sys.argv[3]])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), str(tmp_path / "r.yaml"),
                          str(tmp_path / "merged")], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
    merged = {}
    for path in (tmp_path / "merged").glob("*.safetensors"):
        merged.update(load_file(str(path)))
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file() == sharded
    states = [random_state(s, torch.bfloat16) for s in (1, 2)]
    for name, tensor in reference_average(states, [0.5, 0.5], "same").items():
        assert torch.equal(merged[name], tensor), name


def test_the_progress_bar_shows_on_a_terminal_and_stays_out_of_pipes(tiny_run: Path, tmp_path: Path) -> None:
    import fcntl
    import pty
    import select
    import struct
    import termios

    refs = [checkpoint_ref(p) for p in sorted((tiny_run / "ckpt").glob("step_*.safetensors"))[-3:]]
    write_recipe(build_recipe("sma", refs, (1 / 3, 1 / 3, 1 / 3)), tmp_path / "r.yaml")
    command = [sys.executable, "-m", "analysis", "merge", str(tmp_path / "r.yaml"), "-o"]
    piped = subprocess.run([*command, str(tmp_path / "piped")], cwd=REPO, capture_output=True, text=True, check=True)
    assert "%|" not in piped.stderr and (tmp_path / "piped" / "model.safetensors").is_file()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))   # tqdm draws nothing 0 columns wide
    proc = subprocess.Popen([*command, str(tmp_path / "tty")], cwd=REPO, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:   # the child closed the terminal
                chunk = b""
            seen += chunk
            if not chunk and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait() == 0
    assert b"%|" in seen, seen[-500:]
    assert (tmp_path / "tty" / "model.safetensors").is_file()


def test_pickle_inputs_take_the_whole_tensor_path_with_the_same_arithmetic(tmp_path: Path) -> None:
    states = [random_state(seed, torch.bfloat16) for seed in range(3)]
    paths = [tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "c.safetensors"]
    save_file(states[0], str(paths[0]))
    torch.save(states[1], paths[1])
    save_file(states[2], str(paths[2]))
    refs = [checkpoint_ref(p, s) for p, s in zip(paths, (1, 2, 3))]
    # the pickle's tensors are copied beside the others, so its blocks take the compiled kernel too
    assert plan_merge(refs, [1, 2, 3], tmp_path / "out").arithmetic == ("compiled" if fused_kernel() else "numpy")
    merged = load_file(str(merge_checkpoints(refs, [1, 2, 3], tmp_path / "out").model_file))
    for name, tensor in reference_average(states, [1, 2, 3], "same").items():
        assert torch.equal(merged[name], tensor), name


def test_metadata_records_the_recipe_hash_and_progress_reaches_one(tiny_run: Path, tmp_path: Path) -> None:
    refs = [checkpoint_ref(tiny_run / "ckpt" / f"step_000{s}.safetensors") for s in (500, 550, 600)]
    recipe = build_recipe("sma", refs, (1 / 3,) * 3)
    seen: list[float] = []
    result = merge_recipe(recipe, tmp_path / "out", progress=lambda f, m: seen.append(f))
    with safe_open(str(result.model_file), "pt") as f:
        meta = f.metadata()
    assert meta["ckpt_select_recipe_sha256"] == hashlib.sha256(result.recipe_file.read_bytes()).hexdigest()
    assert seen[-1] == 1.0 and seen == sorted(seen)


def _hf_run(root: Path, shard: bool, steps=(100, 200, 300)) -> list[Path]:
    folders = []
    for seed, step in enumerate(steps):
        folder = root / f"checkpoint-{step}"
        hf_checkpoint(folder, step, seed=seed, shard=shard)
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32 + seed}))
        folders.append(folder)
    return folders


@pytest.mark.parametrize("shard", [False, True])
def test_hf_folders_give_a_loadable_hf_folder_in_the_same_layout(tmp_path: Path, shard: bool) -> None:
    from transformers import AutoModelForCausalLM

    folders = _hf_run(tmp_path / "run", shard)
    result = merge_recipe(build_recipe("wma", [checkpoint_ref(f) for f in folders], (0.25, 0.25, 0.5)), tmp_path / "out")
    names = set(result.files)
    assert {"config.json", "tokenizer_config.json", "recipe.yaml", "mergekit_config.yml"} <= names
    assert "trainer_state.json" not in names and "optimizer.pt" not in names
    assert json.loads((result.out_dir / "tokenizer_config.json").read_text())["model_max_length"] == 34  # newest's
    if shard:
        index = json.loads((result.out_dir / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert result.sharded and len(shards) > 1 and shards[0].startswith("model-00001-of-")
        assert all((result.out_dir / s).is_file() for s in shards)
    else:
        assert "model.safetensors" in names and not result.sharded
    model = AutoModelForCausalLM.from_pretrained(result.out_dir)
    states = [{k: v for k, v in load_hf(f).items()} for f in folders]
    expected = reference_average(states, [1, 1, 2], "same")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def load_hf(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (single or sharded), loaded whole with safetensors."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def test_out_shard_size_shards_a_single_file_and_dtype_updates_config(tmp_path: Path) -> None:
    folders = _hf_run(tmp_path / "run", shard=False, steps=(1, 2))
    assert main(["merge", "--checkpoints", str(folders[0]), "--checkpoints", str(folders[1]), "-o",
                 str(tmp_path / "out"), "--out-shard-size", "4KB", "--dtype", "bfloat16"]) == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for shard in set(index["weight_map"].values()):
        assert (tmp_path / "out" / shard).stat().st_size <= 4_000 + 4096


def test_force_replaces_atomically_and_never_an_input(tiny_run: Path, tmp_path: Path) -> None:
    refs = [checkpoint_ref(tiny_run / "ckpt" / f"step_000{s}.safetensors") for s in (500, 600)]
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(MergeError, match="already exists.*--force"):
        merge_checkpoints(refs, [1, 1], target)
    result = merge_checkpoints(refs, [1, 1], target, force=True)
    assert not (target / "old.txt").exists() and result.model_file.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]   # nothing aside or partial left
    with pytest.raises(MergeError, match="never writes over an input"):
        merge_checkpoints(refs, [1, 1], refs[0].path, force=True)


def test_a_new_merge_removes_hidden_folders_of_killed_merges(tiny_run: Path, tmp_path: Path) -> None:
    """Issue 6: a merge killed with -9 leaves its hidden temporary folder; the next merge to that target removes it."""
    refs = [checkpoint_ref(tiny_run / "ckpt" / f"step_000{s}.safetensors") for s in (500, 600)]
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folders = {name: tmp_path / f".out.partial-{name}" for name in (
            f"{host}-{dead.pid}-0badc0de",     # its writer died: removed
            f"{host}-{alive.pid}-0000c0de",    # a merge still running: kept
            f"otherhost-{dead.pid}-1badc0de",  # another host's (shared file system): kept
            "1a2b3c4d")}                       # an old name without a pid: kept
        for folder in folders.values():
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"half")
        (tmp_path / ".other.partial-x").mkdir()   # another target's: kept
        old = tmp_path / f".out.old-{host}-{dead.pid}-2badc0de"   # a --force replacement killed mid-swap: removed
        old.mkdir()
        merge_checkpoints(refs, [1, 1], tmp_path / "out")
        left = sorted(p.name for p in tmp_path.iterdir())
    finally:
        alive.kill()
        alive.wait()
    expected = sorted([".other.partial-x", "out", "run"] + [f.name for f in folders.values()][1:])
    assert left == expected and not old.exists()


def test_short_disk_stops_with_the_numbers(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refs = [checkpoint_ref(tiny_run / "ckpt" / f"step_000{s}.safetensors") for s in (500, 600)]
    monkeypatch.setattr(merge_checks.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(MergeError, match=r"0.00 GB free, the merge needs 0.00 GB \(\+67 MB margin\)"):
        merge_checkpoints(refs, [1, 1], tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_verify_modes(tiny_run: Path, tmp_path: Path) -> None:
    refs = [checkpoint_ref(tiny_run / "ckpt" / f"step_000{s}.safetensors") for s in (500, 600)]
    path = write_recipe(build_recipe("sma", refs, (0.5, 0.5)), tmp_path / "r.yaml")
    assert "quick_hash" in yaml.safe_load(path.read_text())["checkpoints"][0]
    victim = refs[0].path
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01                             # one bit of the last tensor's data
    victim.write_bytes(bytes(data))
    with pytest.raises(MergeError, match="step_000500.safetensors: sha256 differs"):
        merge_recipe(load_recipe(path), tmp_path / "full", "full")
    with pytest.raises(MergeError, match="step_000500.safetensors: quick hash differs"):
        merge_recipe(load_recipe(path), tmp_path / "quick", "quick")  # a tiny file is sampled whole
    merge_recipe(load_recipe(path), tmp_path / "none", "none")
    # A recipe written before quick hashes existed still verifies (quick falls back to sha256).
    doc = yaml.safe_load(path.read_text())
    for entry in doc["checkpoints"]:
        del entry["quick_hash"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(MergeError, match="sha256 differs"):
        merge_recipe(load_recipe(path), tmp_path / "old", "quick")
    assert main(["merge", str(path), "-o", str(tmp_path / "cli"), "--no-verify"]) == 0
    assert not any((tmp_path / d).exists() for d in ("full", "quick", "old"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


def test_mismatched_inputs_exit_2_listing_them(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.zeros(2, 4), "b": torch.zeros(4), "d": torch.zeros(1)}, str(tmp_path / "y.safetensors"))
    result = run_cli("merge", "--checkpoints", str(tmp_path / "x.safetensors"), "--checkpoints",
                     str(tmp_path / "y.safetensors"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    for part in ("missing: d", "extra: c", "a: (2, 3) vs (2, 4)"):
        assert part in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_dry_run_writes_nothing_and_projects(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = (str(tiny_run / "ckpt" / f"step_000{s}.safetensors") for s in (500, 600))
    assert main(["merge", "--checkpoints", a, "--checkpoints", b, "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    kernel = "compiled kernel" if fused_kernel() is not None else "numpy kernel"
    for part in ("would read 2 checkpoints", "step_000500.safetensors", "model.safetensors",
                 "projected peak memory:", "projected time:", kernel):
        assert part in text
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    plan = plan_merge([checkpoint_ref(a), checkpoint_ref(b)], [1, 1], tmp_path / "out")
    assert plan.peak_memory_bytes > 0 and plan.projected_seconds > 0 and plan.n_tensors == 3
    assert plan.arithmetic == ("compiled" if fused_kernel() is not None else "numpy")


def test_the_projection_adds_a_from_storage_time_when_the_first_probe_read_was_slow() -> None:
    from analysis.merge.verify import UNCACHED_RATIO, projection

    mb = 1_000_000
    # both passes alike (inputs cached): 100 MB in 0.01 s is 10 GB/s; 1000 MB read + 100 MB written at that rate
    cached = projection(0.011, 0.010, 100 * mb, 1000 * mb, 100 * mb)
    assert cached.seconds == pytest.approx(0.11) and cached.probe_mb_per_s == pytest.approx(10_000)
    assert cached.uncached_seconds is None
    # a first pass 5x slower read from storage at 2 GB/s: reads at that speed, writes at the cached one
    cold = projection(0.05, 0.010, 100 * mb, 1000 * mb, 100 * mb)
    assert cold.seconds == pytest.approx(0.11)
    assert cold.uncached_seconds == pytest.approx(0.5 + 0.01)
    assert projection(UNCACHED_RATIO * 0.01 * 0.99, 0.01, mb, mb, 0).uncached_seconds is None


def test_dry_run_json_has_every_projection(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = (str(tiny_run / "ckpt" / f"step_000{s}.safetensors") for s in (500, 600))
    assert main(["merge", "--checkpoints", a, "--checkpoints", b, "-o", str(tmp_path / "out"), "--dry-run",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["projected_seconds"] > 0 and doc["probe_mb_per_s"] > 0 and doc["projected_peak_memory_bytes"] > 0
    assert "projected_seconds_uncached" in doc     # a number where the probe's first read was slow, else null
    assert doc["arithmetic"] == ("compiled" if fused_kernel() is not None else "numpy")
    assert not (tmp_path / "out").exists()


def _mergekit_config(models: list[Path], weights: list[float], dtype: str = "float32") -> dict:
    return {"merge_method": "linear", "dtype": dtype, "parameters": {"normalize": True},
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)]}


def test_mergekit_config_imports_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folders = _hf_run(tmp_path / "run", shard=False, steps=(1, 2))
    config = tmp_path / "mk.yaml"
    config.write_text(yaml.safe_dump(_mergekit_config([Path("run/checkpoint-1"), Path("run/checkpoint-2")], [1, 3])))
    assert main(["merge", str(config), "-o", str(tmp_path / "out")]) == 0     # paths relative to the config
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = reference_average([load_hf(f) for f in folders], [1, 3], "float32")
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    assert main(["export", str(config), "--format", "ckpt-select", "-o", str(tmp_path / "ours.yaml")]) == 0
    ours = load_recipe(tmp_path / "ours.yaml")
    assert ours.weights == pytest.approx((0.25, 0.75)) and all(e.sha256 and e.quick_hash for e in ours.checkpoints)
    assert main(["export", str(tmp_path / "ours.yaml"), "--format", "mergekit", "-o", str(tmp_path / "back.yaml")]) == 0
    back = yaml.safe_load((tmp_path / "back.yaml").read_text())
    assert [m["parameters"]["weight"] for m in back["models"]] == pytest.approx([0.25, 0.75])
    config.write_text(yaml.safe_dump({**_mergekit_config(folders, [1, 1]), "merge_method": "ties"}))
    assert main(["merge", str(config), "-o", str(tmp_path / "ties")]) == 2


MERGEKIT = Path(sys.executable).with_name("mergekit-yaml")


@pytest.mark.skipif(not MERGEKIT.exists(), reason="mergekit is not installed (it is not a dependency of CkptSelect)")
def test_exported_mergekit_config_run_by_mergekit_gives_the_same_tensors(tmp_path: Path) -> None:
    folders = _hf_run(tmp_path / "run", shard=False)
    recipe_path = write_recipe(build_recipe("wma", [checkpoint_ref(f) for f in folders], (0.2, 0.3, 0.5)),
                               tmp_path / "recipe.yaml")
    assert main(["export", str(recipe_path), "--format", "mergekit", "-o", str(tmp_path / "mk.yaml")]) == 0
    done = subprocess.run([str(MERGEKIT), "mk.yaml", "mk_out"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = merge_recipe(load_recipe(recipe_path), tmp_path / "ours")
    theirs = load_hf(tmp_path / "mk_out")
    mine = load_hf(ours.out_dir)
    assert set(theirs) == set(mine)
    for name, tensor in mine.items():
        # mergekit sums w*x in float32 then divides by sum(w): within a float32 rounding or two of ours.
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-6, atol=1e-7)


def _kill_inputs(root: Path) -> list[Path]:
    paths = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        state = {f"layer.{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(6)}
        paths.append(root / f"step_{seed}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


@pytest.mark.slow
def test_kill_9_leaves_no_output_or_a_complete_one(tmp_path: Path) -> None:
    paths = _kill_inputs(tmp_path)
    args = [a for p in paths for a in ("--checkpoints", str(p))]
    start = time.perf_counter()
    assert run_cli("merge", *args, "-o", str(tmp_path / "whole")).returncode == 0
    duration = time.perf_counter() - start
    expected = load_file(str(tmp_path / "whole" / "model.safetensors"))
    rng = random.Random(6)
    outcomes = {"absent": 0, "complete": 0, "mid_write": 0}
    for attempt in range(20):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "analysis", "merge", *args, "-o", str(out)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt % 2:   # odd attempts: while the temporary folder is being written
            deadline = time.perf_counter() + 2 * duration + 5
            while not list(tmp_path.glob(f".out{attempt}.partial-*")) and proc.poll() is None \
                    and time.perf_counter() < deadline:
                time.sleep(0.005)
            # The folder lives for tens of milliseconds here (3 x 24 MB): kill within that.
            time.sleep(rng.uniform(0, 0.02))
        else:             # even attempts: anywhere in the run, start-up included
            time.sleep(rng.uniform(0, duration))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if not out.exists():
            outcomes["absent"] += 1
            # Killed while writing: the half-written folder is the hidden temporary one, never the target.
            outcomes["mid_write"] += bool(list(tmp_path.glob(f".out{attempt}.partial-*")))
            continue
        outcomes["complete"] += 1
        merged = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(merged[k], v) for k, v in expected.items())
        assert {"recipe.yaml", "mergekit_config.yml"} <= {p.name for p in out.iterdir()}
    print(outcomes)
    assert outcomes["mid_write"] > 0, outcomes
    # Every temporary folder above belongs to a killed process: merging again to its target removes it.
    stale = sorted({p.name.split(".partial-")[0][1:] for p in tmp_path.glob(".out*.partial-*")})
    assert stale, "a mid-write kill leaves a temporary folder"
    for name in stale:
        shutil.rmtree(tmp_path / name, ignore_errors=True)
        assert run_cli("merge", *args, "-o", str(tmp_path / name)).returncode == 0
    assert not list(tmp_path.glob(".out*.partial-*"))
