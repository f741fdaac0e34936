"""Compute-optimal reference and stopping signals: is the run still paying for itself?

Two views. The published one: Chinchilla's compute-optimal token count (about 20
tokens per parameter) and parametric loss fit, which place a run relative to the
models of Hoffmann et al. (2022). The run's own: a power law fit to its validation
loss against tokens (or steps), forecast forward with a seeded bootstrap band, which
says how much more loss the next stretch of training should buy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import FitError

if TYPE_CHECKING:
    from .run import Run

# Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models", arXiv:2203.15556,
# section 3.3 (approach 3) and equation (10): L(N, D) = E + A / N^alpha + B / D^beta,
# fit on MassiveText; losses are nats per token of *their* data, so compare shapes, not levels.
CHINCHILLA_E = 1.69
CHINCHILLA_A = 406.4
CHINCHILLA_B = 410.7
CHINCHILLA_ALPHA = 0.34
CHINCHILLA_BETA = 0.28
# Compute-optimal tokens per parameter (Hoffmann et al. 2022, table 3: ~20 for every size).
TOKENS_PER_PARAM = 20.0
# Training FLOPs per parameter per token (forward + backward), C ~= 6 N D (Kaplan et al. 2020).
FLOPS_PER_PARAM_TOKEN = 6.0
# Default plateau threshold: less than this loss (nats) gained over the next horizon.
DEFAULT_PLATEAU_GAIN = 0.005
DEFAULT_GAIN_TARGET = 0.01



@dataclass(frozen=True, slots=True)
class ComputeOptimal:
    """Where a model of ``params`` parameters trained on ``tokens`` sits against Chinchilla."""

    params: float
    tokens: float | None               # tokens seen (None when the run logs only steps)
    optimal_tokens: float              # 20 x params
    compute_flops: float | None        # 6 x params x tokens
    over_training_factor: float | None  # tokens / optimal_tokens (>1: past compute-optimal)
    chinchilla_loss: float | None      # L(N, D) at the tokens seen (reference only)
    optimal_loss: float                # L(N, 20 N)


@dataclass(frozen=True, slots=True)
class StopConfig:
    """Parameters of the stopping signal (no logic here)."""

    plateau_gain: float = DEFAULT_PLATEAU_GAIN     # loss (nats) the next horizon must buy, else: plateau
    gain_target: float = DEFAULT_GAIN_TARGET     # report the tokens/steps needed to gain this much more
    horizon_tokens: float = 1e11       # horizon of a run that has seen at least this many tokens
    horizon_fraction: float = 0.1      # otherwise: this share more tokens/steps
    skip_fraction: float = 0.1         # points before this share of the x range (warmup) are left out
    bootstrap: int = 200               # residual-bootstrap refits for the band
    band: float = 0.9                  # central probability of the band
    seed: int = 0
    max_points: int = 400              # longer curves are binned (median per bin) first


@dataclass(frozen=True, slots=True)
class CurveFit:
    """L(x) = e + b * x^(-beta), fit to a run's loss against x (tokens or steps)."""

    x_unit: str                 # "tokens" | "steps"
    e: float                    # irreducible loss of this run's curve
    b: float
    beta: float
    e_stderr: float | None      # from curve_fit's covariance (None when it is undefined)
    b_stderr: float | None
    beta_stderr: float | None
    residual_std: float
    points: int
    x_first: float
    x_last: float

    def loss_at(self, x: float) -> float:
        """The fit's loss at ``x``."""
        return self.e + self.b * x ** (-self.beta)


@dataclass(frozen=True, slots=True)
class Forecast:
    """A forecast value with its bootstrap band."""

    x: float
    value: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class StopSignal:
    """The fit, its forecasts and the plateau verdict."""

    metric: str                          # val_loss | train_loss
    fit: CurveFit
    forecasts: tuple[Forecast, ...]      # loss at 2x and 4x the x seen
    gain_target: float
    x_for_gain: Forecast                 # x (total) at which the loss is gain_target lower; inf: never
    horizon_x: float                     # the stretch the plateau test looks ahead
    horizon_label: str                   # e.g. "100B tokens", "10% more steps"
    horizon_gain: Forecast               # loss gained over the horizon
    threshold: float
    plateau: bool
    verdict: str                         # one sentence, shown verbatim
    compute_optimal: ComputeOptimal | None


def chinchilla_loss(params: float, tokens: float) -> float:
    """Hoffmann et al. (2022) approach-3 loss L(N, D) = E + A/N^0.34 + B/D^0.28."""
    return CHINCHILLA_E + CHINCHILLA_A / params ** CHINCHILLA_ALPHA + CHINCHILLA_B / tokens ** CHINCHILLA_BETA


