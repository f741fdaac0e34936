"""Issue 24: decay-emulating (WSM) weights from the checkpoints' token positions, windows in tokens, cooldown report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from analysis.cli import main
from analysis.errors import InvalidArgument
from analysis.recipe import load_recipe
from analysis.run import open_run
from analysis.selection import RecommendConfig, cooldown_report, decay_coefficients, parse_schedule, recommend
from analysis.selection.cooldown import stable_phase
from analysis.signals import assess_run
from conftest import rewrite_metrics, write_tiny_run


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    """Run the CLI, assert it succeeded, and parse its one JSON document."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _with_tokens(run: Path, per_step: callable) -> Path:
    """Log a token count on every train row: ``per_step(step)`` tokens seen after ``step``."""
    rewrite_metrics(run, lambda row: {**row, "tokens": per_step(row["step"])} if "train_loss" in row else row)
    return run


def _two_speed(step: int) -> int:
    """1000 tokens a step up to step 400, then 3000 (the batch tripled): unequal token spacing of equal steps."""
    return 1000 * step if step <= 400 else 400_000 + 3000 * (step - 400)


def _one_minus_sqrt(tokens: list[float]) -> list[float]:
    """The coefficients by the module docstring's formula, written out independently of the code."""
    n, span = len(tokens), tokens[-1] - tokens[0]
    w = [1.0 - math.sqrt((t - tokens[0]) / (span * n / (n - 1))) for t in tokens]
    w[0] = 1.0
    return [w[j] - w[j + 1] for j in range(n - 1)] + [w[-1]]


def test_megatron_equal_spacing_values_for_1_minus_sqrt_issue_24() -> None:
    """Megatron-LM's published 1 − √x, n = 5 weights: 0.447, 0.185, 0.142, 0.120, 0.106 (oldest first).

    Which sampling of x reproduces them: c_0 = 1 − w_1 = 0.447 gives w_1 = 0.553, √x_1 = 0.447, x_1 = 0.2;
    likewise x_2 = 0.4, x_3 = 0.6, x_4 = 0.8, and c_4 = w_4 = 1 − √0.8 = 0.106. So x_j = j / n, j = 0..n−1
    (numpy's linspace(0, 1, n, endpoint=False)): the decay runs from the oldest checkpoint to one interval
    past the newest. Our token rule x_j = (t_j − t_0) / (span · n / (n − 1)) is exactly that on equal spacing.
    """
    c = decay_coefficients(parse_schedule("1-sqrt"), [0, 1, 2, 3, 4])
    assert [round(v, 3) for v in c] == [0.447, 0.185, 0.142, 0.120, 0.106]
    assert c == pytest.approx([math.sqrt(0.2), math.sqrt(0.4) - math.sqrt(0.2), math.sqrt(0.6) - math.sqrt(0.4),
                               math.sqrt(0.8) - math.sqrt(0.6), 1 - math.sqrt(0.8)])
    # Spacing in any unit: 10B tokens apart gives the same weights as 1 step apart.
    assert decay_coefficients(parse_schedule("minus-sqrt"), [5e10 + 1e10 * j for j in range(5)]) == pytest.approx(c)


def test_linear_is_sma_and_cosine_and_exp_by_hand_issue_24() -> None:
    """linear: w_j = 1 − j/n, so every c = 1/n (plain SMA, as Megatron notes). cosine, n = 3: x = 0, 1/3, 2/3,
    w = 1, (1 + cos π/3)/2 = 0.75, (1 + cos 2π/3)/2 = 0.25, c = 0.25, 0.5, 0.25. exp:2, n = 2: x = 0, 1/2,
    w_1 = e^−1, c = 1 − e^−1, e^−1."""
    assert decay_coefficients(parse_schedule("linear"), [100, 200, 300, 400]) == pytest.approx([0.25] * 4)
    assert decay_coefficients(parse_schedule("cosine"), [0, 10, 20]) == pytest.approx([0.25, 0.5, 0.25])
    assert decay_coefficients(parse_schedule("exp:2"), [0, 7]) == pytest.approx([1 - math.exp(-1), math.exp(-1)])
    assert parse_schedule("exp").rate == 5.0 and parse_schedule("exp:3").spec == "exp:3"
    assert decay_coefficients(parse_schedule("cosine"), [42]) == (1.0,)


