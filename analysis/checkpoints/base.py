"""The lazy checkpoint interface every reader implements.

A handle lists tensors from headers alone and reads one tensor at a time, so that
health checks, similarity and merges hold a tensor, never a model, in memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

import numpy as np

from ..errors import MergeError

if TYPE_CHECKING:   # torch is imported only where a tensor is made (a merge of safetensors never does)
    import torch

# Dtypes whose tensors are averaged; every other tensor is copied from the newest input.
FLOATING_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
# The unsigned integer as wide as an element: how blocks carry raw bits without torch.
RAW_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


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
        return self.dtype in FLOATING_DTYPES


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


class TrainingStateAccess(Protocol):
    """Optional extension of a handle: optimizer moments and EMA weights, just as lazy.

    Optimizer tensors are named ``"{param}.{moment}"`` (``"h.0.attn.weight.exp_avg"``)
    where the parameter a moment belongs to can be recovered, else ``"param_{i}.{moment}"``.
    They are the gradient signal of the similarity analysis.
    """

    def optimizer_state(self) -> list[TensorInfo]:
        """Headers of the saved optimizer moments (empty when none was saved)."""
        ...

    def read_optimizer(self, name: str) -> torch.Tensor:
        """One optimizer tensor, by a name from :meth:`optimizer_state`."""
        ...

    def ema_tensors(self) -> list[TensorInfo]:
        """Headers of the EMA copy of the weights (empty when none was saved)."""
        ...

    def read_ema(self, name: str) -> torch.Tensor:
        """One EMA tensor, by a name from :meth:`ema_tensors`."""
        ...


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


def is_tensor(value: object) -> bool:
    """``isinstance(value, torch.Tensor)`` without importing torch: nothing is a tensor until torch is loaded."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def raw_bits(tensor: "torch.Tensor") -> np.ndarray:
    """A CPU tensor's elements as a flat numpy array of raw bits (``RAW_BITS``; no copy when contiguous).

    numpy has no bfloat16 or float8: the bits travel as unsigned integers of the same width.
    """
    import torch   # whoever holds a tensor has imported torch already

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    signed = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    return flat.view(signed).numpy().view(RAW_BITS[flat.element_size()])


def tensor_info(name: str, tensor: torch.Tensor) -> TensorInfo:
    """The header of an in-memory (or memory-mapped) tensor."""
    return TensorInfo(name, tuple(tensor.shape), dtype_name(tensor.dtype), tensor.numel() * tensor.element_size())


def optimizer_state(handle: object) -> list[TensorInfo]:
    """``handle.optimizer_state()``, or [] for layouts that never hold one."""
    method = getattr(handle, "optimizer_state", None)
    return method() if callable(method) else []


def ema_tensors(handle: object) -> list[TensorInfo]:
    """``handle.ema_tensors()``, or [] for layouts that never hold one."""
    method = getattr(handle, "ema_tensors", None)
    return method() if callable(method) else []


def main_floating_dtype(infos: Iterable[TensorInfo]) -> str | None:
    """The floating dtype holding most of a checkpoint's elements (None: no floating tensor).

    What "the checkpoint's dtype" means wherever one name must stand for it: "same" in a
    mergekit config, the weights' dtype the storage planner starts from (issue 20). Most
    elements, not the first tensor: a bf16 model may keep its norms or a buffer in fp32.
    """
    counts: dict[str, int] = {}
    for info in infos:
        if info.is_floating:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.__getitem__) if counts else None


def expected_block(path: Path, layout: Sequence[TensorInfo], index: int, filled: int, name: str, start: int,
                   block: np.ndarray) -> TensorInfo:
    """The tensor a streaming writer (safetensors or torch zip) expects this block to continue.

    Both writers take blocks strictly in layout order, each the next elements of the current tensor,
    as wide as its declared dtype (raw bits where numpy lacks the dtype): anything else is a bug in the
    caller that would write a file whose bytes do not match its header, so it is refused before a byte is written.

    Raises:
        MergeError: the block is not the next part of ``layout[index]`` (from element ``filled``).
    """
    info = layout[index] if index < len(layout) else None
    fits = info is not None and block.itemsize == DTYPE_BYTES[info.dtype] and (
        block.dtype.kind != "f" or block.dtype.name == info.dtype)
    if info is None or not fits or name != info.name or start != filled or start + block.size > info.numel:
        expected = f"{info.name!r} from element {filled} as {info.dtype}" if info else "no more tensors"
        raise MergeError(f"{path}: expected {expected}, got {name!r} from element {start} as {block.dtype}")
    return info
