"""A streaming safetensors writer: the header first, then each tensor as it is ready.

``safetensors.torch.save_file`` needs the whole state dict in memory; a merge must
hold one tensor at a time. Every tensor's shape and dtype is known from the input
headers before any data is read, so the header (with all offsets) can be written
first and the data appended in order. The output is a standard safetensors file.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from ..errors import MergeError
from .base import DTYPE_BYTES, TensorInfo, expected_block, raw_bits
from .safetensors_file import TORCH_TO_SAFETENSORS

if TYPE_CHECKING:
    import torch

# Bytes written between two requests to start writing them to disk (see _start_writeback).
WRITEBACK_BYTES = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        function.restype = ctypes.c_int
        return function
    except (OSError, AttributeError):
        return None


_sync_file_range = _load_sync_file_range()


def _check_header(path: Path, layout: list[TensorInfo], metadata: dict[str, str] | None) -> None:
    """Refuse a header the format's reader would refuse, before a byte is written (issue 19).

    The readers validate every input as strictly as ``safetensors.safe_open``, so this is the
    last line of defence: a tensor of negative or non-integer dimensions, an unknown dtype or
    non-string metadata would otherwise be written into a file nothing can open.
    """
    for info in layout:
        shape_ok = all(type(d) is int and 0 <= d < 1 << 63 for d in info.shape)   # torch's int64 dimensions
        if not shape_ok or info.dtype not in TORCH_TO_SAFETENSORS or not _encodable(info.name):
            raise MergeError(f"{path}: cannot write tensor {info.name!r} with shape {list(info.shape)} and dtype "
                             f"{info.dtype}: not valid in a safetensors file")
    bad = [k for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str)
                                                         and _encodable(k) and _encodable(v))]
    if bad:
        raise MergeError(f"{path}: metadata {bad[0]!r} is not a string key and value; safetensors holds only strings")


def _encodable(text: object) -> bool:
    """A str that UTF-8 can carry (no lone surrogates)."""
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SafetensorsWriter:
    """Write tensors in the order declared by ``layout``; ``close`` checks completeness."""

    def __init__(self, path: Path, layout: list[TensorInfo], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self._layout = layout
        self._next = 0
        self._filled = 0   # elements of tensor ``_next`` written so far by write_block
        _check_header(path, layout, metadata)
        header: dict[str, object] = {"__metadata__": dict(metadata or {})} if metadata else {}
        offset = 0
        for info in layout:
            size = info.numel * DTYPE_BYTES[info.dtype]
            header[info.name] = {
                "dtype": TORCH_TO_SAFETENSORS[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.header_bytes = 8 + len(raw)
        self._handle: BinaryIO | None = path.open("wb")
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)
        self._written = 0          # data bytes written
        self._flushed = 0          # file bytes handed to the kernel's writeback

    @property
    def remaining(self) -> int:
        """Declared tensors not yet completely written."""
        return len(self._layout) - self._next

    @property
    def total_bytes(self) -> int:
        """Size of the finished file."""
        return self.header_bytes + self.data_bytes

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        """Append the next tensor; it must match the declared name, shape and dtype."""
        info = self._layout[self._next] if self._next < len(self._layout) else None
        got = str(tensor.dtype).removeprefix("torch.")
        if info is None or name != info.name or tuple(tensor.shape) != info.shape or got != info.dtype:
            raise MergeError(
                f"{self.path}: expected tensor {info.name if info else None!r} {info.shape if info else ()} "
                f"{info.dtype if info else ''}, got {name!r} {tuple(tensor.shape)} {got}"
            )
        self.write_block(name, 0, raw_bits(tensor))

    def write_block(self, name: str, start: int, block: np.ndarray) -> None:
        """Append elements ``[start, start + len(block))`` of the current tensor (blocks come in order).

        ``block`` is a flat numpy array whose items are as wide as the declared dtype: the
        dtype itself where numpy has it, else raw bits (bfloat16 as uint16). A merge writes
        each block as it is averaged, so no whole output tensor is ever held.
        """
        info = expected_block(self.path, self._layout, self._next, self._filled, name, start, block)
        assert self._handle is not None, "write after close"
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        self._handle.write(memoryview(data))
        self._written += data.nbytes
        if self._written - self._flushed >= WRITEBACK_BYTES:
            self._start_writeback()
        self._filled += block.size
        if self._filled == info.numel:
            self._next, self._filled = self._next + 1, 0

    def _start_writeback(self) -> None:
        """Ask the kernel to start writing what is written so far to disk, without waiting for it.

        The final fsync then waits only for the tail instead of the whole file: the disk
        writes overlap the averaging. Only a hint: where it is unavailable nothing changes.
        """
        assert self._handle is not None
        self._handle.flush()
        end = self.header_bytes + self._written
        if _sync_file_range is not None:
            _sync_file_range(self._handle.fileno(), self._flushed, end - self._flushed, _SYNC_FILE_RANGE_WRITE)
        self._flushed = end

    def close(self) -> None:
        """Flush to disk; raise if some declared tensors were never written."""
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        if self._next != len(self._layout):
            missing = [info.name for info in self._layout[self._next:]][:5]
            raise MergeError(f"{self.path}: {len(self._layout) - self._next} tensors never written (first: {missing})")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._handle is not None:
            self._handle.close()
            self._handle = None
