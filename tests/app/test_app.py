"""Every page through Streamlit's AppTest: a run opens, the selection is shared, a merge runs."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
import streamlit as st
from streamlit.testing.v1 import AppTest

from ckpt_factories import adam_run, tied_llama_run
from conftest import REPO, rewrite_metrics, wait_for_merge

APP = str(REPO / "app" / "streamlit_app.py")


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recent runs are remembered on disk: keep each test's memory to itself."""
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))


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


def _page(at: AppTest, name: str) -> AppTest:
    at.switch_page(f"views/{name}.py").run()
    assert not at.exception, at.exception
    return at


def test_run_page_curves_spikes_and_stop_panel(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _open(tiny_run, monkeypatch)
    assert at.title[0].value == "run"
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    names = [trace.get("name") for trace in specs[0]["data"]]
    assert "val loss" in names and "checkpoint: in a spike" in names and "checkpoint: selected" in names
    assert any(shape.get("type") == "rect" for shape in specs[0]["layout"].get("shapes", []))
    assert len(specs) == 3  # loss, lr/grad norm, stop fit
    assert any("spike at steps 298" in c.value for c in at.caption)


def test_run_page_names_a_spike_a_checkpoints_own_val_loss_cleared(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import rewrite_metrics, write_tiny_run

    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    rewrite_metrics(run, lambda r: {**r, "train_loss": r["train_loss"] + 0.5}
                    if r.get("step") == 600 and "train_loss" in r else r)
    at = _open(run, monkeypatch)
    cleared = [c.value for c in at.caption if c.value.startswith(":green[●] Checkpoint 600: Saved inside a train_loss")]
    assert len(cleared) == 1 and cleared[0].endswith("at step 550 before the spike: its weights did not carry it.")


def test_smoothing_is_bound_to_the_url(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPT_SELECT_RUN", str(tiny_run))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["smooth"] = "0.9"
    at.run()
    assert at.slider(key="smooth").value == pytest.approx(0.9)


def test_checkpoints_page_says_which_val_losses_are_interpolated(tiny_run: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the evals at every second checkpoint only (steps 100, 200, ...): the others sit between two.
    rewrite_metrics(tiny_run, lambda row: None if "val_loss" in row and row["step"] % 100 else row)
    at = _open(tiny_run, monkeypatch)   # the Run page: the loss chart's checkpoint markers say it on hover
    loss = json.loads(at.get("plotly_chart")[0].proto.spec)
    hover = [t for trace in loss["data"] for t in trace.get("text") or [] if isinstance(t, str)]
    assert any(t.startswith("step_000150.safetensors (step 150)<br>val loss") and
               t.endswith("interpolated between the evals at steps 100 and 200") for t in hover)
    assert any(t.endswith("no val loss near it: placed on the train loss") for t in hover)   # step 50
    table = _page(at, "checkpoints").dataframe[0].value
    by_step = table.set_index("step")["val from"]
    assert by_step[150] == "interpolated @ 100-200" and by_step[200] == "logged @ 200" and by_step[50] == ""


def test_checkpoints_page_table_and_shared_selection(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _page(_open(tiny_run, monkeypatch), "checkpoints")
    table = at.dataframe[0].value
    assert table["step"].tolist() == list(range(50, 650, 50))
    assert table.loc[table["step"] == 300, "status"].item() == "spike"
    assert not table.loc[table["step"] == 300, "use"].item() and table["use"].iloc[-1]
    assert table.loc[table["step"] == 600, "status"].item() == "recommended"
    assert table["reason"].str.len().min() > 20
    assert (table["LR"] == 1e-3).all() and (table["LR from"] == "logged").all()
    # Tick rows 10 and 11 only: the selection becomes steps 550 and 600 on every page.
    at.session_state["selected_steps"] = [550, 600]
    at.run()
    _page(at, "merge")
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert spec["data"][0]["x"] == ["550", "600"]


def test_checkpoints_page_shows_iterate_noise_from_a_real_adam_state(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt_factories import adam_run

    run, sqrt_v_sum, _ = adam_run(tmp_path / "adam", [5, 10, 15])
    at = _page(_open(run, monkeypatch), "checkpoints")
    metrics = {m.label: m.value for m in at.metric}
    corrected = sqrt_v_sum / (1 - 0.999 ** 15) ** 0.5   # Adam's bias correction after 15 steps (issue 21)
    assert metrics["Iterate noise at the newest LR"] == f"{1e-3 * corrected / 4:.4f} nats"
    assert metrics["Predicted gain vs the last checkpoint"].endswith(" nats")


def _merge_page_for_two(run: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """The Merge page with checkpoints 550 and 600 selected and ``out`` as the output folder."""
    at = _open(run, monkeypatch)
    at.session_state["selected_steps"] = [550, 600]
    _page(at, "merge")
    at.text_input(key="out_dir").set_value(str(out)).run()
    return at


def test_merge_page_merges_the_selection(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "merged-two"
    at = _merge_page_for_two(tiny_run, out, monkeypatch)
    at.button(key="merge_button").click().run()
    wait_for_merge(at)
    assert not at.error, [e.value for e in at.error]
    assert any(str(out) in s.value for s in at.success)
    merged = load_file(str(out / "model.safetensors"))
    a = load_file(str(tiny_run / "ckpt" / "step_000550.safetensors"))
    b = load_file(str(tiny_run / "ckpt" / "step_000600.safetensors"))
    assert merged["layer.weight"].allclose((a["layer.weight"] + b["layer.weight"]) / 2, atol=1e-6)
    assert (out / "recipe.yaml").is_file()


def test_merge_page_plans_before_merging(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "planned"
    at = _merge_page_for_two(tiny_run, out, monkeypatch)
    at.button(key="plan_button").click().run()
    assert not at.error, [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    inputs = sum((tiny_run / "ckpt" / f"step_000{s}.safetensors").stat().st_size for s in (550, 600))
    assert metrics["reads"] == f"{inputs / 1e9:,.2f} GB"
    assert metrics["peak memory"].endswith(" MB") and metrics["time, inputs cached"].endswith(" s")
    assert any("model.safetensors" in c.value and str(out) in c.value for c in at.caption)
    assert not out.exists()                                   # a plan writes nothing
    at.text_input(key="out_dir").set_value(str(tiny_run)).run()   # a folder holding the inputs: refused
    at.button(key="plan_button").click().run()
    assert at.error and "reads" not in {m.label for m in at.metric}


def test_merge_page_ema_weights_and_evaluator(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluator = tmp_path / "ev.py"
    evaluator.write_text("def evaluate(state):\n    return float(state['layer.bias'].float().abs().mean())\n")
    at = _open(tiny_run, monkeypatch)
    at.session_state["selected_steps"] = [500, 550, 600]
    _page(at, "merge")
    at.segmented_control(key="weights_method").set_value("ema").run()
    at.slider(key="ema_alpha").set_value(0.5).run()
    weights = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["y"]
    assert weights == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    at.text_input(key="eval_spec").set_value(f"{evaluator}:evaluate").run()
    at.button(key="score_button").click().run()
    assert not at.error, [e.value for e in at.error]
    assert at.metric[0].label == "selection (lower is better)"


def test_merge_page_searches_with_the_evaluator_and_every_page_follows(tiny_run: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The search is `recommend --eval --max-evals N`: its choice replaces the logs' one on every page until
    the user goes back."""
    from analysis.evaluate import load_evaluator
    from analysis.selection import RecommendConfig, recommend
    from analysis.run import open_run
    from analysis.signals import assess_run

    evaluator = tmp_path / "ev.py"   # best: the average whose bias is nearest the tiny run's at step 575
    evaluator.write_text("def evaluate(state):\n    return abs(float(state['layer.bias'].float().mean()) - 5.75)\n")
    spec = f"{evaluator}:evaluate"
    expected = recommend(assess_run(open_run(tiny_run)), RecommendConfig(max_evals=9), load_evaluator(spec))
    logs_only = recommend(assess_run(open_run(tiny_run)))
    assert expected.checkpoints != logs_only.checkpoints

    at = _page(_open(tiny_run, monkeypatch), "checkpoints")
    assert any("a heuristic" in i.value and "exp_avg_sq" in i.value for i in at.info)   # no Adam state here
    _page(at, "merge")
    at.text_input(key="eval_spec").set_value(spec).run()
    at.number_input(key="search_budget").set_value(9).run()
    at.button(key="search_button").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert f"The recommendation on every page is now this search's: {expected.summary}" in [c.value for c in at.caption]
    weights = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["y"]
    assert weights == pytest.approx(list(expected.weights))
    _page(at, "checkpoints")
    assert at.success[0].value == f"**Recommendation:** {expected.summary}"
    assert any(c.value.startswith("Measured: the evaluator scored 9 candidates") for c in at.caption)
    table = at.dataframe[0].value
    assert table[table["use"]]["step"].tolist() == [r.step for r in expected.checkpoints]

    _page(at, "merge")
    at.button(key="search_clear").click().run()
    assert not at.exception
    _page(at, "checkpoints")
    assert at.success[0].value == f"**Recommendation:** {logs_only.summary}"


def test_merge_page_scores_with_the_built_in_hf_lm_evaluator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis.evaluate import load_evaluator
    from analysis.run import open_run

    root = tied_llama_run(tmp_path / "run")
    at = _page(_open(root, monkeypatch), "merge")
    at.text_input(key="eval_spec").set_value(f"hf-lm:{root / 'val.txt'}").run()
    at.button(key="score_button").click().run()
    assert not at.error, [e.value for e in at.error]
    run = open_run(root)
    expected = load_evaluator(f"hf-lm:{root / 'val.txt'}", run=run).score(run.checkpoints, (1.0,))
    assert at.metric[0].value == f"{expected:.4f}"


def test_storage_page_prefilled_from_run(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _page(_open(tiny_run, monkeypatch), "storage")
    assert at.number_input(key="st_params").value == 36
    assert at.number_input(key="st_every").value == 50
    assert at.caption[0].value == "Pre-filled from run: 36 parameters, a checkpoint every 50 steps, 1.500 s per step."
    at.number_input(key="st_params").set_value(7e9).run()
    at.selectbox(key="st_dtype").set_value("bf16").run()
    at.selectbox(key="st_opt").set_value("adamw").run()
    assert at.metric[0].value == "98.00 GB"


def test_root_confinement_rejects_outside_paths(tiny_run: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    at = _page(_open(tiny_run, monkeypatch, root=tiny_run), "merge")
    at.text_input(key="out_dir").set_value(str(tiny_run / ".." / "escape")).run()
    at.button(key="merge_button").click().run()
    assert any("outside the allowed folder" in e.value for e in at.error)
    assert not (tmp_path / "escape").exists()
    at.text_input(key="run_input").set_value("/etc").run()
    at.button(key="open_run").click().run()
    assert any("outside the allowed folder" in e.value for e in at.sidebar.error)


def test_bad_run_shows_a_message_not_a_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    at = _open(tmp_path / "empty", monkeypatch)
    assert "found no checkpoints and no training logs" in at.error[0].value
    for page in ("checkpoints", "merge", "storage"):
        _page(at, page)


def test_checkpoints_page_similarity_charts(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _page(_open(tiny_run, monkeypatch), "checkpoints")
    table = at.dataframe[0].value
    assert table["update norm"].iloc[0] is None or table["update norm"].isna().iloc[0]
    assert (table["update norm"].iloc[1:] > 0).all() and table["dist. to newest"].iloc[-1] == 0
    heatmap, trajectory = (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
    assert heatmap["data"][0]["type"] == "heatmap" and trajectory["layout"]["dragmode"] == "lasso"


def _values(data: object) -> list:
    """A plotly trace array as a list: plotly sends numpy arrays base64-encoded ({"dtype", "bdata"})."""
    if isinstance(data, dict):
        return np.frombuffer(base64.b64decode(data["bdata"]), dtype=np.dtype(data["dtype"])).tolist()
    return list(data)


def test_run_page_draws_the_lrs_saved_in_checkpoints_when_the_logs_have_none(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root, _, _ = adam_run(tmp_path / "nanogpt", [2, 4, 6, 8], lr_at=lambda step: 1e-3 if step <= 4 else 2e-4,
                          log_lr=False)
    at = _open(root, monkeypatch)   # the Run page is the first page
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    training = next(f for f in specs if any("saved in the checkpoints" in a.get("text", "")
                                            for a in f["layout"].get("annotations", [])))
    lr = training["data"][0]
    assert _values(lr["x"]) == [2, 4, 6, 8] and _values(lr["y"]) == [1e-3, 1e-3, 2e-4, 2e-4]
    table = _page(at, "checkpoints").dataframe[0].value
    assert (table["LR from"] == "optimizer state").all()


def test_trajectory_selection_maps_points_to_steps() -> None:
    import charts

    selection = {"selection": {"points": [{"curve_number": 0, "point_index": 2}, {"curve_number": 0, "point_index": 0},
                                          {"curve_number": 1, "point_index": 1}], "box": [], "lasso": []}}
    assert charts.steps_from_selection(selection, [100, 200, 300]) == [100, 300]
    assert charts.steps_from_selection({"selection": {"points": []}}, [100]) == []


def test_a_run_without_val_losses_shows_its_train_loss_stand_in_as_such(tiny_run: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rewrite_metrics(tiny_run, lambda row: None if "val_loss" in row else row)
    at = _open(tiny_run, monkeypatch)
    loss = json.loads(at.get("plotly_chart")[0].proto.spec)
    hover = [t for trace in loss["data"] for t in trace.get("text") or [] if isinstance(t, str)]
    assert any(t.startswith("step_000150.safetensors (step 150)<br>train loss") and
               t.endswith("logged over steps 101-150: the run logs no val loss") for t in hover)
    checkpoints = _page(at, "checkpoints")
    assert checkpoints.dataframe[0].value.set_index("step")["val from"][150] == "train mean @ 101-150"
    info = next(i.value for i in checkpoints.info if i.value.startswith("This run logs no val loss"))
    rows = cached_report(tiny_run)["checkpoints"][-8:]
    errors = [c["val_loss_stderr"] for c in rows if c["val_loss_stderr"] is not None]
    assert errors and f"Batch luck moves each of these means by about {np.median(errors):.4f} nats" in info


def test_merge_page_keeps_evaluator_scores_on_disk_when_asked(tiny_run: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The store recommend --eval-cache uses (CKPT_SELECT_SCORES_DIR is a scratch folder in tests): a second
    # session reads both scores back instead of calling the evaluator, which counts its calls in a file.
    calls = tmp_path / "calls.txt"
    evaluator = tmp_path / "ev.py"
    evaluator.write_text("from pathlib import Path\n"
                         f"CALLS = Path({str(calls)!r})\n"
                         "def evaluate(state):\n"
                         "    CALLS.write_text(CALLS.read_text() + 'x' if CALLS.exists() else 'x')\n"
                         "    return float(state['layer.bias'].float().abs().mean())\n")
    captions = []
    for session in range(2):
        at = _open(tiny_run, monkeypatch)
        at.session_state["selected_steps"] = [500, 550, 600]
        _page(at, "merge")
        at.text_input(key="eval_spec").set_value(f"{evaluator}:evaluate").run()
        at.checkbox(key="eval_on_disk").check().run()
        at.button(key="score_button").click().run()
        assert not at.error, [e.value for e in at.error]
        captions.append(next(c.value for c in at.caption if c.value.startswith("Of the 2 scores")))
        st.cache_resource.clear()   # as a new server process: no evaluator left in memory
    assert captions[0] == ("Of the 2 scores: 2 evaluated and written to the score store on disk, 0 read from it, "
                           "0 remembered from this session.")
    assert captions[1] == ("Of the 2 scores: 0 evaluated and written to the score store on disk, 2 read from it, "
                           "0 remembered from this session.")
    assert calls.read_text() == "xx"
    assert list(Path(os.environ["CKPT_SELECT_SCORES_DIR"]).iterdir())


def cached_report(run: Path) -> dict:
    """The `analyze --json` document of ``run``: what the app's numbers must match."""
    from analysis.report import analysis_report
    from analysis.run import open_run
    from analysis.signals import assess_run

    opened = open_run(run)
    return analysis_report(opened, assess_run(opened))

