"""One bad file must not sink a run (issue 19).

A truncated newest checkpoint (a save in progress), a zero-byte safetensors file, a dangling or
looping symlink named like a log, a token file that starts with byte 0x80 and a file name that is
not UTF-8: the run opens, the bad file is listed with the reason and left out of the
recommendation, and every command exits 0 with a note. A run with nothing readable, and a single
checkpoint file that cannot be read, are still exit 2 naming the file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from analysis.cli import main
from analysis.run import folder_stamp, open_run
from ckpt_factories import Evil
from conftest import REPO, tiny_state, write_tiny_run

STEPS = [50, 100, 150, 200, 250, 300]
TEN_MINUTES_AGO = time.time() - 600


def _run(tmp_path: Path) -> Path:
    return write_tiny_run(tmp_path / "run", STEPS)


def _truncate(path: Path, old: bool) -> Path:
    """Keep the first half of the file's bytes; ``old``: dated ten minutes back (no save is writing it)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    if old:
        os.utime(path, (TEN_MINUTES_AGO, TEN_MINUTES_AGO))
    return path


def _newest_as_torch(run: Path) -> Path:
    """Step 350 saved with torch.save (zip format) beside the safetensors checkpoints."""
    path = run / "ckpt" / "step_000350.pt"
    torch.save(tiny_state(9, 350), path)
    return path