def test_unequal_spacing_1_minus_sqrt_derived_on_paper_issue_24() -> None:
    """Checkpoints at tokens 0, 1, 3 (the run saved the second one early).

    n = 3, span = 3, so the decay runs to one mean spacing (1.5) past the newest: T = 3 · 3/2 = 4.5.
    x = 0, 1/4.5 = 2/9, 3/4.5 = 2/3; w = 1, 1 − √2/3, 1 − √(2/3).
    c_0 = 1 − w_1 = √2/3 ≈ 0.4714; c_1 = w_1 − w_2 = √(2/3) − √2/3 ≈ 0.3451; c_2 = w_2 = 1 − √(2/3) ≈ 0.1835.
    Equal spacing (0, 1, 2: Megatron's j/n) gives √(1/3), √(2/3) − √(1/3), 1 − √(2/3) = 0.5774, 0.2391, 0.1835:
    the early save stands for more of the decay (x = 2/9 .. 2/3) and takes weight from the oldest.
    """
    c = decay_coefficients(parse_schedule("1-sqrt"), [0, 1, 3])
    assert c == pytest.approx([math.sqrt(2) / 3, math.sqrt(2 / 3) - math.sqrt(2) / 3, 1 - math.sqrt(2 / 3)])
    assert [round(v, 4) for v in c] == [0.4714, 0.3451, 0.1835]
    assert decay_coefficients(parse_schedule("1-sqrt"), [0, 1, 2]) == pytest.approx(
        [math.sqrt(1 / 3), math.sqrt(2 / 3) - math.sqrt(1 / 3), 1 - math.sqrt(2 / 3)])