def compute_optimal(params: float, tokens: float | None = None) -> ComputeOptimal:
    """The compute-optimal reference for a model size, and the run's place against it.

    Args:
        params: parameter count N.
        tokens: tokens seen D, if known.

    Returns:
        A :class:`ComputeOptimal` (20 N tokens, 6 N D FLOPs, D / 20 N, the approach-3 losses).

    Raises:
        FitError: non-positive params or tokens.
    """
    if params <= 0 or (tokens is not None and tokens <= 0):
        raise FitError("params and tokens must be positive")
    optimal = TOKENS_PER_PARAM * params
    return ComputeOptimal(
        params=params, tokens=tokens, optimal_tokens=optimal,
        compute_flops=FLOPS_PER_PARAM_TOKEN * params * tokens if tokens else None,
        over_training_factor=tokens / optimal if tokens else None,
        chinchilla_loss=chinchilla_loss(params, tokens) if tokens else None,
        optimal_loss=chinchilla_loss(params, optimal),
    )


def _model(u: np.ndarray, e: float, b: float, beta: float) -> np.ndarray:
    return e + b * u ** (-beta)


def _fit_scaled(u: np.ndarray, y: np.ndarray, p0: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit on u = x / x_last (so b is the reducible loss left at the end); returns params, covariance."""
    if p0 is None:
        e0 = max(float(np.min(y)) - 0.5 * float(np.ptp(y)) - 1e-3, 0.0)
        p0 = (e0, max(float(y[-1]) - e0, 1e-3), 0.3)
    upper_e = float(np.min(y))
    p0 = (min(max(p0[0], 0.0), upper_e * 0.999), max(p0[1], 1e-9), min(max(p0[2], 1e-3), 4.9))
    # Imported here: scipy takes 0.4 s to import and every CLI command (merge included) imports this module.
    from scipy.optimize import OptimizeWarning, curve_fit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        return curve_fit(_model, u, y, p0=p0, bounds=([0.0, 0.0, 1e-4], [upper_e, np.inf, 5.0]), maxfev=5000)


def fit_loss_curve(x: np.ndarray, loss: np.ndarray, x_unit: str = "steps",
                   config: StopConfig = StopConfig()) -> tuple[CurveFit, np.ndarray]:
    """Fit L(x) = e + b x^-beta and bootstrap its residuals.

    Args:
        x: tokens or steps, increasing, positive.
        loss: loss at each x.
        x_unit: "tokens" or "steps".
        config: bootstrap size, seed, point budget.

    Returns:
        The fit, and an array (bootstrap, 3) of refit (e, b_scaled, beta) in x/x_last units.

    Raises:
        FitError: fewer than 5 usable points, or the optimiser fails.
    """
    x, y = _clean(np.asarray(x, dtype=float), np.asarray(loss, dtype=float), config)
    u = x / x[-1]
    try:
        params, cov = _fit_scaled(u, y)
    except (RuntimeError, ValueError) as e:
        raise FitError(f"the power law L = E + B x^-beta does not fit this curve ({e})") from e
    resid = y - _model(u, *params)
    samples = _bootstrap(u, y, params, resid, config)
    err = np.sqrt(np.diag(cov)) if np.all(np.isfinite(cov)) else np.full(3, np.nan)
    e, b_scaled, beta = (float(v) for v in params)
    b = float(b_scaled * x[-1] ** beta)   # back to raw x units
    b_err = float(err[1]) * x[-1] ** beta
    fit = CurveFit(x_unit, e, b, beta, _finite(err[0]), _finite(b_err), _finite(err[2]),
                   float(np.std(resid)), len(x), float(x[0]), float(x[-1]))
    return fit, samples


def _clean(x: np.ndarray, y: np.ndarray, config: StopConfig) -> tuple[np.ndarray, np.ndarray]:
    """Finite, positive, sorted points past the warmup, binned to at most ``max_points``."""
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if len(x):
        past_warmup = x > config.skip_fraction * x[-1]
        x, y = x[past_warmup], y[past_warmup]
    if len(x) > config.max_points:
        bins = np.array_split(np.arange(len(x)), config.max_points)
        x = np.array([np.median(x[i]) for i in bins])
        y = np.array([np.median(y[i]) for i in bins])
    if len(x) < 5:
        raise FitError(f"need at least 5 loss points past the first {config.skip_fraction:.0%} of the run, got {len(x)}")
    return x, y


def _bootstrap(u: np.ndarray, y: np.ndarray, params: np.ndarray, resid: np.ndarray, config: StopConfig) -> np.ndarray:
    """Refit on the fit plus resampled residuals (seeded): the spread of plausible curves."""
    rng = np.random.default_rng(config.seed)
    fitted = _model(u, *params)
    out = []
    for _ in range(config.bootstrap):
        try:
            p, _ = _fit_scaled(u, fitted + rng.choice(resid, size=len(resid), replace=True), tuple(params))
        except (RuntimeError, ValueError):
            continue
        out.append(p)
    return np.array(out).reshape(-1, 3) if out else params.reshape(1, 3)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def stop_signal(x: np.ndarray, loss: np.ndarray, x_unit: str = "steps", config: StopConfig = StopConfig(),
                params: float | None = None, metric: str = "val_loss") -> StopSignal:
    """Forecast a loss curve forward and say whether more training still pays.

    The plateau test looks one horizon ahead: 100B tokens for a run that has seen at
    least that many (``horizon_tokens``), else 10% more tokens or steps (``horizon_fraction``),
    so small runs are not judged by an extrapolation many times their length.

    Args:
        x: tokens or steps seen at each loss.
        loss: the loss (validation, preferably).
        x_unit: "tokens" or "steps".
        config: thresholds, horizon, bootstrap.
        params: parameter count, for the compute-optimal reference.
        metric: name of the loss, reported back.

    Returns:
        A :class:`StopSignal`.

    Raises:
        FitError: the curve cannot be fit.
    """
    fit, samples = fit_loss_curve(x, loss, x_unit, config)
    end = fit.x_last

    def band(values: np.ndarray, point: float, at: float) -> Forecast:
        q = (1 - config.band) / 2
        lo, hi = np.quantile(values, [q, 1 - q], method="nearest")
        return Forecast(at, float(point), float(lo), float(hi))

    def loss_at(factor: float) -> np.ndarray:
        return samples[:, 0] + samples[:, 1] * factor ** (-samples[:, 2])

    forecasts = tuple(band(loss_at(f), fit.loss_at(f * end), f * end) for f in (2.0, 4.0))
    point_params = np.array([[fit.e, fit.b * end ** -fit.beta, fit.beta]])
    x_needed = float(_x_for_gain(point_params, config.gain_target)[0] * end)
    needed = band(_x_for_gain(samples, config.gain_target) * end, x_needed, x_needed)
    horizon, label = _horizon(fit, config)
    factor = (end + horizon) / end
    gain = band(loss_at(1.0) - loss_at(factor), fit.loss_at(end) - fit.loss_at(end + horizon), end + horizon)
    plateau = gain.value < config.plateau_gain
    verdict = (f"{'Plateau' if plateau else 'Still improving'}: the fit forecasts {gain.value:.4f} lower "
               f"{metric} over the next {label} ({config.band:.0%} band {gain.low:.4f} to {gain.high:.4f}), "
               f"{'under' if plateau else 'over'} the {config.plateau_gain:g} threshold.")
    tokens = end if x_unit == "tokens" else None
    reference = compute_optimal(params, tokens) if params else None
    return StopSignal(metric, fit, forecasts, config.gain_target, needed, horizon, label, gain,
                      config.plateau_gain, plateau, verdict, reference)


def _x_for_gain(samples: np.ndarray, gain: float) -> np.ndarray:
    """Per fit, the x (in units of x_last) where the loss is ``gain`` below its value at x_last; inf if never."""
    e, b, beta = samples[:, 0], samples[:, 1], samples[:, 2]
    target = e + b - gain            # loss at u = 1 is e + b
    # A gain the fit reaches only absurdly far out overflows to inf, which is what "never" means here.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        u = np.where(target > e, ((target - e) / b) ** (-1.0 / beta), np.inf)
    return u


def _horizon(fit: CurveFit, config: StopConfig) -> tuple[float, str]:
    if fit.x_unit == "tokens" and fit.x_last >= config.horizon_tokens:
        return config.horizon_tokens, f"{config.horizon_tokens / 1e9:g}B tokens"
    return config.horizon_fraction * fit.x_last, f"{config.horizon_fraction:.0%} more {fit.x_unit}"


def run_stop_signal(run: Run, config: StopConfig = StopConfig(), params: float | None = None,
                    tokens_per_step: float | None = None) -> StopSignal:
    """The stopping signal of an open run: its validation loss against tokens (or steps).

    Uses ``val_loss`` when the run logs at least 5 values, else ``train_loss``. Tokens come
    from the logged ``tokens`` metric (interpolated to the loss steps), else from
    ``tokens_per_step``, else the curve is fit against steps.

    Args:
        run: an open run.
        config: thresholds, horizon, bootstrap.
        params: parameter count, for the compute-optimal reference.
        tokens_per_step: tokens per step, when the run logs no token count.

    Returns:
        A :class:`StopSignal`.

    Raises:
        FitError: no loss curve, or one that cannot be fit.
    """
    metric = "val_loss" if len(run.metric("val_loss")) >= 5 else "train_loss"
    curve = run.metric(metric)
    if curve.empty:
        raise FitError(f"{run.path}: no val_loss or train_loss logged, nothing to fit")
    steps = curve["step"].to_numpy(dtype=float)
    tokens = run.metric("tokens")
    if len(tokens) >= 2:
        x = np.interp(steps, tokens["step"].to_numpy(dtype=float), tokens["value"].to_numpy(dtype=float))
        unit = "tokens"
    elif tokens_per_step:
        x, unit = steps * tokens_per_step, "tokens"
    else:
        x, unit = steps, "steps"
    return stop_signal(x, curve["value"].to_numpy(dtype=float), unit, config, params, metric)
