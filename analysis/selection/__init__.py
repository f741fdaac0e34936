"""Which checkpoints to average, with what weights, and why — for every checkpoint.

Without an evaluator the averaging window comes from the logs and the optimizer state. When the
newest checkpoint saved Adam's second moments, the loss its weight jitter costs (V, see
``signals.noise``) is known, and the weights are those whose average has the lowest predicted
loss: the older checkpoints' logged val losses say what their lag costs, V what averaging wins
back. Without optimizer state, the newest eligible checkpoints whose val loss lies within noise of
the newest level form the plateau worth averaging; older, clearly worse ones would pull the
average back. With an evaluator, candidate averages (the predicted weights first, then windows,
EMAs and a greedy soup) are scored and the best is kept — and the last checkpoint alone wins
whenever no average beats it, so averaging never makes the user's model worse than what they have.

The package holds one job per module: ``recommendation`` the dataclasses (RecommendConfig,
Recommendation, Decision, and Choice, what a rule or the search settled on); ``weights`` the weight
policies (sma, ema, wma, and the predicted weights' exact optimum); ``eligibility`` which
checkpoints may be averaged and the window rules (LR regime, val band, predicted window, recovery
cutoff); ``search`` the evaluator search; ``explain`` the reasons, summary and basis sentences; and
``decay`` the decay-emulating (WSM) coefficients and ``span`` windows in tokens or steps (issue 24);
``cooldown`` what a cooldown would give, per schedule and window; ``recommender`` the entry ``recommend(signals, config, evaluator, progress)`` that runs them in that
order. Imports go one way, from ``recommender`` down to ``recommendation``, so there is no cycle.
"""

from .cooldown import CooldownReport, CooldownRow, cooldown_report
from .decay import SCHEDULES, DecaySelection, Schedule, decay_coefficients, decay_selection, emulated_lr, parse_schedule
from .explain import stand_in_sampling_error
from .recommendation import METHODS, Choice, Decision, Recommendation, RecommendConfig
from .recommender import recommend
from .weights import optimal_weights, policy_weights

__all__ = [
    "SCHEDULES",
    "CooldownReport",
    "CooldownRow",
    "Schedule",
    "DecaySelection",
    "cooldown_report",
    "decay_selection",
    "decay_coefficients",
    "emulated_lr",
    "parse_schedule",
    "METHODS",
    "Choice",
    "Decision",
    "RecommendConfig",
    "Recommendation",
    "optimal_weights",
    "policy_weights",
    "recommend",
    "stand_in_sampling_error",
]
