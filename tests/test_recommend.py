"""Policy weights exactly, window choice from val losses, exclusions with reasons, evaluator search."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis.errors import InvalidArgument, NotEnoughCheckpoints
from analysis.evaluate import Evaluator
from analysis.recommend import RecommendConfig, policy_weights, recommend
from analysis.run import open_run
from analysis.signals import assess_run
from conftest import write_tiny_run


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
    signals = assess_run(open_run(write_tiny_run(tmp_path / "r", list(range(100, 2100, 100)))))
    rec = recommend(signals)
    steps = [r.step for r in rec.checkpoints]
    assert 1 < len(steps) < 20 and steps[-1] == 2000
    stop = next(d for d in rec.decisions if d.reason.startswith("Left out: the averaging window stops here"))
    assert stop.step == steps[0] - 100


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
