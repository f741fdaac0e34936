"""Issue 20: the merge as one package with one entry, ``merge(recipe, out_dir)``.

The Recipe is the only description of a merge: a recipe merge resolves each input once, an ad-hoc
``merge --checkpoints A B C`` builds a recipe first and hashes its inputs in the merge's own read
pass (each input byte read once, the recorded sha256 that of ``sha256sum``), ``recommend``
hashes only a recipe it writes or prints, (the import-cycle check is tests/test_imports.py).
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import analysis.recipe
from analysis.cli import main
from analysis.hashing import checkpoint_quick_hash, checkpoint_sha256
from analysis.merge import engine, merge, merge_checkpoints, verify
from analysis.recipe import build_recipe, load_recipe, write_recipe
from analysis.run import checkpoint_ref
from ckpt_factories import hf_checkpoint
from conftest import REPO
from test_merge_engine import reference_average

ANALYSIS = REPO / "analysis"


def _inputs(folder: Path, count: int = 3) -> list[Path]:
    """``count`` safetensors checkpoints of more than one read block, with an integer tensor."""
    paths = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        state = {"a.weight": torch.randn(300_001, generator=gen).to(torch.bfloat16),
                 "b.bias": torch.randn(77, generator=gen), "steps": torch.arange(5) + i}
        path = folder / f"checkpoint-{(i + 1) * 100}.safetensors"
        save_file(state, str(path), metadata={"step": str((i + 1) * 100)})
        paths.append(path)
    return paths


def _sha256sum(path: Path) -> str:
    """``sha256sum FILE``'s value (hashlib where the tool is missing)."""
    if shutil.which("sha256sum"):
        return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_of_a_recipe_writes_the_old_paths_bytes_issue_20(tmp_path: Path) -> None:
    paths = _inputs(tmp_path)
    refs = [checkpoint_ref(p) for p in paths]
    recipe = load_recipe(write_recipe(build_recipe("wma", refs, (0.2, 0.3, 0.5)), tmp_path / "r.yaml"))
    new = merge(recipe, tmp_path / "new", verify="full")
    old = merge_checkpoints(refs, recipe.weights, tmp_path / "old", "same", recipe)
    assert new.model_file.read_bytes() == old.model_file.read_bytes()
    assert (tmp_path / "new" / "recipe.yaml").read_text() == (tmp_path / "old" / "recipe.yaml").read_text()
    expected = reference_average([load_file(str(p)) for p in paths], [0.2, 0.3, 0.5], "same")
    merged = load_file(str(new.model_file))
    for name, tensor in expected.items():
        assert torch.equal(merged[name].view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.mark.parametrize("mode", ["full", "quick", "none"])
def test_a_recipe_merge_resolves_each_reference_once_issue_20(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             mode: str) -> None:
    paths = _inputs(tmp_path)
    recipe = load_recipe(write_recipe(build_recipe("sma", [checkpoint_ref(p) for p in paths], (1 / 3,) * 3),
                                      tmp_path / "r.yaml"))
    calls: Counter[Path] = Counter()

    def counted(path, step=None):
        calls[Path(path)] += 1
        return checkpoint_ref(path, step)

    for module in (engine, verify):
        monkeypatch.setattr(module, "checkpoint_ref", counted)
    merge(recipe, tmp_path / "out", verify=mode)
    assert calls == Counter({p.resolve(): 1 for p in paths})


class _ReadCounter:
    """Bytes read per file through os.pread/os.preadv (the merge's reader and its hashing use only these)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes: Counter[Path] = Counter()
        self._pread, self._preadv = os.pread, os.preadv
        monkeypatch.setattr(os, "pread", self.pread)
        monkeypatch.setattr(os, "preadv", self.preadv)

    def _count(self, fd: int, n: int) -> None:
        self.bytes[Path(os.readlink(f"/proc/self/fd/{fd}"))] += n

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        data = self._pread(fd, size, offset)
        self._count(fd, len(data))
        return data

    def preadv(self, fd: int, buffers, offset: int) -> int:
        n = self._preadv(fd, buffers, offset)
        self._count(fd, n)
        return n


def _bytes_read_by_this_process() -> int:
    """``rchar`` of /proc/self/io: bytes every thread of this process read through any read call."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_an_ad_hoc_merge_with_sha256_records_sha256sum_and_reads_each_input_once_issue_20(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    paths = _inputs(tmp_path)
    main(["merge", "--checkpoints", *map(str, paths), "-o", str(tmp_path / "warm-up")])   # imports, first calls
    reads = _ReadCounter(monkeypatch)
    before = _bytes_read_by_this_process()
    assert main(["merge", "--checkpoints", *map(str, paths), "-o", str(tmp_path / "out"), "--sha256"]) == 0
    read = _bytes_read_by_this_process() - before
    monkeypatch.undo()
    # all reads of the process, however made (a separate sha256 pass read every input a second time)
    assert read < 1.25 * sum(p.stat().st_size for p in paths)
    doc = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    for entry, path in zip(doc["checkpoints"], paths):
        assert entry["sha256"] == _sha256sum(path)
        assert entry["quick_hash"] == checkpoint_quick_hash([path.resolve()])
        assert entry["bytes"] == path.stat().st_size
        # every byte once: the tensors by the merge's reads, the header by its hashing; no second pass
        assert reads.bytes[path.resolve()] == path.stat().st_size, path
    # the recipe it wrote checks out in full against the inputs
    assert main(["merge", str(tmp_path / "out" / "recipe.yaml"), "-o", str(tmp_path / "again"), "--verify", "full"]) == 0


def test_an_ad_hoc_merge_records_quick_hashes_by_default_and_full_verify_checks_them_issue_20(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Without --sha256 no input is hashed in full (sha256 at ~1 GB/s a core would be most of the merge's time):
    the recipe beside it records each input's size and quick hash, and --verify full falls back to them."""
    paths = _inputs(tmp_path)
    assert main(["merge", "--checkpoints", *map(str, paths), "-o", str(tmp_path / "out")]) == 0
    doc = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    for entry, path in zip(doc["checkpoints"], paths):
        assert entry["sha256"] == "" and entry["quick_hash"] == checkpoint_quick_hash([path.resolve()])
        assert entry["bytes"] == path.stat().st_size
    recipe = tmp_path / "out" / "recipe.yaml"
    assert main(["merge", str(recipe), "-o", str(tmp_path / "again"), "--verify", "full"]) == 0
    with open(paths[0], "r+b") as handle:   # the same size, other bytes where the quick hash samples: the header
        handle.seek(8)
        first = handle.read(1)
        handle.seek(8)
        handle.write(b" " if first != b" " else b"{")
    capsys.readouterr()
    assert main(["merge", str(recipe), "-o", str(tmp_path / "changed"), "--verify", "full"]) == 2
    assert "quick hash differs" in capsys.readouterr().err


def test_an_ad_hoc_merge_of_sharded_folders_records_their_checkpoint_sha256_issue_20(tmp_path: Path) -> None:
    folders = [tmp_path / f"checkpoint-{s}" for s in (10, 20)]
    for seed, folder in enumerate(folders):
        hf_checkpoint(folder, (seed + 1) * 10, seed=seed, shard=True)
    assert main(["merge", "--checkpoints", *map(str, folders), "-o", str(tmp_path / "out"), "--sha256"]) == 0
    doc = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    for entry, folder in zip(doc["checkpoints"], folders):
        ref = checkpoint_ref(folder)
        assert len(ref.files) > 2   # shards, an index, side files: all hashed, read or not by the merge
        assert entry["sha256"] == checkpoint_sha256(ref.files)
        assert entry["quick_hash"] == checkpoint_quick_hash(ref.files)


def test_checkpoints_take_several_paths_after_one_flag_or_one_per_flag_issue_20(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = [str(p) for p in _inputs(tmp_path)]
    assert main(["merge", "--checkpoints", *paths, "-o", str(tmp_path / "one-flag")]) == 0
    assert main(["merge", "-o", str(tmp_path / "repeated"), *[a for p in paths for a in ("--checkpoints", p)]]) == 0
    one = (tmp_path / "one-flag" / "model.safetensors").read_bytes()
    assert one == (tmp_path / "repeated" / "model.safetensors").read_bytes()
    assert load_file(str(tmp_path / "one-flag" / "model.safetensors"))["steps"].tolist() == [2, 3, 4, 5, 6]
    capsys.readouterr()
    assert main(["merge", *paths[:2], "-o", str(tmp_path / "x")]) == 2
    assert "--checkpoints" in capsys.readouterr().err
    recipe = write_recipe(build_recipe("sma", [checkpoint_ref(p) for p in paths[:2]], (0.5, 0.5)), tmp_path / "r.yaml")
    assert main(["merge", str(recipe), "--checkpoints", paths[0], "-o", str(tmp_path / "y")]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_recommend_hashes_only_a_recipe_it_writes_issue_20(tiny_run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[tuple[Path, ...]] = []
    real = analysis.recipe.checkpoint_sha256

    def counted(files, progress=None):
        hashed.append(tuple(files))
        return real(files, progress)

    monkeypatch.setattr(analysis.recipe, "checkpoint_sha256", counted)
    assert main(["recommend", str(tiny_run)]) == 0
    assert hashed == []
    assert main(["recommend", str(tiny_run), "-o", str(tmp_path / "r.yaml")]) == 0
    recipe = load_recipe(tmp_path / "r.yaml")
    assert len(hashed) == len(recipe.checkpoints) and all(e.sha256 for e in recipe.checkpoints)


def test_the_merge_imports_inside_functions_only_to_spare_start_up_issue_20() -> None:
    """torch (its adders) and psutil (the dry run) load late, each with a comment saying so; nothing else."""
    late = []
    for path in [*(ANALYSIS / "merge").glob("*.py"), ANALYSIS / "hashing.py", ANALYSIS / "checkpoints" / "location.py"]:
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, ast.FunctionDef):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        module = getattr(node, "module", None) or node.names[0].name
                        late.append((path.name, module, lines[node.lineno - 1] + lines[node.lineno - 2]))
    assert {(f, m) for f, m, _ in late} <= {("average.py", "torch_adder"), ("in_memory.py", "torch"),
                                            ("in_memory.py", "torch_adder"), ("verify.py", "psutil")}
    assert all("import" in text and ("torch" in text or "dry run" in text) for _, _, text in late)
