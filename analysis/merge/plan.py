"""Weighted averaging of checkpoints, one tensor at a time.

Both the merge (which writes each averaged tensor to disk) and the evaluator search
(which builds candidate averages in memory) go through :func:`iter_average`, so what
is evaluated is exactly what would be written: float32 accumulation in input order,
rounded once to the output dtype; non-floating tensors copied from the newest input.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
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


def normalize_weights(weights: Sequence[float], count: int, labels: Sequence[str] | None = None) -> tuple[float, ...]:
    """Validate weights (numbers, finite, >= 0, one per checkpoint, positive sum) and scale them to sum to 1.

    Args:
        weights: one per checkpoint, oldest first.
        count: how many checkpoints there are.
        labels: what to call each checkpoint in a message (its path); positions when None.

    Raises:
        InvalidArgument: naming each bad weight and its checkpoint (NaN, inf, negative, a string or a
            bool: ``float("0.5")`` or ``True`` would pass silently, and NaN would poison every tensor).
    """
    if len(weights) != count:
        raise InvalidArgument(f"got {len(weights)} weights for {count} checkpoints")
    names = list(labels) if labels is not None else [f"checkpoint {i + 1}" for i in range(count)]
    bad = [f"{w!r} for {name}" for w, name in zip(weights, names)
           if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0]
    if bad:
        raise InvalidArgument(f"weights must be finite non-negative numbers, got {', '.join(bad)}")
    total = math.fsum(weights)
    if total <= 0:
        raise InvalidArgument("weights sum to zero")
    return tuple(float(w) / total for w in weights)


def duplicate_inputs(paths: Sequence[tuple[int, Path]], label: str) -> list[str]:
    """One problem per input that names a checkpoint already named (the same file, by any path).

    A checkpoint listed twice would silently count twice; a larger weight says so openly.
    ``paths`` are (position, path) pairs; ``label`` names the list in the message ("checkpoints").
    """
    problems: list[str] = []
    seen: dict[object, int] = {}
    for index, path in paths:
        key = _file_identity(path)
        if key in seen:
            problems.append(f"{label}[{index}] ({path}): the same checkpoint as {label}[{seen[key]}]; "
                            "list each checkpoint once and give it a larger weight instead")
        else:
            seen[key] = index
    return problems


def check_distinct(paths: Sequence[Path], label: str = "checkpoints") -> None:
    """Raise InvalidArgument naming every checkpoint given more than once."""
    problems = duplicate_inputs(list(enumerate(paths)), label)
    if problems:
        raise InvalidArgument("; ".join(problems))


def _file_identity(path: Path) -> object:
    """What makes two paths the same checkpoint: device and inode where it exists, else the resolved path."""
    try:
        stat = path.stat()
    except OSError:
        return Path(path).resolve()
    return (stat.st_dev, stat.st_ino)


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
    """The common tensor list of all inputs, or CheckpointMismatch naming every difference
    (missing or extra tensors, shapes, and dtypes unless both are floating)."""
    reference = handles[-1].tensors()
    ref_map = {i.name: i for i in reference}
    problems = []
    for handle in handles[:-1]:
        infos = {i.name: i for i in handle.tensors()}
        missing = sorted(set(ref_map) - set(infos))
        extra = sorted(set(infos) - set(ref_map))
        shared = sorted(set(infos) & set(ref_map))
        shapes = [f"{n}: {infos[n].shape} vs {ref_map[n].shape}" for n in shared if infos[n].shape != ref_map[n].shape]
        # Floating dtypes may differ (each is widened to float32); an integer or bool tensor beside
        # another dtype would be averaged as a float or copied from one side without a word (issue 19).
        dtypes = [f"{n}: {infos[n].dtype} vs {ref_map[n].dtype}" for n in shared if infos[n].dtype != ref_map[n].dtype
                  and not (infos[n].is_floating and ref_map[n].is_floating)]
        for label, items in (("missing", missing), ("extra", extra), ("shape differs", shapes),
                             ("dtype differs", dtypes)):
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
