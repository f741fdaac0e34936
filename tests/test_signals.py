"""Spikes on synthetic curves with known answers, health, validation lookup, smoothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.run import open_run
from analysis.signals import assess_run, debiased_ema, detect_spikes, logged_val_scores
from analysis.signals.validation import train_interval_scores
from conftest import rewrite_metrics, write_tiny_run


def _noisy_decay(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1)
    return steps, 3.0 * np.exp(-steps / 150) + 1.5 + rng.normal(0, 0.02, n)


def test_clean_curve_has_no_spikes() -> None:
    steps, loss = _noisy_decay()
    assert detect_spikes(steps, loss) == ()


def test_spike_start_peak_and_recovery() -> None:
    steps, loss = _noisy_decay()
    loss[399:404] += np.array([0.8, 1.5, 1.0, 0.5, 0.2])  # steps 400..404
    (spike,) = detect_spikes(steps, loss)
    assert (spike.start_step, spike.peak_step) == (400, 401)
    assert spike.onset_after_step == 399
    assert 403 <= spike.end_step <= 410 and spike.recovered
    assert spike.ratio == pytest.approx(loss[400] / spike.baseline)
    assert spike.contains(402) and not spike.contains(399)


def test_unrecovered_spike_runs_to_the_end() -> None:
    steps, loss = _noisy_decay()
    loss[550:] += 3.0
    (spike,) = detect_spikes(steps, loss)
    assert spike.start_step == 551 and spike.end_step == 600 and not spike.recovered


def test_nan_loss_is_a_spike() -> None:
    steps, loss = _noisy_decay()
    loss[300] = math.nan
    (spike,) = detect_spikes(steps, loss)
    assert spike.start_step == 301


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(min_value=1e-3, max_value=1e3))
def test_spike_flags_do_not_change_when_loss_is_scaled(scale: float) -> None:
    steps, loss = _noisy_decay(seed=3)
    loss[250:253] += 1.0
    base = [(s.start_step, s.end_step) for s in detect_spikes(steps, loss)]
    scaled = [(s.start_step, s.end_step) for s in detect_spikes(steps, loss * scale)]
    assert scaled == base


def test_assess_run_marks_contaminated_and_nonfinite(tmp_path: Path) -> None:
    run = open_run(write_tiny_run(tmp_path / "r", list(range(50, 650, 50)), spike_steps=(298,), nan_step=500))
    signals = assess_run(run)
    by_step = {s.ref.step: s for s in signals.checkpoints}
    assert by_step[300].spike is not None and by_step[300].spike.start_step == 298
    assert not by_step[500].health.finite and by_step[500].health.nonfinite_tensors == ("layer.bias",)
    assert [s.ref.step for s in signals.checkpoints if s.eligible] == [50, 100, 150, 200, 250, 350, 400, 450, 550, 600]
    assert by_step[100].health.n_params == 36 and by_step[100].val.source == "logged"


def test_val_scores_use_nearest_eval_within_half_spacing() -> None:
    # Evals at 50, 95 and 500: 95-500 is far wider than the eval cadence (225), so nothing is interpolated
    # there; 100 takes the eval 5 steps away, and 200-400 have none within half the spacing (50).
    val = pd.DataFrame({"step": [50, 95, 500], "value": [2.5, 2.0, 1.0]})
    scores = logged_val_scores(val, [100, 200, 300, 400])
    assert [(s.value, s.source_step, s.source) if s else None for s in scores] == [
        (2.0, 95, "logged-nearest"), None, None, None]
    assert scores[0].describe() == "val loss 2.0000, nearest eval at step 95"


def test_a_checkpoint_between_two_evals_gets_their_interpolation() -> None:
    # Eval every 1000, save every 500: the checkpoints between evals get the trend at their step.
    val = pd.DataFrame({"step": [1000, 2000, 3000, 6000, 7000], "value": [2.0, 1.6, 1.5, 1.2, 1.1]})
    scores = logged_val_scores(val, [1000, 1500, 2000, 2500, 3000, 4500, 6500, 7000, 7500])
    got = [(round(s.value, 12), s.source, s.between) if s else None for s in scores]
    assert got == [(2.0, "logged", None), (1.8, "interpolated", (1000, 2000)), (1.6, "logged", None),
                   (1.55, "interpolated", (2000, 3000)), (1.5, "logged", None),
                   None,                                       # 3000-6000 is no eval cadence: evals are missing
                   (1.15, "interpolated", (6000, 7000)), (1.1, "logged", None),
                   None]                                       # past the last eval by a whole spacing
    assert scores[3].source_step == 2000 and scores[6].source_step == 6000
    assert scores[1].describe() == "val loss 1.8000, interpolated between the evals at steps 1000 and 2000"


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=30, unique=True),
       st.lists(st.integers(1, 10_000), min_size=1, max_size=20, unique=True))
def test_val_scores_stay_within_the_evals_they_come_from(eval_steps: list[int], ckpt_steps: list[int]) -> None:
    values = [math.sin(s) + 2.0 for s in eval_steps]
    val = pd.DataFrame({"step": eval_steps, "value": values})
    by_step = dict(zip(eval_steps, values))
    for step, score in zip(sorted(ckpt_steps), logged_val_scores(val, sorted(ckpt_steps))):
        if score is None:
            continue
        if score.source == "interpolated":
            lo, hi = score.between
            assert lo < step < hi and score.source_step in (lo, hi)
            assert min(by_step[lo], by_step[hi]) - 1e-12 <= score.value <= max(by_step[lo], by_step[hi]) + 1e-12
        else:
            assert score.value == by_step[score.source_step]
            assert (score.source == "logged") == (score.source_step == step)


def test_debiased_ema_matches_tensorboard() -> None:
    out = debiased_ema(np.array([1.0, 2.0, np.nan, 3.0]), 0.5)
    # last: 0.5 -> 1.25 -> (nan passes) -> 2.125; debias 1-0.5^n
    assert out[0] == pytest.approx(1.0)
    assert out[1] == pytest.approx(1.25 / 0.75)
    assert math.isnan(out[2])
    assert out[3] == pytest.approx(2.125 / 0.875)
    assert np.array_equal(debiased_ema(np.array([2.0, 2.0]), 0.9), [2.0, 2.0])


def test_grad_norm_doubling_for_a_step_is_routine_but_a_large_jump_is_an_event(tmp_path: Path) -> None:
    """Grad norm blips of 2x (routine under Adam with clipping) make no event; a 4x jump makes one."""
    import json

    from analysis.signals.assessment import find_spikes

    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, 1001):
        grad = 1.0 + 0.05 * rng.standard_normal()
        if step in (200, 400, 600):
            grad *= 2.0
        if step == 800:
            grad *= 4.0
        rows.append({"step": step, "train_loss": 2.0 + 0.01 * rng.standard_normal(), "grad_norm": grad})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    events = find_spikes(open_run(tmp_path))
    assert [(e.metric, e.start_step) for e in events] == [("grad_norm", 800)]


def _reference_minmax(y: np.ndarray, max_points: int) -> np.ndarray:
    """The per-bucket loop the vectorised minmax_indices replaced (kept as the specification)."""
    n = len(y)
    if n <= max_points or max_points < 8:
        return np.arange(n)
    edges = np.linspace(0, n, max_points // 4 + 1, dtype=np.int64)
    keep = []
    for start, end in zip(edges[:-1], edges[1:]):
        segment = y[start:end]
        finite = np.isfinite(segment)
        picks = [start, end - 1]
        if finite.any():
            masked = np.where(finite, segment, np.nan)
            picks += [start + int(np.nanargmin(masked)), start + int(np.nanargmax(masked))]
        picks += list(start + np.flatnonzero(~finite)[:2])
        keep.append(np.unique(picks))
    return np.unique(np.concatenate(keep))


@pytest.mark.parametrize("n", [10, 4001, 12_345, 200_000])
def test_minmax_indices_match_the_per_bucket_definition(n: int) -> None:
    from analysis.signals import minmax_decimate, minmax_indices

    rng = np.random.default_rng(n)
    y = np.round(rng.standard_normal(n), 1)            # many ties: the first extreme is kept
    y[rng.integers(0, n, n // 40 + 1)] = np.nan
    y[rng.integers(0, n, 3)] = np.inf
    y[: n // 5] = np.nan                               # whole buckets without a finite value
    for max_points in (7, 8, 100, 4000):
        assert np.array_equal(minmax_indices(y, max_points), _reference_minmax(y, max_points))
    x, kept = minmax_decimate(np.arange(n), y, 100)
    assert np.array_equal(kept, y[x], equal_nan=True)


def test_without_any_val_loss_each_checkpoint_gets_its_intervals_mean_train_loss() -> None:
    # Train loss logged every 50 steps (as a window mean, like the HF Trainer's), checkpoints every 100;
    # nothing logged in 400-600 (a gap is not bridged), a NaN row is dropped.
    train = pd.DataFrame({"step": [50, 100, 150, 200, 250, 300, 350, 400, 650, 700],
                          "value": [3.0, 2.0, 1.8, 1.6, float("nan"), 1.5, 1.4, 1.2, 1.1, 0.9]})
    scores = train_interval_scores(train, [100, 200, 300, 400, 500, 600, 700])
    got = [(round(s.value, 12), s.source, s.between, s.source_step) if s else None for s in scores]
    assert got == [(2.5, "train", (0, 100), 100),   # the first interval is as long as the median one
                   (1.7, "train", (100, 200), 200), (1.5, "train", (200, 300), 300), (1.3, "train", (300, 400), 400),
                   None, None, (1.0, "train", (600, 700), 700)]
    assert scores[1].kind == "train loss" and scores[1].describe() == (
        "train loss 1.7000, the mean of those logged over steps 101-200: the run logs no val loss")
    # A spike's rows (after 120, up to 150) do not count; an interval left with none gets None.
    skipped = train_interval_scores(train, [100, 200, 300], skip=[(120, 150), (250, 300)])
    assert [round(s.value, 12) if s else None for s in skipped] == [2.5, 1.6, None]


def test_a_train_loss_stand_in_carries_the_sampling_error_of_its_mean() -> None:
    # 2,500 rows per interval of independent batch noise (sd 0.05) on a slow descent: the error of each mean
    # is about 0.05 / 50, whatever the descent; an interval of two rows has none.
    rng = np.random.default_rng(0)
    steps = np.arange(1, 7501)
    train = pd.DataFrame({"step": steps, "value": 2.0 - 2e-5 * steps + rng.normal(0.0, 0.05, len(steps))})
    scores = train_interval_scores(train, [2500, 5000, 7500])
    assert [s.stderr for s in scores] == pytest.approx([0.001] * 3, rel=0.1)
    assert train_interval_scores(train.iloc[:4], [2, 4])[1].stderr is None


@given(st.lists(st.tuples(st.integers(1, 5_000), st.floats(0.1, 10.0)), min_size=1, max_size=60),
       st.lists(st.integers(1, 5_000), min_size=1, max_size=20, unique=True),
       st.lists(st.tuples(st.integers(0, 5_000), st.integers(0, 300)), max_size=3))
def test_train_interval_scores_are_means_of_the_rows_inside(rows: list[tuple[int, float]], ckpt_steps: list[int],
                                                            spikes: list[tuple[int, int]]) -> None:
    train = pd.DataFrame({"step": [s for s, _ in rows], "value": [v for _, v in rows]})
    skip = [(lo, lo + length) for lo, length in spikes]
    kept = [(s, v) for s, v in rows if not any(lo < s <= hi for lo, hi in skip)]
    for step, score in zip(sorted(ckpt_steps), train_interval_scores(train, sorted(ckpt_steps), skip)):
        inside = [v for s, v in kept if score is not None and score.between[0] < s <= score.between[1]]
        if score is None:
            continue
        assert score.between[1] == step and inside
        assert score.value == pytest.approx(sum(inside) / len(inside), rel=1e-12)


def test_a_run_without_val_losses_is_assessed_on_its_train_loss_and_one_with_them_is_not(tmp_path: Path) -> None:
    with_val = assess_run(open_run(write_tiny_run(tmp_path / "val", [100, 200, 300])))
    assert {c.val.source for c in with_val.checkpoints} == {"logged"}
    root = write_tiny_run(tmp_path / "train", [100, 200, 300])
    rewrite_metrics(root, lambda row: None if "val_loss" in row else row)
    signals = assess_run(open_run(root))
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    for c in signals.checkpoints:
        inside = [r["train_loss"] for r in rows if c.ref.step - 100 < r["step"] <= c.ref.step and "train_loss" in r]
        assert c.val.source == "train" and c.val.value == pytest.approx(sum(inside) / len(inside), rel=1e-12)
