"""Optimizer moments (Adam ``exp_avg``/``exp_avg_sq``...) keyed by parameter name.

A torch optimizer state dict keys its state by parameter *index*; the names are
not saved unless the optimizer was built from ``named_parameters()`` (torch >= 2.6
then stores ``param_names`` in each group). Otherwise the mapping is rebuilt from
the orders trainers actually use, and accepted only if every moment's shape equals
its parameter's shape; when no order fits, names stay ``param_{i}``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

from .base import TensorInfo, is_tensor

if TYPE_CHECKING:
    import torch

_NO_DECAY_WORDS = ("bias", "norm", "ln_", "ln.", "layernorm", "embed_positions")


def _split_orders(params: Sequence[TensorInfo]) -> list[list[TensorInfo]]:
    """Candidate parameter orders: as saved, then "decayed group first" splits (nanoGPT, HF Trainer)."""
    def split(pred: Callable[[TensorInfo], bool]) -> list[TensorInfo]:
        return [p for p in params if pred(p)] + [p for p in params if not pred(p)]

    return [
        list(params),
        split(lambda p: len(p.shape) >= 2),                                    # nanoGPT configure_optimizers
        split(lambda p: not any(w in p.name.lower() for w in _NO_DECAY_WORDS)),  # HF get_decay_parameter_names
    ]


def _group_names(groups: list[dict]) -> list[str] | None:
    """Names saved by an optimizer built from ``named_parameters()``, in index order."""
    names: list[str] = []
    for group in groups:
        group_names = group.get("param_names")
        if not isinstance(group_names, (list, tuple)) or len(group_names) != len(group.get("params", [])):
            return None
        names.extend(str(n) for n in group_names)
    return names


def moments_by_name(optimizer: dict, params: Sequence[TensorInfo]) -> dict[str, torch.Tensor]:
    """Flatten an optimizer state dict into ``{"{param}.{moment}": tensor}``.

    Args:
        optimizer: a ``torch.optim.Optimizer.state_dict()`` (``state`` + ``param_groups``).
        params: the model's floating-point tensors in saved order (candidates for the mapping).

    Returns:
        Every tensor-valued, non-scalar entry of the per-parameter state (scalar ``step`` counters are left out).
    """
    state = optimizer.get("state") if isinstance(optimizer, dict) else None
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not isinstance(state, dict) or not isinstance(groups, list):
        return {}
    indices = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
    names = _group_names(groups) or _recover_names(state, indices, params)
    label = dict(zip(indices, names)) if names else {}
    out: dict[str, torch.Tensor] = {}
    for index, entry in state.items():
        if not isinstance(entry, dict):
            continue
        base = label.get(index, index if isinstance(index, str) else f"param_{index}")
        for moment, value in entry.items():
            if is_tensor(value) and value.dim() > 0:
                out[f"{base}.{moment}"] = value
    return out


def _recover_names(state: dict, indices: list, params: Sequence[TensorInfo]) -> list[str] | None:
    """The first candidate order whose shapes agree with every saved moment, or None."""
    if len(indices) != len(params):
        return None
    for order in _split_orders(params):
        if all(_shape_fits(state.get(index), info) for index, info in zip(indices, order)):
            return [info.name for info in order]
    return None


def _shape_fits(entry: object, info: TensorInfo) -> bool:
    """A parameter without state (never stepped) fits anything; otherwise moments must match its shape."""
    if not isinstance(entry, dict):
        return True
    shapes = [tuple(v.shape) for v in entry.values() if is_tensor(v) and v.dim() > 0]
    return all(shape == info.shape for shape in shapes)


SAVED_LR = "optimizer.lr"   # metadata key of the learning rate a checkpoint's optimizer state was at


def saved_learning_rate(optimizer: object) -> float | None:
    """The learning rate an optimizer state dict was saved at: its first parameter group's ``lr``.

    Trainers set each group's ``lr`` from the schedule before (nanoGPT) or after (HF, Lightning) the step, so
    a checkpoint that kept its optimizer knows its LR even when the logs never printed it (nanoGPT's stdout,
    a Lightning CSV without a LearningRateMonitor). Where groups differ (an LR multiplier per group), the
    first is the one trainers log as "the" LR. None when no group holds a finite positive ``lr``.
    """
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    for group in groups if isinstance(groups, list) else ():
        if isinstance(group, dict) and group.get("params"):
            return as_learning_rate(group.get("lr"))
    return None


ADAM_STEP = "optimizer.adam_step"   # metadata key: the optimizer's own step count (its state's ``step``)
ADAM_BETA2 = "optimizer.beta2"      # metadata key: the first group's second-moment decay ``betas[1]``


def saved_adam_counters(optimizer: object) -> dict[str, str]:
    """``{ADAM_STEP, ADAM_BETA2}`` of an Adam-style state dict, as strings, where it holds them.

    Adam's ``exp_avg_sq`` starts at zero and is a (1 − β2^t)-weighted average after t steps; reading it
    as the gradient's second moment needs t, the optimizer's count (torch keeps it per parameter as
    ``step``), which can differ from the trainer's step (gradient accumulation, a resumed run, skipped
    fp16 steps).
    """
    out: dict[str, str] = {}
    state = optimizer.get("state") if isinstance(optimizer, dict) else None
    entries = [e for e in state.values() if isinstance(e, dict)] if isinstance(state, dict) else []
    steps = [_as_number(e.get("step")) for e in entries]
    steps = [s for s in steps if s is not None and s >= 1]
    if steps:
        out[ADAM_STEP] = str(int(max(steps)))
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    for group in groups if isinstance(groups, list) else ():
        betas = group.get("betas") if isinstance(group, dict) else None
        if isinstance(betas, (list, tuple)) and len(betas) == 2 and _as_number(betas[1]) is not None:
            if 0.0 <= float(_as_number(betas[1])) < 1.0:
                out[ADAM_BETA2] = repr(float(_as_number(betas[1])))
            break
    return out


def _as_number(value: object) -> float | None:
    """A finite int/float or one-element tensor as a float, else None."""
    if is_tensor(value) and value.numel() == 1:   # type: ignore[union-attr]
        value = value.item()   # type: ignore[union-attr]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def metadata_learning_rate(metadata: dict[str, str]) -> float | None:
    """The :data:`SAVED_LR` of a handle's metadata as a number; None when absent or not a finite positive
    number (safetensors metadata is free text anyone can write)."""
    try:
        return as_learning_rate(float(metadata[SAVED_LR]))
    except (KeyError, ValueError):
        return None


def as_learning_rate(value: object) -> float | None:
    """``value`` (a number or a one-element tensor) as a float if it is finite and positive, else None."""
    if is_tensor(value) and value.numel() == 1:   # type: ignore[union-attr]
        value = value.item()   # type: ignore[union-attr]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None
