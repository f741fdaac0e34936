"""Numeric health of a checkpoint, computed one tensor at a time.

A checkpoint with a NaN or Inf anywhere poisons any average it joins, so it is
checked before anything else; norms and the largest magnitude come along for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..checkpoints import open_checkpoint
from ..run import CheckpointRef
from .sketch import CheckpointSketch


@dataclass(frozen=True, slots=True)
class CheckpointHealth:
    """Health of one checkpoint's floating-point tensors."""

    finite: bool
    nonfinite_tensors: tuple[str, ...]   # names of tensors holding NaN or Inf
    n_params: int                        # elements of floating-point tensors
    n_tensors: int
    norm: float                          # global L2 norm over finite floating-point tensors
    max_abs: float
    bytes_by_dtype: tuple[tuple[str, int], ...]
    layer_norms: tuple[tuple[str, float], ...] = ()   # (layer, L2 norm over its finite values), in file order


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: the name up to its first block index ("h.3", "model.layers.0"),
    else the owning module ("transformer.wte" for "transformer.wte.weight")."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:index + 1])
    return ".".join(parts[:-1]) or name


# Health of the checkpoints checked in this process, by file identity: a followed run checks only its new
# checkpoints on each refresh (issue 23). Bounded; a rewritten file has a new identity.
_MEMO: dict[tuple, CheckpointHealth] = {}
MEMO_ENTRIES = 4096


def check_health(ref: CheckpointRef, progress: Callable[[float, str], None] | None = None) -> CheckpointHealth:
    """Stream every tensor of ``ref`` once and summarise its numeric health (memoised by file identity)."""
    key = _identity(ref)
    if key is not None and key in _MEMO:
        if progress is not None:
            progress(1.0, f"{ref.name}: checked before")
        return _MEMO[key]
    health = _check_health(ref, progress)
    if key is not None:
        if len(_MEMO) >= MEMO_ENTRIES:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = health
    return health


def _identity(ref: CheckpointRef) -> tuple | None:
    """(layout, (path, size, mtime_ns, inode) of every file): changes when any file is rewritten; None if one is gone."""
    from ..errors import AnalysisError
    from ..remote import RemotePath, file_look
    try:   # an object has no inode or ns time: its URL, size and ETag say when it changed (issue 22)
        looks = tuple(file_look(f) if isinstance(f, RemotePath) else (str(f), s.st_size, s.st_mtime_ns, s.st_ino)
                      for f in ref.files for s in [f.stat()])
    except (OSError, AnalysisError):
        return None
    return (str(ref.path), ref.layout, looks)


def _check_health(ref: CheckpointRef, progress: Callable[[float, str], None] | None = None) -> CheckpointHealth:
    """Stream every tensor of ``ref`` once and summarise its numeric health."""
    bad: list[str] = []
    n_params = 0
    square_sum = 0.0
    max_abs = 0.0
    by_dtype: dict[str, int] = {}
    layer_squares: dict[str, float] = {}
    with open_checkpoint(ref.path, ref.layout) as handle:
        infos = handle.tensors()
        for index, info in enumerate(infos):
            by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.size_bytes
            if not info.is_floating:
                continue
            tensor = handle.read(info.name).to(torch.float32)
            n_params += info.numel
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad.append(info.name)
                tensor = torch.where(finite, tensor, torch.zeros((), dtype=tensor.dtype))
            squares = float(torch.dot(tensor.reshape(-1), tensor.reshape(-1)))
            square_sum += squares
            layer = layer_of(info.name)
            layer_squares[layer] = layer_squares.get(layer, 0.0) + squares
            if tensor.numel():
                max_abs = max(max_abs, float(tensor.abs().max()))
            if progress is not None:
                progress((index + 1) / len(infos), f"{ref.name}: {info.name}")
    return CheckpointHealth(
        finite=not bad, nonfinite_tensors=tuple(bad), n_params=n_params, n_tensors=len(infos),
        norm=math.sqrt(square_sum), max_abs=max_abs, bytes_by_dtype=tuple(sorted(by_dtype.items())),
        layer_norms=tuple((layer, math.sqrt(sq)) for layer, sq in layer_squares.items()),
    )


def health_from_sketch(sketch: CheckpointSketch) -> CheckpointHealth:
    """The health of a checkpoint from the exact per-tensor statistics its sketch pass kept (issue 25).

    The same numbers as :func:`check_health` (sums in float64 rather than float32), without a read of its own:
    ``assess_run`` sketches each checkpoint once and derives health, the layer view and similarity from it.
    """
    stats = sketch.stats
    layer_squares: dict[str, float] = {}
    for name, item in stats.items():
        layer_squares[layer_of(name)] = layer_squares.get(layer_of(name), 0.0) + item.sum_squares
    return CheckpointHealth(
        finite=all(s.finite for s in stats.values()),
        nonfinite_tensors=tuple(name for name, s in stats.items() if not s.finite),
        n_params=sum(s.numel for s in stats.values()), n_tensors=sketch.n_tensors,
        norm=math.sqrt(sum(s.sum_squares for s in stats.values())),
        max_abs=max((s.max_abs for s in stats.values()), default=0.0), bytes_by_dtype=sketch.bytes_by_dtype,
        layer_norms=tuple((layer, math.sqrt(sq)) for layer, sq in layer_squares.items()),
    )
