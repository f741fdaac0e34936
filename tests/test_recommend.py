"""Policy weights exactly, window choice from val losses, exclusions with reasons, evaluator search."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis.errors import InvalidArgument, NotEnoughCheckpoints
from analysis.evaluate import Evaluator
from analysis.selection import RecommendConfig, policy_weights, recommend
from analysis.run import open_run
from analysis.signals import assess_run
from conftest import rewrite_metrics, write_tiny_run


def _with_eval_noise(root: Path) -> Path:
    """The run's logged losses with seeded Gaussian scatter (val 0.01; train rows 0.2, so that a mean of a
    hundred keeps 0.02): a plateau the band can see noise on. Without it the tiny run's curve is smooth and
    still falling, where the falling-curve guard keeps the newest alone (issue 21)."""
    import random
    rng = random.Random(0)
    sigma = {"val_loss": 0.01, "train_loss": 0.2}
    rewrite_metrics(root, lambda row: {**row, **{k: row[k] + rng.gauss(0.0, sigma[k]) for k in sigma if k in row}})
    return root


def test_policy_weights_exact() -> None:
    assert policy_weights("sma", 4) == pytest.approx((0.25, 0.25, 0.25, 0.25))
    assert policy_weights("wma", 3) == pytest.approx((1 / 6, 2 / 6, 3 / 6))
    # EMA over a finite window: newest a, then a(1-a), a(1-a)^2, normalised (no zero-started accumulator).
    raw = [0.5 * 0.5 ** 2, 0.5 * 0.5, 0.5]
    assert policy_weights("ema", 3, 0.5) == pytest.approx(tuple(w / sum(raw) for w in raw))
    assert policy_weights("ema", 1, 0.2) == (1.0,)
    with pytest.raises(InvalidArgument, match="alpha"):
        policy_weights("ema", 3, 0.0)


@given(method=st.sampled_from(["sma", "wma", "ema"]), count=st.integers(1, 64), alpha=st.floats(0.01, 1.0))
def test_policy_weights_sum_to_one_and_favour_newest(method: str, count: int, alpha: float) -> None:
    weights = policy_weights(method, count, alpha)
    assert sum(weights) == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(weights, weights[1:]))


def test_recommendation_excludes_spike_and_explains_every_checkpoint(tiny_run: Path) -> None:
    signals = assess_run(open_run(tiny_run))
    rec = recommend(signals)
    taken = [r.step for r in rec.checkpoints]
    assert 300 not in taken and taken == sorted(taken) and taken[-1] == 600
    assert sum(rec.weights) == pytest.approx(1.0)
    assert [d.step for d in rec.decisions] == [s.ref.step for s in signals.checkpoints]
    spike_reason = next(d.reason for d in rec.decisions if d.step == 300)
    assert spike_reason.startswith("Left out: saved inside a train_loss spike at steps 298-")
    assert rec.evaluations == 0 and rec.score is None


def test_window_stops_where_val_loss_leaves_the_plateau(tmp_path: Path) -> None:
    # Loss decays with time constant last/4: early checkpoints are far worse than the newest.
    signals = assess_run(open_run(_with_eval_noise(write_tiny_run(tmp_path / "r", list(range(100, 2100, 100))))))
    rec = recommend(signals)
    steps = [r.step for r in rec.checkpoints]
    assert 1 < len(steps) < 20 and steps[-1] == 2000
    stop = next(d for d in rec.decisions if d.reason.startswith("Left out: the averaging window stops here"))
    assert stop.step == steps[0] - 100


@pytest.mark.parametrize("val_logged", [True, False])
def test_the_plateau_band_works_on_whichever_loss_the_run_logs(tmp_path: Path, val_logged: bool) -> None:
    # The newest checkpoint has no eval of its own (evals every 200 from step 100 stop before it): the band's
    # sentences take the loss's name from the checkpoints that have one; without any eval the train loss stands in.
    root = _with_eval_noise(write_tiny_run(tmp_path / "r", list(range(100, 2100, 100))))
    rewrite_metrics(root, lambda row: row if "val_loss" not in row or (val_logged and row["step"] % 200 == 100
                                                                       and row["step"] < 1900) else None)
    signals = assess_run(open_run(root))
    assert signals.checkpoints[-1].val is None if val_logged else signals.checkpoints[-1].val.source == "train"
    rec = recommend(signals)
    kind = "val loss" if val_logged else "train loss"
    stop = next(d for d in rec.decisions if d.reason.startswith("Left out: the averaging window stops here"))
    assert f": {kind} " in stop.reason and "above the newest level" in stop.reason
    assert f"their logged {kind}es lie within noise" in rec.summary


def test_fixed_window_and_forced_contaminated(tiny_run: Path) -> None:
    signals = assess_run(open_run(tiny_run))
    rec = recommend(signals, RecommendConfig(window=4, method="wma"))
    assert [r.step for r in rec.checkpoints] == [450, 500, 550, 600]
    assert rec.weights == pytest.approx(policy_weights("wma", 4))
    forced = recommend(signals, RecommendConfig(window=7, include_contaminated=True))
    assert 300 in [r.step for r in forced.checkpoints]


def _distance_evaluator(target_step: float) -> Evaluator:
    """Scores a state dict by how far its bias drifted from the tiny run's value at ``target_step``."""
    def score(state) -> float:
        return float(abs(state["layer.bias"].float().mean() - (0.01 * target_step)))
    return Evaluator(score, "distance")


