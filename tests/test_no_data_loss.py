"""Issue 19, "no command destroys a user's files": recipe and config outputs, merge targets, stale partials,
read-only storage. Each test reproduces a loss (or a traceback) the code had before the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from safetensors import safe_open

from analysis.cli import main
from analysis.errors import MergeError
from analysis.merge import merge_checkpoints
from analysis.recipe import build_recipe, load_any_recipe
from analysis.run import checkpoint_ref
from ckpt_factories import adam_run, hf_checkpoint
from conftest import write_tiny_run


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> sha256): a folder is untouched when this is unchanged."""
    return {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(err: str, *needles: str) -> str:
    """The CLI's stderr is exactly one error line holding every needle; returns it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt-select: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _checkpoint_args(run: Path, steps: tuple[int, ...] = (500, 600)) -> list[str]:
    return [a for s in steps for a in ("--checkpoints", str(run / "ckpt" / f"step_{s:06d}.safetensors"))]


# --- recommend -o / export -o ---------------------------------------------------------------------
@pytest.fixture
def pt_run(tmp_path: Path) -> Path:
    """A run of resume .pt checkpoints (model + AdamW state), the kind issue 19 saw turned into 763 bytes of YAML."""
    return adam_run(tmp_path / "pt_run", [4, 8, 12])[0]


@pytest.mark.parametrize("force", [False, True])
def test_issue19_recommend_never_writes_over_an_input_checkpoint(tiny_run: Path, pt_run: Path, force: bool,
                                                                   capsys: pytest.CaptureFixture) -> None:
    for run, victim in ((pt_run, pt_run / "ckpt" / "step_12.pt"),
                        (tiny_run, tiny_run / "ckpt" / "step_000600.safetensors")):
        before = _sha(victim)
        assert main(["recommend", str(run), "-o", str(victim)] + ["--force"] * force) == 2
        _one_line_error(capsys.readouterr().err, str(victim), "never writes over or into a checkpoint")
        assert _sha(victim) == before
        assert not list(victim.parent.glob(f".{victim.name}.tmp-*"))


def test_issue19_recommend_onto_a_checkpoint_outside_the_run_is_refused_even_forced(
        tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = write_tiny_run(tmp_path / "other", [100])
    victim = other / "ckpt" / "step_000100.safetensors"
    before = _sha(victim)
    assert main(["recommend", str(tiny_run), "-o", str(victim), "--force"]) == 2
    _one_line_error(capsys.readouterr().err, str(victim), "is a checkpoint file")
    assert _sha(victim) == before
    hf = tmp_path / "hf" / "checkpoint-300"
    hf_checkpoint(hf, 300, shard=True)
    capsys.readouterr()   # transformers' progress bars
    before = _tree(hf)
    for name in ("optimizer.pt", "model-00001-of-00002.safetensors", "config.json", "recipe.yaml"):
        assert main(["recommend", str(tiny_run), "-o", str(hf / name), "--force"]) == 2
        _one_line_error(capsys.readouterr().err, str(hf / name), "checkpoint")
    assert _tree(hf) == before


def test_issue19_recommend_onto_a_user_file_needs_force(tiny_run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes on this run\n")
    assert main(["recommend", str(tiny_run), "-o", str(notes)]) == 2
    _one_line_error(capsys.readouterr().err, str(notes), "not a recipe or mergekit config CkptSelect wrote",
                    "--force")
    assert notes.read_text() == "my notes on this run\n"
    assert main(["recommend", str(tiny_run), "-o", str(notes), "--force"]) == 0
    assert yaml.safe_load(notes.read_text())["ckpt_select_recipe"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]   # no temporary file left


def test_issue19_recommend_replaces_its_own_recipe_and_never_a_folder(tiny_run: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "recipe.yaml"
    assert main(["recommend", str(tiny_run), "-o", str(recipe)]) == 0
    assert main(["recommend", str(tiny_run), "--window", "2", "-o", str(recipe)]) == 0
    assert [c["step"] for c in yaml.safe_load(recipe.read_text())["checkpoints"]] == [550, 600]
    capsys.readouterr()
    assert main(["recommend", str(tiny_run), "-o", str(tmp_path)]) == 2
    _one_line_error(capsys.readouterr().err, str(tmp_path), "is a folder")


def test_issue19_recommend_never_writes_into_an_hf_checkpoint_folder(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "hf_run"
    for step, seed in ((100, 0), (200, 1)):
        hf_checkpoint(run / f"checkpoint-{step}", step, seed=seed)
    capsys.readouterr()   # transformers' progress bars
    inside = run / "checkpoint-200" / "recipe.yaml"
    assert main(["recommend", str(run), "-o", str(inside), "--force"]) == 2
    _one_line_error(capsys.readouterr().err, "lies inside", str(run / "checkpoint-200"))
    assert not inside.exists()


@pytest.fixture
def recipe_file(tiny_run: Path, tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    assert main(["recommend", str(tiny_run), "--window", "2", "-o", str(path)]) == 0
    return path


@pytest.mark.parametrize("force", [False, True])
def test_issue19_export_never_writes_over_an_input_checkpoint(tiny_run: Path, recipe_file: Path, force: bool,
                                                              capsys: pytest.CaptureFixture) -> None:
    victim = tiny_run / "ckpt" / "step_000600.safetensors"
    before = _sha(victim)
    capsys.readouterr()
    assert main(["export", str(recipe_file), "-o", str(victim)] + ["--force"] * force) == 2
    _one_line_error(capsys.readouterr().err, str(victim), "never writes over or into a checkpoint")
    assert _sha(victim) == before


def test_issue19_export_onto_a_user_file_needs_force_and_replaces_its_own(recipe_file: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    user = tmp_path / "merge.yml"
    user.write_text("merge_method: slerp  # hand-written\n")
    capsys.readouterr()
    assert main(["export", str(recipe_file), "-o", str(user)]) == 2
    _one_line_error(capsys.readouterr().err, str(user), "--force")
    assert user.read_text() == "merge_method: slerp  # hand-written\n"
    assert main(["export", str(recipe_file), "-o", str(user), "--force"]) == 0
    text = user.read_text()
    assert text.startswith("# written by ckpt-select") and yaml.safe_load(text)["merge_method"] == "linear"
    assert [e.step for e in load_any_recipe(user).checkpoints] == [550, 600]   # still a mergekit config we read
    # Our own export (the marker line) and our own recipe are replaced without --force.
    assert main(["export", str(recipe_file), "-o", str(user)]) == 0
    assert main(["export", str(user), "--format", "ckpt-select", "-o", str(recipe_file)]) == 0
    assert yaml.safe_load(recipe_file.read_text())["ckpt_select_recipe"] == 1


def test_issue19_export_onto_a_folder_is_one_line(recipe_file: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    capsys.readouterr()
    for extra in ([], ["--force"]):
        assert main(["export", str(recipe_file), "-o", str(folder)] + extra) == 2
        _one_line_error(capsys.readouterr().err, str(folder), "is a folder")
    assert list(folder.iterdir()) == []


# --- merge targets --------------------------------------------------------------------------------
def test_issue19_merge_force_never_deletes_another_run(tiny_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    other = write_tiny_run(tmp_path / "other_run", [100, 200])
    (other / "notes.txt").write_text("keep me")
    before = _tree(other)
    assert main(["merge", *_checkpoint_args(tiny_run), "-o", str(other), "--force"]) == 2
    _one_line_error(capsys.readouterr().err, str(other), "holds 2 files, 1 folder, not a CkptSelect merge output")
    assert _tree(other) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_run", "run"]   # nothing partial or aside


def test_issue19_merge_force_never_deletes_a_folder_holding_only_our_recipe(tiny_run: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    """A recipe alone (``recommend -o DIR/recipe.yaml``) does not make a folder a merge output: its weights must say so."""
    folder = tmp_path / "plans"
    folder.mkdir()
    assert main(["recommend", str(tiny_run), "-o", str(folder / "recipe.yaml")]) == 0
    capsys.readouterr()
    assert main(["merge", *_checkpoint_args(tiny_run), "-o", str(folder), "--force"]) == 2
    _one_line_error(capsys.readouterr().err, "holds 1 file, 0 folders, not a CkptSelect merge output")
    assert (folder / "recipe.yaml").is_file()


def test_issue19_merge_force_replaces_an_earlier_merge_or_an_empty_folder(tiny_run: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "merged"
    assert main(["merge", *_checkpoint_args(tiny_run, (400, 500)), "-o", str(out)]) == 0
    first = _sha(out / "model.safetensors")
    capsys.readouterr()
    assert main(["merge", *_checkpoint_args(tiny_run, (500, 600)), "-o", str(out), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == [500, 600]
    assert _sha(out / "model.safetensors") != first
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "linear"
    assert (out / "mergekit_config.yml").read_text().startswith("# written by ckpt-select")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["merge", *_checkpoint_args(tiny_run), "-o", str(empty), "--force"]) == 0
    with safe_open(str(empty / "model.safetensors"), "pt") as handle:
        assert set(handle.keys()) == {"layer.weight", "layer.bias", "num_batches"}


def test_issue19_merge_output_inside_an_hf_input_folder_is_refused(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    folders = [tmp_path / "run" / f"checkpoint-{step}" for step in (100, 200)]
    for seed, folder in enumerate(folders):
        hf_checkpoint(folder, 100 * (seed + 1), seed=seed)
    capsys.readouterr()   # transformers' progress bars
    before = _tree(folders[1])
    target = folders[1] / "merged"
    args = [a for f in folders for a in ("--checkpoints", str(f))]
    for extra in ([], ["--force"], ["--dry-run"]):
        assert main(["merge", *args, "-o", str(target)] + extra) == 2
        _one_line_error(capsys.readouterr().err, str(target), f"lies inside the input checkpoint folder {folders[1]}")
    assert _tree(folders[1]) == before and not target.exists()
    with pytest.raises(MergeError, match="lies inside the input checkpoint folder"):   # the core, as the app calls it
        merge_checkpoints([checkpoint_ref(f) for f in folders], [1, 1], folders[0] / "sub" / "merged")


# --- stale partial folders ------------------------------------------------------------------------
def test_issue19_any_merge_removes_partials_of_dead_merges_and_says_so(tiny_run: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".other.partial-{host}-{dead.pid}-0badc0de"       # another name, writer dead: removed
        live = tmp_path / f".third.partial-{host}-{alive.pid}-0000c0de"      # a merge still running: kept
        aside = tmp_path / f".other.old-{host}-{dead.pid}-1badc0de"          # maybe the only copy of 'other': kept
        for folder, size in ((stale, 3000), (live, 10), (aside, 10)):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"x" * size)
        (stale / "sub").mkdir()
        (stale / "sub" / "shard.safetensors").write_bytes(b"y" * 1000)
        assert main(["merge", *_checkpoint_args(tiny_run), "-o", str(tmp_path / "out"), "--json"]) == 0
        captured = capsys.readouterr()
        left = sorted(p.name for p in tmp_path.iterdir())
    finally:
        alive.kill()
        alive.wait()
    doc = json.loads(captured.out)
    assert doc["stale_removed"] == [str(stale)] and doc["stale_freed_bytes"] == 4000
    assert captured.err.strip() == (f"ckpt-select: removed 1 folder left by killed merges ({stale.name}): "
                                    "0.0 MB freed")
    assert left == sorted([aside.name, live.name, "out", "run"])


# --- read-only storage ----------------------------------------------------------------------------
@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder the process cannot write into.

    A read-only tmpfs mount where this process may mount (the tests run as root, where chmod 0o555
    stops nothing); else chmod 0o555 for a user that is not root; else sysfs, which refuses new files.
    """
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if mounted:
        try:
            yield folder
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    elif os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    else:
        yield Path("/sys")


def test_issue19_read_only_targets_are_exit_2_with_one_line(tiny_run: Path, read_only_dir: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    name = f"ckpt-select-{os.getpid()}"
    recipe, merged = read_only_dir / f"{name}.yaml", read_only_dir / name
    assert main(["recommend", str(tiny_run), "--window", "2", "-o", str(recipe)]) == 2
    _one_line_error(capsys.readouterr().err, str(recipe), "cannot write there")
    with tempfile.TemporaryDirectory() as scratch:
        ours = Path(scratch) / "r.yaml"
        assert main(["recommend", str(tiny_run), "--window", "2", "-o", str(ours)]) == 0
        capsys.readouterr()
        assert main(["export", str(ours), "-o", str(recipe)]) == 2
        _one_line_error(capsys.readouterr().err, str(recipe), "cannot write there")
    assert main(["merge", *_checkpoint_args(tiny_run), "-o", str(merged)]) == 2
    _one_line_error(capsys.readouterr().err, str(merged), "cannot write there")
    assert not recipe.exists() and not merged.exists()


def test_issue19_read_only_parent_to_create_is_one_line(tiny_run: Path, read_only_dir: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    deep = read_only_dir / f"ckpt-select-{os.getpid()}" / "deeper"
    assert main(["merge", *_checkpoint_args(tiny_run), "-o", str(deep / "out")]) == 2
    _one_line_error(capsys.readouterr().err, "cannot write there")
    assert main(["recommend", str(tiny_run), "-o", str(deep / "r.yaml")]) == 2
    _one_line_error(capsys.readouterr().err, "cannot write there")


# --- the app's merge button -----------------------------------------------------------------------
def test_issue19_the_apps_merge_shows_the_refusals_as_one_line(tmp_path: Path, read_only_dir: Path) -> None:
    """The Merge page starts merges through cached.start_merge and shows job.error with st.error."""
    import cached

    folders = [tmp_path / "run" / f"checkpoint-{step}" for step in (100, 200)]
    for seed, folder in enumerate(folders):
        hf_checkpoint(folder, 100 * (seed + 1), seed=seed)
    refs = [checkpoint_ref(f) for f in folders]
    recipe = build_recipe("manual", refs, (0.5, 0.5), "same", {"100": "a", "200": "b"})
    errors = {}
    for label, out in (("inside", folders[1] / "merged"), ("read-only", read_only_dir / f"app-{os.getpid()}")):
        job = cached.jobs()[cached.start_merge(recipe, out)]
        assert job.done.wait(60)
        errors[label] = job.error
    assert errors["inside"] == (f"{folders[1] / 'merged'}: lies inside the input checkpoint folder {folders[1]}; "
                                "a merge never writes into an input")
    assert errors["read-only"].startswith(f"{read_only_dir / f'app-{os.getpid()}'}: cannot write there: ")
    assert not any("internal error" in e for e in errors.values())