def test_bad_schedules_and_windows_are_refused_issue_24(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("step", "exp:-1", "exp:x", "linear:2"):
        with pytest.raises(InvalidArgument):
            parse_schedule(bad)
    run = write_tiny_run(tmp_path / "run", [100, 200, 300])   # no token count logged
    assert main(["recommend", str(run), "--method", "decay", "--window-tokens", "1e5"]) == 2
    assert "--window-tokens needs the tokens seen" in capsys.readouterr().err
    assert main(["recommend", str(run), "--method", "decay", "--schedule", "warp"]) == 2
    assert "schedule must be one of" in capsys.readouterr().err


def test_recommend_decay_window_tokens_json_gives_token_weights_with_reasons_issue_24(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Equal steps, unequal tokens: the weights follow the tokens (350K, 400K, 550K, ..., 1M), not the steps."""
    run = _with_tokens(write_tiny_run(tmp_path / "run", list(range(50, 650, 50))), _two_speed)
    doc = _json(capsys, ["recommend", str(run), "--method", "decay", "--schedule", "1-sqrt",
                         "--window-tokens", "650e3", "--json"])
    steps = [c["step"] for c in doc["checkpoints"]]
    assert steps == [350, 400, 450, 500, 550, 600] and doc["method"] == "decay"
    tokens = [_two_speed(s) for s in steps]
    assert [c["weight"] for c in doc["checkpoints"]] == pytest.approx(_one_minus_sqrt(tokens))
    assert [c["weight"] for c in doc["checkpoints"]] != pytest.approx(_one_minus_sqrt([float(s) for s in steps]))
    window = "window 650K tokens (asked 650K): steps 350–600, 6 checkpoints"
    assert window in doc["summary"]
    reasons = {d["step"]: d["reason"] for d in doc["decisions"]}
    assert reasons[300].startswith(f"Left out: older than the {window}")
    assert reasons[600].startswith("Taken with weight")
    assert doc["settings"] == {"schedule": "1-sqrt", "window_tokens": 650e3}
    assert doc["recipe"]["method"] == "decay" and doc["recipe"]["settings"] == doc["settings"]


def test_window_tokens_applies_to_every_method_issue_24(tmp_path: Path) -> None:
    run = _with_tokens(write_tiny_run(tmp_path / "run", list(range(50, 650, 50))), _two_speed)
    signals = assess_run(open_run(run))
    rec = recommend(signals, RecommendConfig(method="sma", window_tokens=300e3))
    assert [r.step for r in rec.checkpoints] == [500, 550, 600] and rec.weights == pytest.approx([1 / 3] * 3)
    assert "window 300K tokens (asked 300K): steps 500–600, 3 checkpoints" in rec.summary
    rec = recommend(signals, RecommendConfig(method="ema", window_steps=100))
    assert [r.step for r in rec.checkpoints] == [500, 550, 600]


def test_spike_contaminated_checkpoint_in_the_window_is_excluded_and_weights_recomputed_issue_24(
        tiny_run: Path) -> None:
    """tiny_run's checkpoint 300 was saved inside the loss spike at step 298: the window 300-600 keeps the rest,
    and the coefficients are those of the remaining positions (steps 350..600, the run logs no tokens)."""
    signals = assess_run(open_run(tiny_run))
    rec = recommend(signals, RecommendConfig(method="decay", schedule="cosine", window_steps=300))
    steps = [r.step for r in rec.checkpoints]
    assert steps == [350, 400, 450, 500, 550, 600]
    assert rec.weights == pytest.approx(decay_coefficients(parse_schedule("cosine"), steps))
    reason = next(d.reason for d in rec.decisions if d.step == 300)
    assert reason.startswith("Left out: saved inside a train_loss spike")
    assert "Step 300 inside that span was left out" not in rec.summary   # 300 is the window's edge, not inside
    rec = recommend(signals, RecommendConfig(method="decay", window_steps=350))
    assert [r.step for r in rec.checkpoints][:2] == [250, 350]
    assert rec.weights == pytest.approx(decay_coefficients(parse_schedule("1-sqrt"), [250, 350, 400, 450, 500, 550, 600]))
    assert "Step 300 inside that span was left out (see its reason), so the coefficients were recomputed" in rec.summary


def test_recipe_round_trips_decay_with_schedule_and_window_and_merges_issue_24(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _with_tokens(write_tiny_run(tmp_path / "run", list(range(50, 650, 50))), _two_speed)
    recipe_path = tmp_path / "decay.yaml"
    assert main(["recommend", str(run), "--method", "decay", "--schedule", "exp:3", "--window-tokens", "500e3",
                 "-o", str(recipe_path)]) == 0
    capsys.readouterr()
    recipe = load_recipe(recipe_path)
    assert recipe.method == "decay" and recipe.settings == {"schedule": "exp:3", "window_tokens": 500e3}
    steps = [e.step for e in recipe.checkpoints]
    assert steps == [450, 500, 550, 600]
    assert recipe.weights == pytest.approx(decay_coefficients(parse_schedule("exp:3"), [_two_speed(s) for s in steps]))
    out = tmp_path / "merged"
    assert main(["merge", str(recipe_path), "-o", str(out)]) == 0
    merged = load_file(str(out / "model.safetensors"))["layer.weight"]
    inputs = [load_file(str(run / "ckpt" / f"step_{s:06d}.safetensors"))["layer.weight"] for s in steps]
    assert merged.allclose(sum(w * t for w, t in zip(recipe.weights, inputs)), atol=1e-6)
    assert load_recipe(out / "recipe.yaml").settings == recipe.settings


def test_a_recipe_with_a_bad_decay_schedule_is_refused_issue_24(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_tiny_run(tmp_path / "run", [100, 200])
    recipe_path = tmp_path / "r.yaml"
    assert main(["recommend", str(run), "--method", "decay", "--window", "2", "-o", str(recipe_path)]) == 0
    recipe_path.write_text(recipe_path.read_text().replace("schedule: 1-sqrt", "schedule: warp"))
    assert main(["merge", str(recipe_path), "-o", str(tmp_path / "m")]) == 2
    assert "schedule must be one of" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_cooldown_json_on_the_sample_run_has_a_finite_row_per_schedule_and_window_issue_24(
        sample_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(capsys, ["recommend", str(sample_run), "--cooldown", "--json"])
    rows = doc["rows"]
    assert [(r["schedule"], r["window"]) for r in rows] == [
        (s, f * 2880 * 4096) for f in (0.1, 0.2, 0.4) for s in ("linear", "1-sqrt", "cosine")]
    assert all(r["unit"] == "tokens" and math.isfinite(r["predicted_loss"]) for r in rows)
    assert all(2400 not in r["steps"] and r["steps"][-1] == 2880 for r in rows)   # the spiked one never
    assert doc["stable_step"] == 2880 and doc["decay_step"] is None and "no real decay" in doc["basis"]
    # Merging predicts a lower loss than the newest checkpoint alone, as the sample run's README measures.
    assert all(r["predicted_loss"] < doc["stable_loss"] for r in rows)


def test_cooldown_takes_the_stable_phase_and_compares_with_a_real_decay_issue_24(tmp_path: Path) -> None:
    """A WSD run: LR 1e-3 to step 450, then linearly down to 1e-4 at step 600."""
    run = write_tiny_run(tmp_path / "run", list(range(50, 650, 50)))
    rewrite_metrics(run, lambda r: {**r, "lr": 1e-3 if r["step"] <= 450 else 1e-3 - 9e-4 * (r["step"] - 450) / 150}
                    if "lr" in r else r)
    signals = assess_run(open_run(run))
    stable, decayed = stable_phase([s for s in signals.checkpoints if s.eligible])
    assert stable[-1].ref.step == 450 and decayed.ref.step == 600
    report = cooldown_report(signals)
    assert report.decay_step == 600 and report.decay_loss == pytest.approx(signals.at(600).val.value)
    assert all(max(r.steps) == 450 for r in report.rows)
    assert all(r.predicted_loss is None for r in report.rows)   # no Adam state: nothing to predict from
    assert "real decay ending at step 600" in report.basis


def _app(run_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The app on ``run_path`` through Streamlit's AppTest, with its own state folder."""
    from streamlit.testing.v1 import AppTest
    from conftest import REPO
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CKPT_SELECT_RUN", str(run_path))
    monkeypatch.delenv("CKPT_SELECT_ROOT", raising=False)
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def test_merge_page_decay_weights_chart_and_recipe_issue_24(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _with_tokens(write_tiny_run(tmp_path / "run", list(range(50, 650, 50))), _two_speed)
    at = _app(run, tmp_path, monkeypatch)
    at.session_state["selected_steps"] = [350, 400, 450, 500, 550, 600]
    at.switch_page("views/merge.py").run()
    at.segmented_control(key="weights_method").set_value("decay").run()
    assert not at.exception, at.exception
    charts = {c.proto.id: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    bars = next(spec for spec in charts.values() if spec["data"][0]["type"] == "bar")["data"][0]
    assert len(bars["y"]) == 6
    assert bars["y"] == pytest.approx(_one_minus_sqrt([_two_speed(s) for s in range(350, 650, 50)]))
    lr = next(spec for spec in charts.values() if any(t.get("name") == "emulated LR (merge)" for t in spec["data"]))
    assert [t["name"] for t in lr["data"]] == ["real LR", "emulated LR (merge)"]
    at.number_input(key="decay_window").set_value(300e3).run()   # 700K..1M tokens: steps 500-600
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    bars = next(spec for spec in charts if spec["data"][0]["type"] == "bar")["data"][0]
    assert bars["x"] == ["500", "550", "600"]
    assert any("window 300K tokens (asked 300K): steps 500–600, 3 checkpoints" in c.value for c in at.caption)


def test_run_page_cooldown_panel_on_the_sample_run_issue_24(sample_run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(sample_run, tmp_path, monkeypatch)
    assert any("Adam's second moments" in c.value for c in at.caption)
    table = at.dataframe[-1].value
    assert len(table) == 9 and list(table["schedule"])[:3] == ["linear", "1-sqrt", "cosine"]
    assert (table["vs newest stable"] < 0).all()


def test_the_evaluator_search_scores_decay_candidates_issue_24(tiny_run: Path, tmp_path: Path) -> None:
    """auto with --eval scores 1-sqrt and cosine decay weights like any candidate; method decay keeps them."""
    from analysis.evaluate import load_evaluator
    source = tmp_path / "ev.py"
    source.write_text("def evaluate(state):\n    return float(state['layer.bias'].float().abs().mean())\n")
    signals = assess_run(open_run(tiny_run))
    messages: list[str] = []
    recommend(signals, RecommendConfig(max_evals=60), load_evaluator(f"{source}:evaluate"),
              lambda fraction, message: messages.append(message))
    assert any(m.startswith("decay-emulating 1-sqrt of the newest") for m in messages)
    assert any(m.startswith("decay-emulating cosine of the newest") for m in messages)
    rec = recommend(signals, RecommendConfig(method="decay", schedule="cosine", window_steps=150),
                    load_evaluator(f"{source}:evaluate"))
    steps = [r.step for r in rec.checkpoints]
    assert rec.method == "decay" and steps == [450, 500, 550, 600]   # the older, smaller biases score lower
    assert rec.settings == {"schedule": "cosine", "window_steps": 150} and rec.score < rec.last_score
    assert rec.weights == pytest.approx(decay_coefficients(parse_schedule("cosine"), steps))
