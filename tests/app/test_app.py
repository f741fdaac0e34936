"""The app through Streamlit's AppTest: opens a run, shows the recommendation, selects, merges."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from streamlit.testing.v1 import AppTest

from conftest import REPO

APP = str(REPO / "app" / "streamlit_app.py")


def _open(run_path: Path, monkeypatch: pytest.MonkeyPatch, root: Path | None = None) -> AppTest:
    monkeypatch.setenv("CKPT_SELECT_RUN", str(run_path))
    if root is not None:
        monkeypatch.setenv("CKPT_SELECT_ROOT", str(root))
    else:
        monkeypatch.delenv("CKPT_SELECT_ROOT", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def _wait_for_merge(at: AppTest, seconds: float = 60) -> None:
    """Rerun until the background merge reports (AppTest does not tick run_every fragments)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        at.run()
        if any("Merged" in s.value for s in at.success) or at.error:
            return
        time.sleep(0.2)
    raise AssertionError("merge did not finish")


def test_page_shows_recommendation_curve_and_table(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _open(tiny_run, monkeypatch)
    assert at.success[0].value.startswith("**Recommendation:** SMA of")
    charts = at.get("plotly_chart")
    spec = json.loads(charts[0].proto.spec)
    names = [trace.get("name") for trace in spec["data"]]
    assert "val loss" in names and "checkpoint: in a spike" in names
    assert any(shape.get("type") == "rect" for shape in spec["layout"].get("shapes", []))
    table = at.dataframe[0].value
    assert table["step"].tolist() == list(range(50, 650, 50))
    assert table.loc[table["step"] == 300, "status"].item() == "spike"
    assert not table.loc[table["step"] == 300, "use"].item()
    assert table["use"].iloc[-1] and table["reason"].str.len().min() > 20


def test_selection_edit_and_merge(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _open(tiny_run, monkeypatch)
    # Untick every recommended checkpoint except the two newest (rows are in step order: 0..11).
    rows = {i: {"use": i in (10, 11)} for i in range(12)}
    at.session_state["ckpt_table"] = {"edited_rows": rows, "added_rows": [], "deleted_rows": []}
    at.run()
    assert at.session_state["selected_steps"] == [550, 600]
    out = tmp_path / "merged-two"
    at.text_input(key="out_dir").set_value(str(out)).run()
    at.button(key="merge_button").click().run()
    _wait_for_merge(at)
    assert not at.error, [e.value for e in at.error]
    assert any(str(out) in s.value for s in at.success)
    merged = load_file(str(out / "model.safetensors"))
    a = load_file(str(tiny_run / "ckpt" / "step_000550.safetensors"))
    b = load_file(str(tiny_run / "ckpt" / "step_000600.safetensors"))
    assert merged["layer.weight"].allclose((a["layer.weight"] + b["layer.weight"]) / 2, atol=1e-6)
    assert at.download_button(key="dl_recipe") is not None


def test_root_confinement_rejects_outside_paths(tiny_run: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    at = _open(tiny_run, monkeypatch, root=tiny_run)
    at.text_input(key="out_dir").set_value(str(tiny_run / ".." / "escape")).run()
    at.button(key="merge_button").click().run()
    assert any("outside the allowed folder" in e.value for e in at.error)
    assert not (tmp_path / "escape").exists()


def test_bad_run_shows_a_message_not_a_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    at = _open(tmp_path / "empty", monkeypatch)
    assert "found no checkpoints and no training logs" in at.error[0].value