def test_evaluator_search_picks_the_best_average_within_budget(tiny_run: Path) -> None:
    signals = assess_run(open_run(tiny_run))
    evaluator = _distance_evaluator(target_step=525)  # best: average centred on 525
    rec = recommend(signals, RecommendConfig(max_evals=20), evaluator)
    assert rec.score is not None and rec.last_score is not None and rec.score < rec.last_score
    assert rec.evaluations <= 20 and rec.evaluations == evaluator.calls


def test_last_checkpoint_alone_when_no_average_beats_it(tiny_run: Path) -> None:
    signals = assess_run(open_run(tiny_run))
    rec = recommend(signals, RecommendConfig(), _distance_evaluator(target_step=700))
    assert [r.step for r in rec.checkpoints] == [600] and rec.weights == (1.0,)
    assert rec.summary.startswith("Keep the last checkpoint (step 600) alone")


def test_soup_needs_an_evaluator_and_no_eligible_is_an_error(tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(InvalidArgument, match="soup"):
        recommend(assess_run(open_run(tiny_run)), RecommendConfig(method="soup"))
    run = open_run(write_tiny_run(tmp_path / "nan", [10], nan_step=10))
    with pytest.raises(NotEnoughCheckpoints, match="no checkpoint may be averaged"):
        recommend(assess_run(run))


def test_recovery_restarts_from_before_the_newest_spike(tiny_run: Path) -> None:
    signals = assess_run(open_run(tiny_run))
    onset = next(s for s in signals.spikes if s.metric == "train_loss").onset_after_step
    rec = recommend(signals, RecommendConfig(method="recovery"))
    taken = [r.step for r in rec.checkpoints]
    assert rec.method == "recovery" and taken and max(taken) <= onset and taken[-1] == 250
    assert rec.weights == pytest.approx(policy_weights("sma", len(taken)))
    # Before the spike the smooth curve still falls far more per checkpoint than its noise: the newest alone (issue 21).
    assert taken == [250] and rec.summary.startswith(f"Recovery from before step {onset + 1}: Keep the last checkpoint")
    assert "still falls" in rec.summary
    after = [d for d in rec.decisions if d.step > onset]
    assert [d.step for d in after] == list(range(300, 650, 50))
    assert all(not d.taken and "a recovery restarts from weights saved before step" in d.reason for d in after)


def test_recovery_before_a_given_step_and_with_an_evaluator(tiny_run: Path) -> None:
    signals = assess_run(open_run(tiny_run))
    rec = recommend(signals, RecommendConfig(method="recovery", before_step=450, window=3))
    # The newest three eligible before 450: 300 is inside the spike, so it is skipped.
    assert [r.step for r in rec.checkpoints] == [250, 350, 400]
    left = next(d for d in rec.decisions if d.step == 450)
    assert left.reason.startswith("Left out: at or after step 450")
    scored = recommend(signals, RecommendConfig(method="recovery", before_step=450), _distance_evaluator(375))
    assert all(r.step < 450 for r in scored.checkpoints) and scored.method == "recovery"
    assert scored.score is not None and scored.score <= scored.last_score


def test_recovery_without_a_spike_or_step_says_what_to_pass(tmp_path: Path) -> None:
    signals = assess_run(open_run(write_tiny_run(tmp_path / "r", [100, 200, 300])))
    with pytest.raises(InvalidArgument, match="--before STEP"):
        recommend(signals, RecommendConfig(method="recovery"))
    with pytest.raises(NotEnoughCheckpoints, match="before step 50"):
        recommend(signals, RecommendConfig(method="recovery", before_step=50))


def test_window_never_crosses_an_lr_decay(tmp_path: Path) -> None:
    # Warmup-stable-decay: the LR falls 50x over the last 150 steps; the 600 checkpoint is annealed.
    run = write_tiny_run(tmp_path / "wsd", list(range(50, 650, 50)))

    def decay(row: dict) -> dict:
        if "lr" in row and row["step"] > 450:
            row["lr"] = 1e-3 * (1 - 0.98 * (row["step"] - 450) / 150)
        return row

    rewrite_metrics(run, decay)
    rec = recommend(assess_run(open_run(run)))
    assert [r.step for r in rec.checkpoints] == [600] and rec.weights == (1.0,)
    assert rec.summary.startswith("Keep the last checkpoint (step 600) alone")
    stop = next(d for d in rec.decisions if d.step == 550)
    assert "x the newest checkpoint's" in stop.reason and "LR decay" in stop.reason


def test_a_checkpoint_whose_own_eval_spiked_is_left_out_alone(tmp_path: Path) -> None:
    run = write_tiny_run(tmp_path / "v", list(range(50, 1050, 50)))
    rewrite_metrics(run, lambda r: {**r, "val_loss": r["val_loss"] + 0.8} if r.get("step") == 800 and "val_loss" in r else r)
    signals = assess_run(open_run(run))
    hit = [c.ref.step for c in signals.checkpoints if c.spike is not None]
    assert hit == [800] and signals.at(800).spike.metric == "val_loss"
    reason = next(d.reason for d in recommend(signals).decisions if d.step == 800)
    assert reason.startswith("Left out: saved inside a val_loss spike at steps 800-800")
    assert [e.metric for e in signals.loss_spikes] == ["val_loss"] and signals.grad_norm_spikes == ()


def test_the_loss_chart_shades_and_names_every_contaminating_spike(tmp_path: Path) -> None:
    """Val-loss spikes exclude checkpoints, so the chart draws them as loss spikes, not as faint grad-norm bands."""
    from app.charts import loss_figure

    run = write_tiny_run(tmp_path / "v", list(range(50, 1050, 50)), spike_steps=(298,))
    rewrite_metrics(run, lambda r: {**r, "val_loss": r["val_loss"] + 0.8} if r.get("step") == 800 and "val_loss" in r else r)
    signals = assess_run(open_run(run))
    fig = loss_figure(open_run(run), signals, set())
    names = sorted(a.text for a in fig.layout.annotations)
    assert names == sorted(f"loss spike {s.start_step}-{s.end_step}" for s in signals.loss_spikes)
    assert any(n.startswith("loss spike 800-") for n in names) and len(fig.layout.shapes) == len(signals.spikes)


def _hard_batch_at(run: Path, step: int, val_add: float | None) -> None:
    """Train loss +0.5 at ``step`` alone (one hard batch); its logged val loss raised by ``val_add``, or dropped."""
    def edit(row: dict) -> dict | None:
        if row.get("step") != step:
            return row
        if "train_loss" in row:
            return {**row, "train_loss": row["train_loss"] + 0.5}
        return None if val_add is None else {**row, "val_loss": row["val_loss"] + val_add}
    rewrite_metrics(run, edit)


def test_a_hard_batch_at_a_checkpoint_is_cleared_by_the_checkpoints_own_val_loss(tmp_path: Path) -> None:
    # The train loss of step 1000 measures its batch; the val loss logged at step 1000 measures the weights.
    from analysis.report import analysis_report

    run = write_tiny_run(tmp_path / "b", list(range(50, 1050, 50)))
    _hard_batch_at(run, 1000, 0.0)
    signals = assess_run(open_run(run))
    event, = signals.loss_spikes
    assert (event.metric, event.start_step, event.recovered) == ("train_loss", 1000, False)
    newest = signals.at(1000)
    assert newest.spike is None and newest.eligible and newest.cleared.event == event
    assert newest.cleared.before_step == 950 and newest.cleared.before_val == signals.at(950).val.value
    assert newest.cleared.val == newest.val.value < newest.cleared.before_val
    reason = next(d.reason for d in recommend(signals).decisions if d.step == 1000)
    assert reason.startswith("Taken with weight") and reason.endswith(
        f"but its val loss {newest.val.value:.4f} (logged at this step) is not above "
        f"{signals.at(950).val.value:.4f} at step 950 before the spike: its weights did not carry it.")
    doc = analysis_report(open_run(run), signals)["checkpoints"][-1]
    assert not doc["spike_contaminated"] and doc["spike_cleared"]["before_step"] == 950
    assert doc["spike_cleared"]["event"]["start_step"] == 1000


@pytest.mark.parametrize("val_add", [0.03, None], ids=["val-above-the-checkpoint-before", "no-val-at-its-step"])
def test_a_hard_batch_contaminates_when_the_checkpoints_own_val_loss_cannot_clear_it(tmp_path: Path,
                                                                                     val_add: float | None) -> None:
    run = write_tiny_run(tmp_path / "b", list(range(50, 1050, 50)))
    _hard_batch_at(run, 1000, val_add)
    newest = assess_run(open_run(run)).at(1000)
    assert newest.spike is not None and newest.spike.metric == "train_loss" and newest.cleared is None
    assert not newest.eligible
