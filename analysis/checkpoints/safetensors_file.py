"""Single-file safetensors checkpoints, memory-mapped and read one tensor at a time."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointReadError
from .base import DTYPE_BYTES, TensorInfo
from .keys import KeyMap
from .location import TensorLocation

if TYPE_CHECKING:
    import torch

# safetensors' dtype codes -> torch dtype names.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# A header larger than this is not a checkpoint header (safetensors itself caps at 100 MB).
MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse and validate a safetensors header without touching tensor data.

    Returns:
        (tensor entries by name, ``__metadata__``, byte offset where data starts)

    Raises:
        CheckpointReadError: truncated file, malformed JSON, offsets past the end of
            the file, overlapping or gapped tensors, or a size that disagrees with
            shape x dtype. Checked here so the message names the problem precisely.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointReadError(path, f"file is {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointReadError(path, f"header length {header_len} exceeds the file ({size} bytes): truncated or not safetensors")
            header = json.loads(handle.read(header_len))
    except OSError as e:
        raise CheckpointReadError(path, e.strerror or str(e)) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointReadError(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointReadError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    _validate_entries(path, header, size - data_start)
    return header, {str(k): str(v) for k, v in metadata.items()}, data_start


def _validate_entries(path: Path, entries: dict[str, dict], data_bytes: int) -> None:
    """Offsets must tile the data region exactly and agree with shape x dtype."""
    spans = []
    for name, entry in entries.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            start, end = (int(x) for x in entry["data_offsets"])
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise CheckpointReadError(path, f"tensor {name!r} has a malformed header entry: {entry!r}") from None
        if end > data_bytes:
            raise CheckpointReadError(path, f"tensor {name!r} ends at byte {end} but the data is only {data_bytes} bytes: file truncated")
        if end - start != numel * DTYPE_BYTES[dtype]:
            raise CheckpointReadError(path, f"tensor {name!r}: {end - start} bytes stored but shape {entry['shape']} x {dtype} needs {numel * DTYPE_BYTES[dtype]}")
        spans.append((start, end, name))
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            problem = "overlaps the previous tensor" if start < position else "leaves a gap before it"
            raise CheckpointReadError(path, f"tensor {name!r} {problem} (offset {start}, expected {position})")
        position = end


class SafetensorsHandle:
    """An open ``.safetensors`` file; tensors are memory-mapped, read one at a time."""

    def __init__(self, path: Path, normalize: bool = True) -> None:
        self.path = path
        entries, self._metadata, data_start = read_header(path)
        # Absolute byte offsets by stored name: the merge reads these ranges with preadv.
        self._offsets = {name: (data_start + int(e["data_offsets"][0]), SAFETENSORS_DTYPES[e["dtype"]])
                         for name, e in entries.items()}
        ordered = sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0])
        self.keys = KeyMap(name for name, _ in ordered) if normalize else KeyMap(())
        self._infos = [
            TensorInfo(self.keys.normalize(name), tuple(int(d) for d in e["shape"]), SAFETENSORS_DTYPES[e["dtype"]],
                       int(e["data_offsets"][1]) - int(e["data_offsets"][0]))
            for name, e in ordered
        ]
        self._file = None   # mapped on the first read: listing needs the header only

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def original_name(self, name: str) -> str:
        return self.keys.original(name)

    def locate(self, name: str) -> TensorLocation:
        """Where ``name``'s raw bytes are (a ``TensorLocation``), for block-wise reads without a memory map."""
        offset, dtype = self._offsets[self.keys.original(name)]
        return TensorLocation(self.path, offset, dtype)

    def read(self, name: str) -> "torch.Tensor":
        try:
            if self._file is None:
                self._file = safe_open(str(self.path), framework="pt", device="cpu")
            return self._file.get_tensor(self.keys.original(name))
        except (SafetensorError, OSError) as e:
            raise CheckpointReadError(self.path, f"tensor {name!r}: {e}") from e

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def close(self) -> None:
        self._file = None

    def __enter__(self) -> "SafetensorsHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFileReader:
    """A single ``*.safetensors`` file holding a whole state dict."""

    name = "safetensors"
    description = "single safetensors file (memory-mapped, one tensor at a time)"

    def matches(self, path: Path) -> bool:
        # A shard listed by an index beside it belongs to the sharded checkpoint, not on its own.
        if not (path.is_file() and path.suffix == ".safetensors"):
            return False
        return not ("-of-" in path.name and any(path.parent.glob("*.safetensors.index.json")))

    def files(self, path: Path) -> list[Path]:
        return [path]

    def open(self, path: Path) -> SafetensorsHandle:
        return SafetensorsHandle(path)
