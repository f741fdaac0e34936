"""Compute-optimal reference and the stopping signal on synthetic curves with known exponents (issue 8)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.cli import main
from analysis.run import open_run
from analysis.errors import FitError
from analysis.scaling import (CHINCHILLA_A, CHINCHILLA_B, CHINCHILLA_E, StopConfig, chinchilla_loss,
                              compute_optimal, fit_loss_curve, run_stop_signal, stop_signal)
from conftest import rewrite_metrics

CONFIGS = Path(__file__).parent / "data" / "configs"


def _curve(e: float, b: float, beta: float, x: np.ndarray, noise: float, seed: int) -> np.ndarray:
    return e + b * x ** (-beta) + np.random.default_rng(seed).normal(0.0, noise, len(x))


def test_chinchilla_reference_by_hand() -> None:
    # Chinchilla itself: 70B parameters, 1.4T tokens = 20 tokens per parameter.
    ref = compute_optimal(70e9, 1.4e12)
    assert ref.optimal_tokens == 1.4e12 and ref.over_training_factor == pytest.approx(1.0)
    assert ref.compute_flops == pytest.approx(6 * 70e9 * 1.4e12)     # ~5.9e23 FLOPs
    assert ref.chinchilla_loss == pytest.approx(1.69 + 406.4 / 70e9 ** 0.34 + 410.7 / 1.4e12 ** 0.28)
    assert ref.chinchilla_loss == pytest.approx(1.94, abs=0.01)
    assert (CHINCHILLA_E, CHINCHILLA_A, CHINCHILLA_B) == (1.69, 406.4, 410.7)
    # Llama-3-8B on 15T tokens is ~94x past compute-optimal.
    assert compute_optimal(8.03e9, 15e12).over_training_factor == pytest.approx(15e12 / (20 * 8.03e9))
    assert chinchilla_loss(1e9, 1e12) < chinchilla_loss(1e9, 1e11)
    with pytest.raises(FitError):
        compute_optimal(0)


@pytest.mark.parametrize(("beta", "seed"), [(0.28, 0), (0.5, 1), (0.35, 2), (0.7, 3)])
def test_fit_recovers_the_exponent(beta: float, seed: int) -> None:
    tokens = np.geomspace(1e8, 1e11, 200)
    loss = _curve(1.8, 20.0 * (1e8) ** beta, beta, tokens, noise=0.002, seed=seed)
    fit, samples = fit_loss_curve(tokens, loss, "tokens")
    assert fit.beta == pytest.approx(beta, rel=0.1)
    assert fit.e == pytest.approx(1.8, abs=0.05)
    assert fit.beta_stderr is not None and abs(fit.beta - beta) < 5 * fit.beta_stderr + 0.02
    assert len(samples) > 150


def test_forecasts_are_consistent_and_banded() -> None:
    steps = np.arange(10, 5001, 10, dtype=float)
    sig = stop_signal(steps, _curve(2.0, 30.0, 0.5, steps, 0.003, 4), "steps")
    now = sig.fit.loss_at(sig.fit.x_last)
    two, four = sig.forecasts
    assert four.value < two.value < now
    assert two.low <= two.value <= two.high and four.low <= four.value <= four.high
    assert two.x == 2 * sig.fit.x_last and four.x == 4 * sig.fit.x_last
    assert sig.fit.loss_at(sig.x_for_gain.value) == pytest.approx(now - 0.01, abs=1e-9)
    assert sig.x_for_gain.low <= sig.x_for_gain.value <= sig.x_for_gain.high
    assert sig.horizon_label == "10% more steps" and sig.horizon_x == pytest.approx(500.0)


def test_bootstrap_is_seeded() -> None:
    steps = np.arange(10, 2001, 10, dtype=float)
    loss = _curve(2.0, 30.0, 0.5, steps, 0.01, 5)
    a, b = stop_signal(steps, loss, config=StopConfig(seed=7)), stop_signal(steps, loss, config=StopConfig(seed=7))
    assert a.horizon_gain == b.horizon_gain and a.forecasts == b.forecasts


def test_plateau_flag_and_user_threshold() -> None:
    tokens = np.geomspace(1e10, 1e12, 150)
    # Nearly flat: beta 0.28 with a small B; the next 100B tokens buy well under 0.005.
    flat = stop_signal(tokens, _curve(2.0, 50.0, 0.28, tokens, 0.001, 6), "tokens")
    assert flat.horizon_label == "100B tokens" and flat.horizon_x == 1e11
    assert flat.plateau and flat.verdict.startswith("Plateau")
    assert flat.horizon_gain.value == pytest.approx(flat.fit.loss_at(1e12) - flat.fit.loss_at(1.1e12))
    steep = stop_signal(tokens, _curve(2.0, 5000.0, 0.28, tokens, 0.001, 6), "tokens")
    assert not steep.plateau and steep.verdict.startswith("Still improving")
    strict = stop_signal(tokens, _curve(2.0, 5000.0, 0.28, tokens, 0.001, 6), "tokens",
                         StopConfig(plateau_gain=1.0))
    assert strict.plateau


def test_gain_beyond_the_floor_is_never() -> None:
    steps = np.arange(100, 10001, 100, dtype=float)
    sig = stop_signal(steps, _curve(2.0, 0.5, 1.0, steps, 0.0005, 8), "steps", StopConfig(gain_target=0.5, bootstrap=40))
    assert sig.x_for_gain.value == float("inf")


def test_too_few_points() -> None:
    with pytest.raises(FitError, match="at least 5"):
        fit_loss_curve(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.5]))


def test_run_signal_uses_logged_tokens_and_the_cli(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    rewrite_metrics(tiny_run, lambda r: {**r, "tokens": r["step"] * 4096} if "train_loss" in r else r)
    sig = run_stop_signal(open_run(tiny_run), params=1e6)
    assert sig.metric == "val_loss" and sig.fit.x_unit == "tokens" and sig.fit.x_last == 600 * 4096
    assert sig.compute_optimal is not None and sig.compute_optimal.optimal_tokens == 2e7
    assert main(["stop", str(tiny_run), "--config", str(CONFIGS / "gpt2.json"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"fit", "forecasts", "to_gain", "plateau", "verdict", "compute_optimal"}
    assert doc["x_unit"] == "tokens" and len(doc["forecasts"]) == 2
    assert doc["compute_optimal"]["params"] == 124439808
    assert isinstance(doc["plateau"]["verdict"], bool)


def test_run_signal_falls_back_to_steps(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_stop_signal(open_run(tiny_run)).fit.x_unit == "steps"
    assert run_stop_signal(open_run(tiny_run), tokens_per_step=1000).fit.x_unit == "tokens"
    assert main(["stop", str(tiny_run), "--plateau-gain", "10"]) == 0
    assert "Plateau" in capsys.readouterr().out
