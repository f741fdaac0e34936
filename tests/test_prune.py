"""``prune`` (issue 23): keep only the checkpoints that matter, on real files, and lose nothing.

Every test works on real safetensors/torch runs in tmp_path; files are aged an hour first, since a
checkpoint modified in the last minute is never deleted (it may still be being written).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.cli import main
from analysis.errors import InvalidArgument
from analysis.prune import (MANIFEST, TRASH_FOLDER, PruneRefused, apply_prune, parse_policy, plan_prune,
                            restore_trash)
from analysis.recipe import recipe_for_selection, write_recipe
from analysis.run import open_run
from analysis.selection import recommend
from analysis.signals import assess_run
from ckpt_factories import adam_run, hf_checkpoint
from conftest import REPO, write_tiny_run

HOUR = 3600.0


def _age(root: Path, seconds: float = HOUR) -> Path:
    """Every file under ``root`` last modified ``seconds`` ago: a finished run, not one being written."""
    then = time.time() - seconds
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (then, then))
    return root


def _hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``, hidden ones included."""
    found = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            found[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _ckpt(step: int) -> str:
    return f"ckpt/step_{step:06d}.safetensors"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """The tiny run (12 checkpoints every 50 steps, a spike at 300), finished an hour ago."""
    return _age(write_tiny_run(tmp_path / "run", list(range(50, 650, 50)), spike_steps=(298,)))


def test_issue23_a_dry_run_changes_nothing(old_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = _hashes(old_run)
    stats = {p: os.stat(old_run / p).st_mtime_ns for p in before}
    assert main(["prune", str(old_run), "--keep", "window+1,newest:2,every:200"]) == 0
    out = capsys.readouterr().out
    assert "Dry run: nothing was changed" in out and "delete step       50" in out
    assert _hashes(old_run) == before
    assert {p: os.stat(old_run / p).st_mtime_ns for p in before} == stats
    assert not (old_run / TRASH_FOLDER).exists()
    assert main(["prune", str(old_run), "--keep", "newest:1", "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] is True and doc["deleted"] == 11 and _hashes(old_run) == before


def test_issue23_prune_keeps_what_the_recommendation_uses_the_newest_recipes_and_saves_in_progress(
        old_run: Path, capsys: pytest.CaptureFixture) -> None:
    run = open_run(old_run)
    used = [c.step for c in recommend(assess_run(run)).checkpoints]
    recipe = write_recipe(recipe_for_selection(run, [100, 150], [0.5, 0.5], "manual", hashes=False),
                          old_run / "merges" / "manual-100-150" / "recipe.yaml")
    os.utime(old_run / _ckpt(250))                       # modified just now: may still be being written
    (old_run / _ckpt(650)).write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")   # a save in progress
    before = _hashes(old_run)
    sizes = {p: (old_run / p).stat().st_size for p in before}
    assert main(["prune", str(old_run), "--keep", "window", "--yes", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    after = _hashes(old_run)
    kept = {r["step"] for r in doc["checkpoints"] if r["action"] == "keep"}
    assert set(used) <= kept and {100, 150, 250, 600, 650} <= kept
    for step in kept:
        assert after[_ckpt(step)] == before[_ckpt(step)], step
    reasons = {r["step"]: " ".join(r["reasons"]) for r in doc["checkpoints"]}
    assert "named by the recipe merges/manual-100-150/recipe.yaml" in reasons[100]
    assert "modified 0 s ago" in reasons[250] and "being written" in reasons[650] and "newest" in reasons[600]
    gone = set(before) - set(after)
    assert gone == {_ckpt(r["step"]) for r in doc["checkpoints"] if r["action"] == "delete"} and gone
    assert doc["result"]["bytes_freed"] == doc["bytes_freed"] == sum(sizes[p] for p in gone)
    assert after["metrics.jsonl"] == before["metrics.jsonl"] and recipe.is_file()
    assert doc["result"]["trash_emptied"] and not (old_run / TRASH_FOLDER).exists()


def test_issue23_freed_bytes_are_the_deleted_files_bytes(old_run: Path) -> None:
    sizes = {p: (old_run / p).stat().st_size for p in _hashes(old_run)}
    plan = plan_prune(open_run(old_run), parse_policy("newest:3"))
    result = apply_prune(plan)
    gone = {p for p in sizes if not (old_run / p).exists()}
    assert len(gone) == 9 and result.bytes_freed == plan.bytes_freed == sum(sizes[p] for p in gone)
    assert plan.bytes_now == sum(sizes[p] for p in sizes if p.startswith("ckpt/"))
    assert plan.bytes_after == plan.bytes_now - plan.bytes_freed


def test_issue23_budget_keeps_the_most_useful_within_it_and_says_why(old_run: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["prune", str(old_run), "--keep", "newest:5,every:100", "--budget", "1.6KB", "--yes", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    on_disk = sum(p.stat().st_size for p in (old_run / "ckpt").iterdir())
    assert on_disk == doc["bytes_after"] <= 1600
    rows = {r["step"]: r for r in doc["checkpoints"]}
    assert [s for s, r in rows.items() if r["action"] == "keep"] == [450, 500, 550, 600]
    assert "newest checkpoint" in rows[600]["reasons"][0] and rows[450]["reasons"] == ["newest:5: one of the newest 5"]
    assert rows[400]["reasons"] == ["newest:5: one of the newest 5, but over the 1.60 KB budget",
                                    "every:100: milestone, step 400 is a multiple of 100, but over the 1.60 KB budget"]
    assert rows[50]["reasons"] == ["not needed by --keep newest:5,every:100"]


def test_issue23_optimizer_term_keeps_the_newest_checkpoint_holding_optimizer_state(tmp_path: Path) -> None:
    root, _, _ = adam_run(tmp_path / "run", [10, 20, 30, 40], optimizer_at={20})
    plan = plan_prune(open_run(_age(root)), parse_policy("optimizer"))
    fate = {i.step: (i.keep, i.reasons) for i in plan.items}
    assert fate[20] == (True, ("optimizer: the newest with optimizer state, to resume training",))
    assert not fate[10][0] and not fate[30][0] and fate[40][0]


def test_issue23_policy_syntax() -> None:
    policy = parse_policy("window+2, last:3,every:1000,optimizer", "2TB")
    assert policy.text == "window+2,newest:3,every:1000,optimizer" and policy.budget_bytes == 2 * 10**12
    assert parse_policy(["newest:2", "optimizer:2"], "1.5GiB").budget_bytes == int(1.5 * 2**30)
    for bad in ("", "window:2", "newest+2", "every", "newest:2,last:3", "keep-all"):
        with pytest.raises(InvalidArgument):
            parse_policy(bad)


def test_issue23_refused_under_root_without_allow_prune(old_run: Path) -> None:
    before = _hashes(old_run)
    plan = plan_prune(open_run(old_run), parse_policy("newest:2"))
    with pytest.raises(PruneRefused, match="--allow-prune"):
        apply_prune(plan, root=old_run.parent)
    assert _hashes(old_run) == before
    assert len(apply_prune(plan, root=old_run.parent, allow_prune=True).moved) == 10


def test_issue23_keep_trash_then_restore_puts_every_file_back(old_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = _hashes(old_run)
    assert main(["prune", str(old_run), "--keep", "newest:2", "--yes", "--keep-trash"]) == 0
    out = capsys.readouterr().out
    trash = next((old_run / TRASH_FOLDER).iterdir())
    assert f"Restore with: ckpt-select prune {old_run} --restore {trash}" in out
    assert len(list((trash / "ckpt").iterdir())) == 10 and len(list((old_run / "ckpt").iterdir())) == 2
    assert main(["prune", str(old_run), "--restore", str(trash)]) == 0
    assert _hashes(old_run) == before and not (old_run / TRASH_FOLDER).exists()


def test_issue23_cli_exit_codes_and_one_line_errors(old_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    before = _hashes(old_run)
    cases = {
        ("--keep", "newest:3,bogus"): "unknown term 'bogus'",
        ("--keep", "every"): "'every' needs a positive number",
        ("--keep", "newest:2", "--budget", "lots"): "--budget 'lots' is not a size",
        ("--keep", "newest:2", "--dry-run", "--yes"): "give --dry-run or --yes, not both",
        (): "--keep needs a policy",
        ("--keep", "newest:2", "--yes", "--trash", str(old_run / "trash")): "must be a hidden folder",
        ("--keep", "newest:2", "--yes", "--trash", str(old_run / "ckpt" / "step_000050.safetensors" / "t")):
            "cannot lie inside the checkpoint",
        ("--restore", str(tmp_path)): "not a prune's trash folder",
    }
    for args, message in cases.items():
        assert main(["prune", str(old_run), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("ckpt-select: error: ") and message in err and err.count("\n") == 1, (args, err)
    assert main(["prune", str(tmp_path / "missing"), "--keep", "newest:1"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert _hashes(old_run) == before


def _start_prune(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "analysis", "prune", str(run), "--keep", "newest:2", "--yes", *extra],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_at_random(proc: subprocess.Popen, run: Path, rng: random.Random, during_moves: bool) -> None:
    """kill -9 the prune: at a random moment of its life, or a random moment after its first move began.

    Here the 78 moves (each a rename and a folder fsync) take about 0.4 s, so most kills of the second
    kind land between two moves (5 of the 6 of the first test on this machine, 2026-12-06).
    """
    deadline = time.monotonic() + 120
    if during_moves:
        while not list(run.glob(f"{TRASH_FOLDER}/*/{MANIFEST}")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.4))
    else:
        time.sleep(rng.uniform(0, 4))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_issue23_kill_9_during_a_prune_loses_no_checkpoint(tmp_path: Path) -> None:
    """Every original file ends in place or in the trash, by content, and the trash restores the run."""
    template = _age(write_tiny_run(tmp_path / "template", list(range(10, 810, 10))))
    original = _hashes(template)
    rng = random.Random(23)
    for trial in range(6):
        run = tmp_path / f"run{trial}"
        shutil.copytree(template, run)
        _kill_at_random(_start_prune(run, "--keep-trash"), run, rng, during_moves=trial % 3 != 2)
        in_place = {p: h for p, h in _hashes(run).items() if not p.startswith(TRASH_FOLDER)}
        trashes = sorted((run / TRASH_FOLDER).glob("*")) if (run / TRASH_FOLDER).exists() else []
        trashed = {p: h for t in trashes for p, h in _hashes(t).items() if p != MANIFEST}
        assert not set(in_place) & set(trashed), trial
        assert {**in_place, **trashed} == original, trial
        for trash in trashes:
            restore_trash(trash)
        assert _hashes(run) == original, trial


@pytest.mark.slow
def test_issue23_kill_9_while_deleting_never_touches_a_kept_checkpoint(tmp_path: Path) -> None:
    """Without --keep-trash: a file is missing only if the plan deleted it and every move had finished."""
    template = _age(write_tiny_run(tmp_path / "template", list(range(10, 810, 10))))
    original = _hashes(template)
    rng = random.Random(2323)
    for trial in range(4):
        run = tmp_path / f"run{trial}"
        shutil.copytree(template, run)
        _kill_at_random(_start_prune(run), run, rng, during_moves=True)
        now = {p: h for p, h in _hashes(run).items() if not p.startswith(TRASH_FOLDER + "/")}
        manifests = list(run.glob(f"{TRASH_FOLDER}/*/{MANIFEST}"))
        state = json.loads(manifests[0].read_text())["state"] if manifests else None
        trashed = {p: h for m in manifests for p, h in _hashes(m.parent).items() if p != MANIFEST}
        assert now[_ckpt(790)] == original[_ckpt(790)] and now[_ckpt(800)] == original[_ckpt(800)]
        assert now["metrics.jsonl"] == original["metrics.jsonl"]
        missing = set(original) - set(now) - set(trashed)
        assert all(p.startswith("ckpt/") for p in missing), trial
        if state == "moving":
            assert not missing, trial


def test_issue23_storage_page_shows_the_plan_and_refuses_under_root_without_allow_prune(
        old_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CKPT_SELECT_RUN", str(old_run))
    monkeypatch.setenv("CKPT_SELECT_ROOT", str(old_run.parent))
    monkeypatch.delenv("CKPT_SELECT_ALLOW_PRUNE", raising=False)
    before = _hashes(old_run)
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=60)
    at.run()
    at.switch_page("views/storage.py").run()
    assert not at.exception, at.exception
    at.text_input(key="prune_keep").set_value("newest:3").run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["checkpoints now"] == "4.70 KB" and metrics["after the prune"] == "1.18 KB"
    assert metrics["freed (9 deleted)"] == "3.52 KB"
    table = at.dataframe[0].value
    assert list(table["action"]).count("delete") == 9 and "newest checkpoint" in table["why"].iloc[-1]
    at.checkbox(key="prune_confirm").check().run()
    at.button(key="prune_button").click().run()
    assert any("--allow-prune" in e.value for e in at.error), [e.value for e in at.error]
    assert _hashes(old_run) == before
    monkeypatch.setenv("CKPT_SELECT_ALLOW_PRUNE", "1")
    at.checkbox(key="prune_confirm").check().run()
    at.button(key="prune_button").click().run()
    assert not at.exception and "Deleted 9 checkpoints" in at.success[0].value
    assert sorted(p.name for p in (old_run / "ckpt").iterdir()) == [Path(_ckpt(s)).name for s in (500, 550, 600)]


def test_issue23_a_trainer_checkpoint_folder_moves_whole_and_counts_its_optimizer_state(tmp_path: Path) -> None:
    root = tmp_path / "hf-run"
    for step, seed in ((100, 0), (200, 1), (300, 2)):
        hf_checkpoint(root / f"checkpoint-{step}", step, seed, shard=step == 200)
    _age(root)
    sizes = {p: (root / p).stat().st_size for p in _hashes(root)}
    plan = plan_prune(open_run(root), parse_policy("newest:1"))
    result = apply_prune(plan)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-300"]
    old = [p for p in sizes if not p.startswith("checkpoint-300/")]
    assert any(p.endswith("optimizer.pt") for p in old)
    assert result.bytes_freed == sum(sizes[p] for p in old)


def test_issue23_a_recipe_that_cannot_be_parsed_stops_the_prune(old_run: Path, capsys: pytest.CaptureFixture) -> None:
    (old_run / "recipe.yaml").write_text("ckpt_select_recipe: 1\ncheckpoints: [\n")
    before = _hashes(old_run)
    assert main(["prune", str(old_run), "--keep", "newest:1", "--yes"]) == 2
    assert "recipe.yaml: looks like a merge recipe but is not valid YAML" in capsys.readouterr().err
    assert _hashes(old_run) == before


def test_issue23_ui_allow_prune_reaches_the_app_and_nothing_else_allows_it(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """``ui`` replaces itself with the server; the environment it hands over is what the app reads."""
    seen: list[dict] = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: seen.append(env))
    monkeypatch.setenv("CKPT_SELECT_ALLOW_PRUNE", "1")   # inherited: must not count
    assert main(["ui", "--root", str(tmp_path)]) == 0
    assert main(["ui", "--root", str(tmp_path), "--allow-prune"]) == 0
    assert "CKPT_SELECT_ALLOW_PRUNE" not in seen[0] and seen[1]["CKPT_SELECT_ALLOW_PRUNE"] == "1"


def test_issue23_a_recipe_beside_the_run_protects_its_checkpoints_too(old_run: Path) -> None:
    run = open_run(old_run)
    write_recipe(recipe_for_selection(run, [50, 100], [0.5, 0.5], "manual", hashes=False),
                 old_run.parent / "merged" / "recipe.yaml")
    fate = {i.step: i for i in plan_prune(run, parse_policy("newest:1")).items}
    assert fate[50].keep and fate[100].keep and not fate[150].keep
    assert fate[50].reasons == (f"named by the recipe {old_run.parent / 'merged' / 'recipe.yaml'}: never deleted "
                                "while a recipe needs it",)
    confined = {i.step: i.keep for i in plan_prune(run, parse_policy("newest:1"), root=old_run).items}
    assert not confined[50]   # outside the app's root: not read
