"""What iterate noise costs at the newest checkpoint: the loss an average of checkpoints wins back.

Late in training, Adam at learning rate η keeps every weight jittering around a slowly moving
centre. On a locally quadratic loss the jitter of one weight costs, in expectation, η·√v / 4 nats,
with v its second moment (the squared scale of its gradient noise): the curvature cancels out,
which is what makes the cost readable from the optimizer state without an evaluator. Summed over
the weights,

    V = η / 4 · Σ √v

is the loss that the jitter adds to every single checkpoint and that averaging N checkpoints with
independent jitter removes but for V / N. Logged val losses cannot show V (every checkpoint carries
it), and their scatter can be far smaller than V (0.005 nats against averaging gains of 0.03–0.07 on
the benchmark's 25M-parameter runs), which is why a val-loss band alone averages too few checkpoints
of a bigger model. Assumptions: Adam-style ``exp_avg_sq`` moments, gradient
noise larger than the mean gradient, jitter at equilibrium (checkpoints late in a run), and Adam for most of the model: when
second moments cover less than half of the checkpoint's floating-point elements (Muon or another
optimizer for the matrices, say), the rest of the jitter is unknown and no estimate is made. On the
selection benchmark's runs the estimate was 0.54–1.9× the V their test losses imply (README, "How good
the choice is").

Adam's ``exp_avg_sq`` starts at zero: after t steps it holds (1 − β2^t) of the second moment, so v is
divided by that (Adam's own bias correction) before its root is taken. t is the optimizer's step count
from its state's ``step``, else the checkpoint's step; β2 is the saved group's ``betas[1]``, else torch's
default 0.999. At step 60 with β2 = 0.999 the uncorrected sum reads 4.1× low (issue 21); after
10 / (1 − β2) steps the correction is under 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from ..checkpoints import open_checkpoint
from ..checkpoints.base import optimizer_state
from ..checkpoints.optim import ADAM_BETA2, ADAM_STEP
from ..run import CheckpointRef

SECOND_MOMENT = ".exp_avg_sq"
_CHUNK = 1 << 24   # elements summed at a time: a float64 copy of a chunk, never of a whole huge tensor
MIN_COVERAGE = 0.5  # share of the weights' elements that must have a second moment (tied weights count twice)
DEFAULT_BETA2 = 0.999   # torch.optim.Adam/AdamW's and the HF Trainer's default, when the state does not say


@dataclass(frozen=True, slots=True)
class IterateNoise:
    """Σ√v of one checkpoint's Adam second moments, from which V at any learning rate follows."""

    step: int            # the checkpoint whose optimizer state was read
    sqrt_v_sum: float    # Σ over every parameter element of √exp_avg_sq, as saved (not bias-corrected)
    elements: int        # parameter elements that have a second moment
    adam_step: int | None = None   # t of Adam's bias correction 1 − β2^t; None: no correction
    adam_step_source: str = ""     # "optimizer state" (its ``step``) or "checkpoint step"
    beta2: float = DEFAULT_BETA2   # β2 of the correction
    beta2_source: str = ""         # "optimizer state" or "default"

    @property
    def bias_correction(self) -> float:
        """1 / √(1 − β2^t), the factor Adam's bias correction puts on every √v (1.0 without a step count)."""
        if self.adam_step is None or self.adam_step < 1 or not 0.0 <= self.beta2 < 1.0:
            return 1.0
        return 1.0 / math.sqrt(1.0 - self.beta2 ** self.adam_step)

    def excess_at(self, lr: float) -> float:
        """V in nats: the loss jitter adds to a checkpoint saved at learning rate ``lr``."""
        return lr * self.sqrt_v_sum * self.bias_correction / 4.0

    def describe(self, lr: float) -> str:
        """One phrase for reasons and summaries."""
        return f"iterate noise worth {self.excess_at(lr):.4f} nats at LR {lr:.3g} ({self.source()})"

    def source(self) -> str:
        """Where V came from and the bias correction it carries, e.g. 'Adam second moments of step 60,
        bias-corrected for 60 optimizer steps (from the optimizer state) at β2 0.999: x4.10'."""
        if self.adam_step is None:
            return f"Adam second moments of step {self.step}"
        return (f"Adam second moments of step {self.step}, bias-corrected for {self.adam_step} optimizer step{'' if self.adam_step == 1 else 's'} "
                f"(from the {self.adam_step_source}) at β2 {self.beta2:g} ({self.beta2_source}): "
                f"x{self.bias_correction:.3g}")


def iterate_noise(ref: CheckpointRef, progress: Callable[[float, str], None] | None = None) -> IterateNoise | None:
    """Read ``ref``'s second moments one tensor at a time (as big as the weights in float32: ``progress`` hears each).

    None when it saved none, when they cover under MIN_COVERAGE of the weights, or when they are not finite.
    """
    with open_checkpoint(ref.path, ref.layout) as handle:
        infos = [info for info in optimizer_state(handle) if info.name.endswith(SECOND_MOMENT)]
        weights = sum(info.numel for info in handle.tensors() if info.is_floating)
        if sum(info.numel for info in infos) < MIN_COVERAGE * weights:
            return None
        total, elements = 0.0, 0
        for index, info in enumerate(infos):
            if progress is not None:
                progress(index / len(infos), f"reading Adam second moments of {ref.name}")
            flat = handle.read_optimizer(info.name).reshape(-1)
            for start in range(0, flat.numel(), _CHUNK):
                total += float(flat[start:start + _CHUNK].double().clamp_min(0.0).sqrt().sum())
            elements += flat.numel()
        meta = handle.metadata()   # after the moments: a folder's optimizer file is read by then
    if not infos or not math.isfinite(total) or total <= 0.0:
        return None
    return IterateNoise(ref.step, total, elements, *_bias_counts(meta, ref.step))


def _bias_counts(meta: dict[str, str], checkpoint_step: int) -> tuple[int | None, str, float, str]:
    """(t, its source, β2, its source) for the bias correction: the optimizer's saved ``step`` and ``betas``,
    else the checkpoint's step (None when that is 0: nothing to correct by) and torch's default β2."""
    try:
        step, step_source = int(meta[ADAM_STEP]), "optimizer state"
    except (KeyError, ValueError):
        step, step_source = (checkpoint_step if checkpoint_step >= 1 else None), "checkpoint step"
    try:
        beta2, beta2_source = float(meta[ADAM_BETA2]), "optimizer state"
    except (KeyError, ValueError):
        beta2, beta2_source = DEFAULT_BETA2, "default"
    if not 0.0 <= beta2 < 1.0:
        beta2, beta2_source = DEFAULT_BETA2, "default"
    return step, step_source, beta2, beta2_source


def newest_iterate_noise(refs: Sequence[CheckpointRef],
                         progress: Callable[[float, str], None] | None = None) -> IterateNoise | None:
    """The iterate noise of the newest of ``refs`` (in step order) that saved usable Adam second moments.

    Many runs keep the optimizer state with only some checkpoints (the newest, as nanoGPT's resume
    file; the newest few, as ``storage --full-state-last`` advises; or every few saves, with weights-only
    checkpoints in between to save space), so a newest checkpoint without one must not hide an older
    one that has it. Only checkpoints from the second half of the
    run (step at least half the newest's) are read: the estimate assumes jitter at equilibrium late
    in training, and second moments from early on measure a different gradient noise.
    """
    if not refs:
        return None
    late = refs[-1].step / 2
    for ref in reversed(refs):
        if ref.step < late:
            break
        noise = iterate_noise(ref, progress)
        if noise is not None:
            return noise
    return None
