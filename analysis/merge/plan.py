"""Weighted averaging of checkpoints, one tensor at a time.

Both the merge (which writes each averaged tensor to disk) and the evaluator search
(which builds candidate averages in memory) go through :func:`iter_average`, so what
is evaluated is exactly what would be written: float32 accumulation in input order,
rounded once to the output dtype; non-floating tensors copied from the newest input.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from ..checkpoints import CheckpointHandle, TensorInfo, open_checkpoint
from ..checkpoints.base import DTYPE_BYTES
from ..checkpoints.keys import original_name
from ..errors import CheckpointMismatch, InvalidArgument
from ..recipe import OUTPUT_DTYPES
from ..run import CheckpointRef
from .arithmetic import stream_average

if TYPE_CHECKING:
    import torch


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


def iter_average(handles: Sequence[CheckpointHandle], weights: Sequence[float], layout: list[TensorInfo],
                 progress: Callable[[float, str], None] | None = None) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield ``(name, averaged tensor)`` in ``layout`` order; the newest input is ``handles[-1]``.

    Whole tensors assembled from :func:`analysis.streaming.stream_average`'s blocks, so the
    evaluator sees exactly the arithmetic the merge writes (see that module for the formula).
    """
    import torch

    from .torch_adder import as_tensor

    current: torch.Tensor | None = None
    for info, start, block in stream_average(handles, weights, layout, progress):
        if not info.is_floating:
            yield info.name, as_tensor(block, info.dtype).reshape(info.shape)
            continue
        if start == 0:
            current = torch.empty(info.numel, dtype=getattr(torch, info.dtype))
        assert current is not None, "blocks arrive in order, starting at 0"
        current[start:start + block.size] = as_tensor(block, info.dtype)
        if start + block.size == info.numel:
            yield info.name, current.reshape(info.shape)
            current = None


def average_state_dict(refs: Sequence[CheckpointRef], weights: Sequence[float],
                       output_dtype: str = "same") -> dict[str, "torch.Tensor"]:
    """The weighted average as an in-memory state dict (for evaluators; one model in memory).

    Keyed by the newest checkpoint's own names, as the evaluator protocol promises: a Hugging Face
    model with tied embeddings saves every key under ``model.``, which the readers strip to compare
    checkpoints, and ``load_state_dict`` of the user's model needs it back.
    """
    weights = normalize_weights(weights, len(refs))
    with ExitStack() as stack:
        handles = [stack.enter_context(open_checkpoint(r.path, r.layout)) for r in refs]
        layout = output_layout(check_same_layout(handles), output_dtype)
        return {original_name(handles[-1], name): tensor for name, tensor in iter_average(handles, weights, layout)}
