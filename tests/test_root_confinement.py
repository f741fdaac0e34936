"""Issue 19: `ui --root DIR` confines everything, not only the run path; an index's shards stay in its folder.

Each test reproduces what the issue found: an evaluator outside the root ran, hf-lm read any text
file, a run's symlinks out of the root were read and shown, and an index naming ``../x`` or ``/abs/x``
was opened and merged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from analysis.merge.in_memory import average_state_dict
from analysis.cli import main
from analysis.errors import CheckpointReadError, InvalidArgument
from analysis.evaluate import check_evaluator_allowed, load_evaluator
from analysis.run import checkpoint_ref, open_run
from conftest import REPO, tiny_state, write_tiny_run

APP = str(REPO / "app" / "streamlit_app.py")


def _evil(folder: Path, marker: Path) -> Path:
    """An evaluator whose import leaves a marker file: proof that it ran."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "evil.py"
    path.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                    "def f(state):\n    return 1.0\n")
    return path


def _good(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ev.py"
    path.write_text("def f(state):\n    return float(state['layer.bias'].float().abs().mean())\n")
    return path


# --- 1. evaluators -------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["absolute", "relative", "symlink inside the root"])
def test_issue19_evaluator_outside_the_root_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    root, marker = tmp_path / "root", tmp_path / "marker"
    root.mkdir()
    evil = _evil(tmp_path / "outside", marker)
    spec = {"absolute": f"{evil}:f", "relative": "../outside/evil.py:f", "symlink inside the root": "link.py:f"}[how]
    (root / "link.py").symlink_to(evil)
    with pytest.raises(InvalidArgument, match=r"the app runs only evaluator files inside the allowed folder .* "
                                              r"resolves outside it"):
        check_evaluator_allowed(spec, root, ())
    assert not marker.exists()


def test_issue19_evaluators_inside_the_root_or_allow_listed_are_accepted(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run = write_tiny_run(root / "run", [100, 200])
    inside, outside = _good(root / "evals"), _good(tmp_path / "outside")
    assert check_evaluator_allowed("evals/ev.py:f", root, ()) == f"{inside.resolve()}:f"
    allowed = check_evaluator_allowed(f"{outside}:f", root, [f"{outside.resolve()}:f"])
    assert allowed == f"{outside.resolve()}:f"
    (root / "alias.py").symlink_to(outside)   # another name of the allowed file is the same evaluator
    assert check_evaluator_allowed("alias.py:f", root, [f"{outside}:f"]) == allowed
    with pytest.raises(InvalidArgument):      # allowed is FILE and FUNC: another function is not
        check_evaluator_allowed(f"{outside}:g", root, [f"{outside}:f"])
    refs = open_run(run, root).checkpoints
    assert load_evaluator(allowed).score(refs[-1:], (1.0,)) == pytest.approx(
        float(tiny_state(1, 200)["layer.bias"].abs().mean()), rel=1e-5)
    assert check_evaluator_allowed(f"{outside}:f", None, ()) == f"{outside}:f"   # the CLI: nothing changes


def test_issue19_hf_lm_text_file_outside_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("the server's private notes\n")
    (root / "val.txt").write_text("some validation text\n")
    for spec in (f"hf-lm:{tmp_path / 'secret.txt'}", "hf-lm:../secret.txt"):
        with pytest.raises(InvalidArgument, match="hf-lm reads only text files inside the allowed folder"):
            check_evaluator_allowed(spec, root, ())
    assert check_evaluator_allowed("hf-lm:val.txt", root, ()) == f"hf-lm:{(root / 'val.txt').resolve()}"


def test_issue19_hf_lm_refuses_a_run_whose_tokenizer_links_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run = write_tiny_run(root / "run", [100, 200])
    (root / "val.txt").write_text("text\n")
    (tmp_path / "tokenizer.json").write_text("{}")
    (run / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(InvalidArgument, match="tokenizer.json: hf-lm would read this file of the run"):
        check_evaluator_allowed("hf-lm:val.txt", root, (), open_run(run))


@pytest.fixture
def _private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("CKPT_SELECT_EVALUATORS", raising=False)


def _merge_page(run: Path, root: Path, spec: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("CKPT_SELECT_RUN", str(run))
    monkeypatch.setenv("CKPT_SELECT_ROOT", str(root))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("views/merge.py").run()
    assert not at.exception, at.exception
    at.text_input(key="eval_spec").set_value(spec).run()
    at.button(key="score_button").click().run()
    assert not at.exception, at.exception
    return at


@pytest.mark.usefixtures("_private_state")
def test_issue19_merge_page_refuses_an_evaluator_outside_the_root(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, marker = tmp_path / "root", tmp_path / "marker"
    run = write_tiny_run(root / "run", [100, 200, 300])
    evil = _evil(tmp_path / "outside", marker)
    at = _merge_page(run, root, f"{evil}:f", monkeypatch)
    assert [e.value for e in at.error] == [
        f"{evil}:f: the app runs only evaluator files inside the allowed folder {root.resolve()} (the app was "
        "started with --root) or named with `ckpt-select ui --eval FILE.py:FUNC`; this one resolves outside it"]
    assert not at.metric and not marker.exists()


@pytest.mark.usefixtures("_private_state")
def test_issue19_merge_page_runs_an_evaluator_the_server_was_started_with(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    run = write_tiny_run(root / "run", [100, 200, 300])
    outside = _good(tmp_path / "outside")
    monkeypatch.setenv("CKPT_SELECT_EVALUATORS", json.dumps([f"{outside.resolve()}:f"]))
    at = _merge_page(run, root, f"{outside}:f", monkeypatch)
    assert not at.error, [e.value for e in at.error]
    assert at.metric[0].label == "selection (lower is better)"


def test_issue19_ui_takes_an_evaluator_allow_list(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ui", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--eval FILE.py:FUNC" in out and "--root" in out
    assert main(["ui", "--root", str(tmp_path), "--eval", f"{tmp_path / 'none.py'}:f"]) == 2   # never serves
    assert capsys.readouterr().err.strip() == f"ckpt-select: error: ui --eval {tmp_path.resolve() / 'none.py'}:f: no such file"


# --- 2. every file a run reads ---------------------------------------------------------------------

def _run_with_links_out(tmp_path: Path) -> tuple[Path, Path]:
    """root/run: checkpoint 100 its own; its log, checkpoint 200, a shard of checkpoint 300 and its config link out."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    source = write_tiny_run(outside / "source", [100, 200])
    run = root / "run"
    (run / "ckpt").mkdir(parents=True)
    shutil.copy(source / "ckpt" / "step_000100.safetensors", run / "ckpt" / "step_000100.safetensors")
    (run / "ckpt" / "step_000200.safetensors").symlink_to(source / "ckpt" / "step_000200.safetensors")
    (run / "metrics.jsonl").symlink_to(source / "metrics.jsonl")
    (outside / "ckpt-select.yaml").write_text("name: read-from-outside\n")
    (run / "ckpt-select.yaml").symlink_to(outside / "ckpt-select.yaml")
    folder = run / "checkpoint-300"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file(tiny_state(2, 300), str(outside / "shard.safetensors"))
    (folder / "model-00001-of-00001.safetensors").symlink_to(outside / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in tiny_state(2, 300)}}))
    return root, run


def test_issue19_run_files_linking_out_of_the_root_are_not_read(tmp_path: Path) -> None:
    root, run = _run_with_links_out(tmp_path)
    confined = open_run(run, root)
    assert [c.step for c in confined.checkpoints] == [100]
    assert confined.logs == () and confined.name == "run" and len(confined.metrics) == 0
    suffix = f"left out, it resolves outside the allowed folder {root.resolve()} (ui --root)"
    for name in ("ckpt-select.yaml", "metrics.jsonl", "ckpt/step_000200.safetensors",
                 "checkpoint-300/model-00001-of-00001.safetensors"):
        assert f"{name}: {suffix}" in confined.notes
    free = open_run(run)   # the command line, no root: the links are the user's own business
    assert [c.step for c in free.checkpoints] == [100, 200, 300]
    assert len(free.logs) == 1 and free.logs[0].rows > 0 and free.name == "read-from-outside"


def test_issue19_a_run_outside_the_root_is_refused(tmp_path: Path) -> None:
    root, _ = _run_with_links_out(tmp_path)
    with pytest.raises(InvalidArgument, match="outside the allowed folder"):
        open_run(tmp_path / "outside" / "source", root)


# --- 3. an index's shards stay in its folder, root or not ------------------------------------------

def _sharded_model(folder: Path, shard_name: str, shard_file: Path) -> Path:
    """An HF folder whose index names ``shard_name`` for every tensor; the real shard is at ``shard_file``."""
    state = tiny_state(0, 100)
    shard_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(shard_file))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": shard_file.stat().st_size}, "weight_map": {k: shard_name for k in state}}))
    return folder


@pytest.fixture(params=["relative", "absolute"])
def escaping_model(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    if request.param == "relative":
        return _sharded_model(tmp_path / "model", "../x.safetensors", tmp_path / "x.safetensors"), "../x.safetensors"
    shard = tmp_path / "elsewhere" / "x.safetensors"
    return _sharded_model(tmp_path / "model", str(shard), shard), str(shard)


def test_issue19_analyze_refuses_an_index_whose_shard_leaves_its_folder(escaping_model: tuple[Path, str],
                                                                        capsys: pytest.CaptureFixture) -> None:
    model, shard = escaping_model
    assert main(["analyze", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"index names shard {shard!r} outside its own folder" in err
    assert str(model.resolve() / "model.safetensors.index.json") in err


def test_issue19_merge_refuses_an_index_whose_shard_leaves_its_folder(escaping_model: tuple[Path, str],
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    model, shard = escaping_model
    out = tmp_path / "out"
    assert main(["merge", "--checkpoints", str(model), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"index names shard {shard!r} outside its own folder" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    with pytest.raises(CheckpointReadError, match="outside its own folder"):
        checkpoint_ref(model / "model.safetensors.index.json")


def test_issue19_a_shard_linked_from_the_index_folder_still_opens_without_a_root(tmp_path: Path) -> None:
    # The Hugging Face hub cache links each snapshot file to ../../blobs: the name is what must stay in the folder.
    model = _sharded_model(tmp_path / "snapshot", "model-00001-of-00001.safetensors", tmp_path / "blobs" / "abc")
    (model / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "blobs" / "abc")
    ref = checkpoint_ref(model)
    assert ref.layout == "hf_folder" and ref.size_bytes > (tmp_path / "blobs" / "abc").stat().st_size
    assert torch.equal(average_state_dict([ref], [1.0])["layer.weight"], tiny_state(0, 100)["layer.weight"])
