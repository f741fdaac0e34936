"""The merge's plan, from the inputs' headers only: the weights, the inputs' common layout, the output's dtypes.

Nothing here reads a tensor. The files the output will have are planned by :mod:`analysis.merge.output`;
the dry run's projection (a short probe of the real inputs) is in :mod:`analysis.merge.verify`, beside the
checks that run before a merge writes anything.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..checkpoints import CheckpointHandle, TensorInfo
from ..checkpoints.base import DTYPE_BYTES
from ..errors import CheckpointMismatch, InvalidArgument
from ..recipe import OUTPUT_DTYPES


def normalize_weights(weights: Sequence[float], count: int) -> tuple[float, ...]:
    """Validate weights (finite, >= 0, one per checkpoint, positive sum) and scale them to sum to 1."""
    if len(weights) != count:
        raise InvalidArgument(f"got {len(weights)} weights for {count} checkpoints")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise InvalidArgument(f"weights must be finite and non-negative, got {list(weights)}")
    total = math.fsum(weights)
    if total <= 0:
        raise InvalidArgument("weights sum to zero")
    return tuple(w / total for w in weights)


def output_layout(infos: list[TensorInfo], output_dtype: str) -> list[TensorInfo]:
    """The output's tensor headers: floating tensors take ``output_dtype`` unless it is 'same'."""
    if output_dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {output_dtype!r}")
    layout = []
    for info in infos:
        dtype = info.dtype if (output_dtype == "same" or not info.is_floating) else output_dtype
        layout.append(TensorInfo(info.name, info.shape, dtype, info.numel * DTYPE_BYTES[dtype]))
    return layout


def check_same_layout(handles: Sequence[CheckpointHandle]) -> list[TensorInfo]:
    """The common tensor list of all inputs, or CheckpointMismatch naming every difference."""
    reference = handles[-1].tensors()
    ref_map = {i.name: i for i in reference}
    problems = []
    for handle in handles[:-1]:
        infos = {i.name: i for i in handle.tensors()}
        missing = sorted(set(ref_map) - set(infos))
        extra = sorted(set(infos) - set(ref_map))
        shapes = [f"{n}: {infos[n].shape} vs {ref_map[n].shape}" for n in sorted(set(infos) & set(ref_map))
                  if infos[n].shape != ref_map[n].shape]
        for label, items in (("missing", missing), ("extra", extra), ("shape differs", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                problems.append(f"{handle.path.name} vs {handles[-1].path.name}: {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointMismatch("checkpoints do not share tensors: " + "; ".join(problems))
    return reference
