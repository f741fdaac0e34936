"""`recommend --eval-cache`: scores kept on disk, found again only for exactly what was scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.errors import EvaluatorError
from analysis.evaluate import Evaluator, load_evaluator
from analysis.run import open_run
from conftest import REPO

# Counts its calls in a file beside it, so a test sees how many times the function really ran.
EVALUATOR = '''from pathlib import Path

def evaluate(state):
    counter = Path(__file__).with_name("calls.txt")
    counter.write_text(str(int(counter.read_text()) + 1) if counter.exists() else "1")
    return float(abs(state["layer.bias"].float().mean() - 5.25))
'''


def _recommend(run: Path, evaluator: Path, scores: Path, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "analysis", "recommend", str(run), "--eval", f"{evaluator}:evaluate",
                           "--json", *extra], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "CKPT_SELECT_SCORES_DIR": str(scores)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _calls(evaluator: Path) -> int:
    counter = evaluator.with_name("calls.txt")
    return int(counter.read_text()) if counter.exists() else 0


def test_a_second_search_reads_every_score_from_the_cache_and_decides_the_same(tiny_run: Path,
                                                                                 tmp_path: Path) -> None:
    evaluator, scores = tmp_path / "ev" / "evaluate.py", tmp_path / "scores"
    evaluator.parent.mkdir()
    evaluator.write_text(EVALUATOR)
    first = _recommend(tiny_run, evaluator, scores, "--eval-cache")
    ran = _calls(evaluator)
    assert ran == first["evaluations"] > 1 and first["evaluations_cached"] == 0
    assert len(list(scores.glob("*.json"))) == 1
    again = _recommend(tiny_run, evaluator, scores, "--eval-cache")
    assert _calls(evaluator) == ran                                  # nothing ran twice
    assert again["evaluations_cached"] == again["evaluations"] == first["evaluations"]
    assert again["checkpoints"] == first["checkpoints"] and again["score"] == first["score"]


def test_without_the_flag_nothing_is_written(tiny_run: Path, tmp_path: Path) -> None:
    evaluator, scores = tmp_path / "evaluate.py", tmp_path / "scores"
    evaluator.write_text(EVALUATOR)
    _recommend(tiny_run, evaluator, scores)
    assert not scores.exists()


def test_a_changed_evaluator_or_checkpoint_is_scored_again(tiny_run: Path, tmp_path: Path) -> None:
    evaluator, scores = tmp_path / "evaluate.py", tmp_path / "scores"
    evaluator.write_text(EVALUATOR)
    first = _recommend(tiny_run, evaluator, scores, "--eval-cache")["evaluations"]
    evaluator.write_text(EVALUATOR + "# edited\n")                     # another source: another identity
    assert _recommend(tiny_run, evaluator, scores, "--eval-cache")["evaluations_cached"] == 0
    assert len(list(scores.glob("*.json"))) == 2
    newest = tiny_run / "ckpt" / "step_000600.safetensors"
    os.utime(newest, ns=(newest.stat().st_atime_ns, newest.stat().st_mtime_ns + 10**9))
    rescored = _recommend(tiny_run, evaluator, scores, "--eval-cache")
    # Every candidate holds the newest checkpoint but the soup's older trials: those alone are reused.
    assert 0 <= rescored["evaluations_cached"] < rescored["evaluations"] <= first + 1


def test_a_corrupt_cache_file_is_started_afresh(tiny_run: Path, tmp_path: Path) -> None:
    evaluator = tmp_path / "evaluate.py"
    evaluator.write_text(EVALUATOR)
    loaded = load_evaluator(f"{evaluator}:evaluate", run=open_run(tiny_run))
    path = loaded.persist(tmp_path / "scores")
    path.parent.mkdir()
    path.write_text("{not json")
    again = load_evaluator(f"{evaluator}:evaluate", run=open_run(tiny_run))
    again.persist(tmp_path / "scores")
    refs = open_run(tiny_run).checkpoints[-2:]
    score = again.score(refs, (0.5, 0.5))
    assert again.from_store == 0 and json.loads(path.read_text())["scores"] and score == pytest.approx(
        again.score(refs, (0.5, 0.5)))


def test_an_evaluator_without_an_identity_cannot_be_cached() -> None:
    with pytest.raises(EvaluatorError, match="no identity"):
        Evaluator(lambda sd: 0.0, "anonymous").persist()
