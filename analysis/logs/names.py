"""Canonical metric names, so every reader speaks the same vocabulary.

Trainers name the same quantity many ways (``loss``, ``train/loss``, ``lm loss``,
``trl``); signals and the UI only know the canonical names below. Names that are not
aliases of one of them keep their own (lower-cased) name, e.g. ``hellaswag``.
"""

from __future__ import annotations

import re

CANONICAL_ALIASES: dict[str, tuple[str, ...]] = {
    "train_loss": (
        "train_loss", "loss", "train/loss", "lm loss", "lm_loss", "trl", "train_loss_step",
        "reduced_train_loss", "training_loss", "train/lm_loss", "loss/train", "loss_metrics/global_avg_loss",
    ),
    "val_loss": (
        "val_loss", "eval_loss", "valid_loss", "validation_loss", "val/loss", "valid/loss",
        "eval/loss", "validation/loss", "tel", "loss/val", "loss/valid", "lm loss validation",
    ),
    "lr": ("lr", "learning_rate", "train/learning_rate", "train/lr", "lr/adamw", "lr-adamw", "learning rate"),
    "grad_norm": ("grad_norm", "gnorm", "norm", "grad norm", "train/grad_norm", "grad_norm/total"),
    "step_time_ms": ("step_time_ms", "dt_ms", "time_ms", "iter_time_ms", "step_ms", "elapsed time per iteration (ms)"),
    "tokens": (
        "tokens", "num_input_tokens_seen", "consumed_tokens", "tokens_seen", "tokens_total",
        "train/num_input_tokens_seen", "consumed tokens",
    ),
}

# Keys that hold the optimizer step of a record, most specific first.
STEP_KEYS: tuple[str, ...] = (
    "step", "global_step", "_step", "iter", "iteration", "current_steps", "num_updates", "trainer/global_step",
    "global_step/max_steps", "iter_num",
)

# Keys that hold a wall-clock time stamp in unix seconds.
WALL_TIME_KEYS: tuple[str, ...] = ("wall_time", "_timestamp", "timestamp", "time")

_ALIAS_TO_CANONICAL = {alias: canon for canon, aliases in CANONICAL_ALIASES.items() for alias in aliases}


# Per-optimizer learning rates as Lightning's LearningRateMonitor and others log them:
# ``lr-AdamW``, ``lr/AdamW``, ``lr-SGD`` (one optimizer, one group).
_OPTIMIZER_LR = re.compile(r"^lr[-/][a-z][a-z0-9_]*$")


def canonical_metric(name: str) -> str:
    """The canonical name of a metric key (``'train/loss'`` -> ``'train_loss'``, ``'lr-SGD'`` -> ``'lr'``)."""
    key = name.strip().lower()
    if key in _ALIAS_TO_CANONICAL:
        return _ALIAS_TO_CANONICAL[key]
    return "lr" if _OPTIMIZER_LR.match(key) else key


def find_step_key(keys: list[str] | tuple[str, ...]) -> str | None:
    """The key among ``keys`` that holds the step, or None."""
    lowered = {k.strip().lower(): k for k in keys}
    for candidate in STEP_KEYS:
        if candidate in lowered:
            return lowered[candidate]
    return None


def find_wall_time_key(keys: list[str] | tuple[str, ...]) -> str | None:
    """The key among ``keys`` that holds a unix time stamp, or None."""
    lowered = {k.strip().lower(): k for k in keys}
    for candidate in WALL_TIME_KEYS:
        if candidate in lowered:
            return lowered[candidate]
    return None
