"""What averaging inputs must be, checked before any file is opened: the weights, each checkpoint once, the dtype.

Both the recipe (:mod:`analysis.recipe`, which describes a merge) and the merge (:mod:`analysis.merge`,
which runs one) apply these rules, so they live below both: neither imports the other for them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .errors import InvalidArgument

# Output dtypes a merge writes ("same": each tensor keeps the newest input's dtype).
OUTPUT_DTYPES = ("same", "float32", "bfloat16", "float16")
# File formats a merge writes: safetensors (the default; an HF folder when the input is one), a plain
# torch.save dict of tensors (model.pt) or a Lightning {"state_dict": ...} (model.ckpt) (issue 21).
OUTPUT_FORMATS = ("safetensors", "torch", "lightning")


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
    if not isinstance(path, Path):
        return str(path)   # a URL (RemotePath, issue 22): its full URL
    try:
        stat = path.stat()
    except OSError:
        return Path(path).resolve()
    return (stat.st_dev, stat.st_ino)
