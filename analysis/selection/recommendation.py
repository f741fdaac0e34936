"""What a recommendation is: its parameters, its verdict on each checkpoint, and the choice it assembles from.

Only dataclasses and the list of methods live here (no logic), so that every other module of the
package can name them without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluate import Evaluator
from ..run import CheckpointRef
from ..signals import CheckpointSignals

METHODS = ("auto", "sma", "ema", "wma", "soup", "recovery", "decay")


@dataclass(frozen=True, slots=True)
class RecommendConfig:
    """Parameters of a recommendation (no logic here)."""

    method: str = "auto"          # auto | sma | ema | wma | soup | recovery | decay
    window: int | None = None     # average the newest N eligible checkpoints instead of choosing
    ema_alpha: float = 0.3        # weight of the newest checkpoint under EMA
    band_sigmas: float = 2.0      # val-loss noise units that still count as "on the plateau"
    max_evals: int | None = None  # evaluator calls allowed (default 2 x checkpoints)
    output_dtype: str = "same"
    include_contaminated: bool = False  # average spike-contaminated checkpoints too (forced)
    lr_ratio_limit: float = 2.0   # checkpoints saved at more than this x the newest LR are another regime
    before_step: int | None = None  # recovery: only checkpoints saved before this step (default: the last spike)
    schedule: str = "1-sqrt"      # decay: the LR decay the weights emulate (linear | 1-sqrt | cosine | exp[:RATE])
    window_tokens: float | None = None  # average the eligible checkpoints within this many tokens of the newest
    window_steps: int | None = None     # ... or within this many steps (issue 24)


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one checkpoint."""

    step: int
    path: str
    taken: bool
    weight: float
    reason: str   # a plain sentence, shown verbatim in the UI


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Checkpoints to average with their weights, and a reason for every checkpoint."""

    method: str
    checkpoints: tuple[CheckpointRef, ...]
    weights: tuple[float, ...]               # sum to 1.0, oldest first
    decisions: tuple[Decision, ...]          # one per checkpoint of the run, in step order
    evaluations: int                         # candidates scored (those read from --eval-cache included)
    score: float | None                      # evaluator score of the recommendation (lower is better)
    last_score: float | None                 # evaluator score of the last eligible checkpoint alone
    summary: str
    iterate_noise: float | None = None       # nats of iterate noise at the newest LR (Adam state), if known
    predicted_gain: float | None = None      # nats below the last checkpoint, predicted from logs and noise
    evaluations_cached: int = 0              # of ``evaluations``, scores read from the evaluator's disk cache
    basis: str = ""                          # how the weights were chosen: evaluator | predicted | val band | window | default
    basis_note: str = ""                     # that in a sentence, with what would choose better when anything would
    stand_in_error: float | None = None      # nats of sampling error of a train-loss stand-in (a run without val)
    settings: dict[str, object] = field(default_factory=dict)  # what the recipe records besides weights: schedule, window

    @property
    def reasons(self) -> dict[str, str]:
        """str(step) -> reason, as stored in a recipe."""
        return {str(d.step): d.reason for d in self.decisions}


@dataclass(frozen=True, slots=True)
class Choice:
    """The checkpoints chosen and their weights, before the reasons are written.

    What the rules or the evaluator search settled on; ``finish`` turns it into a Recommendation.
    The evaluator fields stay at their defaults when no evaluator scored anything.
    """

    method: str                                # how the weights were made: sma, ema, wma, soup, predicted, decay
    checkpoints: tuple[CheckpointSignals, ...]  # oldest first
    weights: tuple[float, ...]
    score: float | None = None                 # evaluator score of this choice
    last_score: float | None = None            # evaluator score of the last eligible checkpoint alone
    evaluations: int = 0                       # evaluator calls the search made
    evaluations_cached: int = 0                # of those, scores read from the evaluator's disk cache
    evaluator: Evaluator | None = None         # the evaluator that scored it, if any
    schedule: str | None = None                # decay: the schedule the weights emulate