def _json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main([*args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("old, status", [(False, "being written"), (True, "unreadable")])
def test_a_truncated_newest_checkpoint_is_left_out_and_every_command_exits_0(
        tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str, old: bool, status: str) -> None:
    run = _run(tmp_path)
    newest = _newest_as_torch(run) if fmt == "torch" else run / "ckpt" / "step_000300.safetensors"
    step = 350 if fmt == "torch" else 300
    _truncate(newest, old)

    doc = _json(capsys, "analyze", str(run), "--no-similarity")
    assert step not in [c["step"] for c in doc["checkpoints"]]
    [bad] = doc["unreadable"]
    assert (bad["path"], bad["step"], bad["kind"], bad["status"]) == (str(newest), step, "checkpoint", status)
    assert bad["being_written"] is (not old) and "truncated" in bad["reason"]

    rec = _json(capsys, "recommend", str(run))
    assert step not in [c["step"] for c in rec["checkpoints"]]
    [excluded] = [d for d in rec["excluded"] if d["step"] == step]
    assert excluded["path"] == str(newest) and excluded["reason"].startswith(f"Left out: {status}: ")
    assert rec["unreadable"][0]["path"] == str(newest)

    assert main(["recommend", str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"- step {step:>8}  Left out: {status}" in out
    assert f"ckpt-select: note: passed over checkpoint {newest} (step {step}): {status}" in err
    for command in (["stop"], ["logs"], ["analyze", "--no-similarity"]):
        if not old:
            os.utime(newest)   # still being written, however slow this machine is
        assert main([*command, str(run)]) == 0, command
        out, err = capsys.readouterr()
        assert str(newest) in out + err, command


def test_a_zero_byte_safetensors_file_is_listed_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run(tmp_path)
    empty = run / "ckpt" / "step_000350.safetensors"
    empty.write_bytes(b"")
    doc = _json(capsys, "analyze", str(run), "--no-similarity")
    assert [c["step"] for c in doc["checkpoints"]] == STEPS
    assert [(u["path"], u["step"]) for u in doc["unreadable"]] == [(str(empty), 350)]
    assert "0 bytes" in doc["unreadable"][0]["reason"]
    assert main(["recommend", str(run)]) == 0


def test_a_dangling_log_symlink_is_listed_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run(tmp_path)
    (run / "latest.log").symlink_to(run / "gone.log")
    doc = _json(capsys, "analyze", str(run), "--no-similarity")
    assert len(doc["checkpoints"]) == len(STEPS) and doc["logs"][0]["rows"] > 0
    [bad] = doc["unreadable"]
    assert bad["kind"] == "log" and bad["path"] == str(run / "latest.log") and "gone.log" in bad["reason"]
    logs = _json(capsys, "logs", str(run))
    assert [u["path"] for u in logs["unreadable"]] == [str(run / "latest.log")]
    for command in ("recommend", "stop", "logs"):
        assert main([command, str(run)]) == 0, command
    assert folder_stamp(run) == folder_stamp(run)   # the app's cache key survives the dangling link


def test_a_symlink_loop_named_like_a_log_is_listed_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run(tmp_path)
    (run / "a.jsonl").symlink_to(run / "b.jsonl")
    (run / "b.jsonl").symlink_to(run / "a.jsonl")
    doc = _json(capsys, "analyze", str(run), "--no-similarity")
    assert sorted(Path(u["path"]).name for u in doc["unreadable"]) == ["a.jsonl", "b.jsonl"]
    assert all("symbolic links" in u["reason"] for u in doc["unreadable"])
    for command in ("recommend", "stop", "logs"):
        assert main([command, str(run)]) == 0, command


def test_a_token_file_starting_with_0x80_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run(tmp_path)
    (run / "data").mkdir()
    (run / "data" / "val.bin").write_bytes(bytes([0x80, 0x01]) * 4096)   # uint16 tokens 384, 384, ...
    opened = open_run(run)
    assert [c.step for c in opened.checkpoints] == STEPS and opened.unreadable == ()
    assert all("val.bin" not in str(c.path) for c in opened.checkpoints)
    for command in ("analyze", "recommend", "stop", "logs"):
        assert main([command, str(run)]) == 0, command
    assert "val.bin" not in capsys.readouterr().err


def test_a_run_with_nothing_readable_is_exit_2_naming_every_file(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "step_100.safetensors").write_bytes(b"")
    save_file(tiny_state(0, 200), str(run / "step_200.safetensors"))
    _truncate(run / "step_200.safetensors", old=True)
    torch.save({"w": torch.ones(3), "evil": Evil(tmp_path / "pwned")}, run / "step_300.pt")
    for command in ("analyze", "recommend", "stop", "logs"):
        assert main([command, str(run)]) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "nothing here could be read" in err
        for name in ("step_100.safetensors", "step_200.safetensors", "step_300.pt"):
            assert name in err, (command, name)
        assert "0 bytes" in err and "truncated" in err and "refused" in err
    assert not (tmp_path / "pwned").exists()


def test_a_file_name_that_is_not_utf8_is_read_and_printed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run(tmp_path)
    with open(os.path.join(os.fsencode(run), b"log\xff.jsonl"), "wb") as handle:
        handle.write(b'{"step": 1, "train_loss": 9.0}\n')
    assert main(["analyze", str(run), "--no-similarity"]) == 0   # capsys' stdout is strict UTF-8
    assert "log\ufffd.jsonl (jsonl, 1 rows" in capsys.readouterr().out
    assert main(["logs", str(run)]) == 0
    assert "log\ufffd.jsonl: jsonl, 1 rows" in capsys.readouterr().out
    doc = _json(capsys, "analyze", str(run), "--no-similarity")
    assert sorted(Path(log["path"]).name for log in doc["logs"]) == ["log\udcff.jsonl", "metrics.jsonl"]
    assert main(["recommend", str(run)]) == 0 and main(["stop", str(run)]) == 0
    assert len(folder_stamp(run)) == 16 and open_run(run).fingerprint != folder_stamp(tmp_path)


def test_analyze_on_a_single_good_checkpoint_file_is_a_one_checkpoint_run(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run(tmp_path)
    good = run / "ckpt" / "step_000300.safetensors"
    doc = _json(capsys, "analyze", str(good))
    assert [(c["step"], c["path"], c["format"]) for c in doc["checkpoints"]] == [(300, str(good), "safetensors")]
    assert doc["checkpoints"][0]["n_params"] == 36 and doc["logs"] == [] and doc["unreadable"] == []
    rec = _json(capsys, "recommend", str(good))
    assert [c["step"] for c in rec["checkpoints"]] == [300]
    assert main(["stop", str(good)]) == 2   # no loss logged: nothing to fit, and the error says which file
    assert capsys.readouterr().err.startswith(f"ckpt-select: error: {good}: ")


def test_analyze_on_a_merged_model_file_analyzes_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run(tmp_path)
    ckpts = [str(run / "ckpt" / f"step_{s:06d}.safetensors") for s in (250, 300)]
    assert main(["merge", "--checkpoints", ckpts[0], "--checkpoints", ckpts[1], "-o", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    merged = next((tmp_path / "out").glob("*.safetensors"))
    doc = _json(capsys, "analyze", str(merged), "--no-similarity")
    assert [(c["path"], c["n_params"]) for c in doc["checkpoints"]] == [(str(merged), 36)]
    assert doc["merged_outputs"] == []


@pytest.mark.parametrize("make, problem", [
    (lambda p: _truncate(p, old=False), "being written: header length"),
    (lambda p: _truncate(p, old=True), "unreadable: header length"),
    (lambda p: p.write_bytes(b""), "0 bytes"),
])
def test_analyze_on_a_single_bad_checkpoint_file_is_exit_2_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture, make, problem: str) -> None:
    path = tmp_path / "step_100.safetensors"
    save_file(tiny_state(0, 100), str(path))
    make(path)
    for command in ("analyze", "recommend", "stop"):
        assert main([command, str(path)]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"ckpt-select: error: Could not read checkpoint {path}: ") and problem in err


@pytest.mark.parametrize("name, content", [("empty.pt", b""), ("tokens.bin", bytes([0x80, 0x02]) * 64)])
def test_analyze_on_a_single_file_named_like_a_checkpoint_that_is_none_is_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["analyze", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"ckpt-select: error: Could not read checkpoint {path}: ")


def test_analyze_on_a_single_malicious_checkpoint_refuses_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "step_5.pt"
    torch.save({"w": torch.ones(3), "evil": Evil(tmp_path / "pwned")}, path)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "refused" in err and "posix.system" in err
    assert not (tmp_path / "pwned").exists()


def test_run_page_warns_about_the_unreadable_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run(tmp_path)
    newest = _truncate(run / "ckpt" / "step_000300.safetensors", old=False)
    with open(os.path.join(os.fsencode(run), b"log\xff.jsonl"), "wb") as handle:
        handle.write(b'{"step": 1, "train_loss": 9.0}\n')
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CKPT_SELECT_RUN", str(run))
    monkeypatch.delenv("CKPT_SELECT_ROOT", raising=False)
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert [w.value for w in at.warning if str(newest) in w.value] == [
        f"Passed over checkpoint {newest} (step 300): being written: "
        "header length 232 exceeds the file (196 bytes) or the format's 100 MB cap: truncated or not safetensors"]
    assert f"{len(STEPS) - 1} checkpoints" in at.caption[0].value
    for page in ("checkpoints", "merge"):   # the other pages take the run without the bad file
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, (page, at.exception)
