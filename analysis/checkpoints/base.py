"""The lazy checkpoint interface every reader implements.

A handle lists tensors from headers alone and reads one tensor at a time, so that
health checks, similarity and merges hold a tensor, never a model, in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor's header: known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str         # torch dtype name without the prefix: "float32", "bfloat16", "int64"
    size_bytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def is_floating(self) -> bool:
        """True for floating-point tensors, the only ones that are averaged."""
        return getattr(torch, self.dtype).is_floating_point


class CheckpointHandle(Protocol):
    """An open checkpoint. Use as a context manager; ``close`` releases maps and files."""

    path: Path

    def tensors(self) -> list[TensorInfo]:
        """Every tensor's header, in the file's order."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """One tensor, on the CPU, in its stored dtype."""
        ...

    def metadata(self) -> dict[str, str]:
        """Training metadata the checkpoint carries (``step``, ``tokens``...), as strings."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...

    def __enter__(self) -> "CheckpointHandle": ...

    def __exit__(self, *exc: object) -> None: ...


class CheckpointReader(Protocol):
    """One checkpoint layout. ``name`` is the stable id used in the README and the UI."""

    name: str
    description: str

    def matches(self, path: Path) -> bool:
        """True if ``path`` (a file or a folder) is a checkpoint of this layout. Cheap."""
        ...

    def files(self, path: Path) -> list[Path]:
        """The files that make up the checkpoint at ``path`` (hashed for recipes)."""
        ...

    def open(self, path: Path) -> CheckpointHandle:
        """Open lazily; raise CheckpointReadError naming the file and the problem."""
        ...


DTYPE_BYTES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
    "uint16": 2, "uint32": 4, "uint64": 8,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
