"""Where a tensor's raw bytes sit in a file: what a layout with raw locations (safetensors) reports.

Here, beside the readers that report locations, so both the readers and the merge's block
reader (:mod:`analysis.merge.read`) import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TensorLocation:
    """Where a tensor's raw little-endian bytes sit in a file (safetensors layouts)."""

    path: Path
    offset: int     # bytes from the start of the file
    dtype: str


def locate(handle: object, name: str) -> TensorLocation | None:
    """The raw location of ``name`` if the handle's layout has one (safetensors), else None."""
    method = getattr(handle, "locate", None)
    return method(name) if callable(method) else None
