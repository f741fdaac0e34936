"""Single-file safetensors checkpoints, memory-mapped and read one tensor at a time."""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointReadError
from ..remote import RemotePath
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


# A header length or offset is a u64 in the format: JSON numbers past it are refused by its reader.
_U64_LIMIT = 1 << 64
# torch, which reads the tensors, holds each dimension in an int64.
_DIM_LIMIT = 1 << 63
# The fields of a tensor's entry, in the order of the format's (serde) struct: an entry may be a JSON list of them.
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse and validate a safetensors header without touching tensor data.

    As strict as the format's own reader (``safetensors.safe_open``): whatever it refuses is
    refused here, so a file CkptSelect accepts is one every other tool opens (issue 19).

    Returns:
        (tensor entries by name, with ``dtype``/``shape``/``data_offsets`` as validated ``str``
        and ``int`` values, ``__metadata__``, byte offset where data starts)

    Raises:
        CheckpointReadError: truncated file, a header length past the file, malformed JSON or
            field types, negative or non-integer dimensions or offsets, an unknown dtype, a size
            that disagrees with shape x dtype, overlapping or gapped tensors, or bytes after the
            last tensor. The message names the file and the tensor.
    """
    size, header_len, raw = _read_raw_header(path)
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries = {name: _entry(path, name, entry) for name, entry in header.items()}
    data_start = 8 + header_len
    _check_layout(path, entries, size - data_start)
    return entries, metadata, data_start


def _read_raw_header(path: Path) -> tuple[int, int, bytes]:
    """(file size, header length, header bytes); the length must fit the file and the format's cap.

    A remote file's header is kept by URL, size and ETag (issue 22): discovery, the health check and the
    sketch each open the file, and a header is fetched once, not once per open.
    """
    if isinstance(path, RemotePath):
        stat = path.stat()
        key = (path.url, stat.st_size, stat.etag)
        found = _remote_headers.get(key)
        if found is None:
            found = _read_raw_header_of(path)
            _remember_header(key, found)
        return found
    return _read_raw_header_of(path)


# Remote headers kept (see _read_raw_header), at most this many bytes of them, oldest forgotten first.
REMOTE_HEADERS_BYTES = 64 << 20
_remote_headers: "OrderedDict[tuple, tuple[int, int, bytes]]" = OrderedDict()


_headers_lock = threading.Lock()


def _remember_header(key: tuple, value: tuple[int, int, bytes]) -> None:
    with _headers_lock:
        _remote_headers[key] = value
        while sum(len(v[2]) for v in _remote_headers.values()) > REMOTE_HEADERS_BYTES:
            _remote_headers.popitem(last=False)


def _read_raw_header_of(path: Path) -> tuple[int, int, bytes]:
    """:func:`_read_raw_header` without the cache."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointReadError(path, f"file is {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointReadError(path, f"header length {header_len} exceeds the file ({size} bytes) "
                                                "or the format's 100 MB cap: truncated or not safetensors")
            return size, header_len, handle.read(header_len)
    except OSError as e:
        raise CheckpointReadError(path, e.strerror or str(e)) from e


def _parse_json(path: Path, raw: bytes) -> dict:
    """The header's JSON object: strict UTF-8, no NaN/Infinity, no repeated ``__metadata__`` or field."""
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_object)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:   # JSONDecodeError is a ValueError
        raise CheckpointReadError(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointReadError(path, "header is not a JSON object")
    return header


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _object(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object; a repeated ``__metadata__`` or tensor field is an error (the format's reader
    refuses it), a repeated tensor name keeps the last (as that reader does)."""
    result: dict = {}
    for key, value in pairs:
        if key in result and key in ("__metadata__", *_ENTRY_FIELDS):
            raise ValueError(f"duplicate field {key!r}")
        if not _is_utf8(key):
            raise ValueError(f"name {key!r} is not valid UTF-8")
        result[key] = value
    return result


def _is_utf8(text: str) -> bool:
    """False for a string holding a lone surrogate (a ``\\ud800`` escape), which UTF-8 cannot carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata(path: Path, value: object) -> dict[str, str]:
    """``__metadata__``: absent, null, or an object of strings."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) and _is_utf8(v) for v in value.values()):
        raise CheckpointReadError(path, f"__metadata__ must be an object of strings, got {_short(value)}")
    return dict(value)


def _entry(path: Path, name: str, entry: object) -> dict:
    """One tensor's entry, validated: a known dtype, a shape of u64s and two u64 offsets."""
    if isinstance(entry, list) and len(entry) == len(_ENTRY_FIELDS):
        entry = dict(zip(_ENTRY_FIELDS, entry))     # the format's reader also takes the fields as a list
    problem = _entry_problem(entry)
    if problem:
        raise CheckpointReadError(path, f"tensor {name!r} has a malformed header entry: {problem}")
    assert isinstance(entry, dict)
    return {field: entry[field] for field in _ENTRY_FIELDS}


def _entry_problem(entry: object) -> str | None:
    """What is wrong with a tensor's entry, or None."""
    if not isinstance(entry, dict) or any(field not in entry for field in _ENTRY_FIELDS):
        return f"it must hold dtype, shape and data_offsets, got {_short(entry)}"
    dtype, shape, offsets = (entry[field] for field in _ENTRY_FIELDS)
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return f"unknown or unsupported dtype {_short(dtype)} (known: {', '.join(SAFETENSORS_DTYPES)})"
    if not isinstance(shape, list) or not all(_is_u64(d) and d < _DIM_LIMIT for d in shape):
        return f"shape must be a list of non-negative integers (below 2**63), got {_short(shape)}"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        return f"data_offsets must be two non-negative integers, got {_short(offsets)}"
    return None


def _is_u64(value: object) -> bool:
    """An integer the format can hold: JSON's ``1.0``, ``"1"``, ``true`` and ``-1`` are not."""
    return type(value) is int and 0 <= value < _U64_LIMIT


def _short(value: object) -> str:
    """A value for a message: its repr, cut to one short line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _byte_size(shape: list[int], itemsize: int) -> int | None:
    """Bytes of a tensor, or None where the format's reader overflows: it multiplies the dimensions
    in order in 64 bits (``[2**62, 4, 0]`` overflows before the 0), then by the item size."""
    count = 1
    for dim in (*shape, itemsize):
        count *= dim
        if count >= _U64_LIMIT:
            return None
    return count


def _check_layout(path: Path, entries: dict[str, dict], data_bytes: int) -> None:
    """Offsets must tile the data region exactly, in offset order, and agree with shape x dtype."""
    position, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        start, end = entry["data_offsets"]
        if end < start:
            raise CheckpointReadError(path, f"tensor {name!r}: data_offsets [{start}, {end}] end before they start")
        if start != position:
            problem = f"overlaps tensor {previous!r}" if start < position else "leaves a gap before it"
            raise CheckpointReadError(path, f"tensor {name!r} {problem} (offset {start}, expected {position})")
        if end > data_bytes:
            raise CheckpointReadError(path, f"tensor {name!r} ends at byte {end} but the data is only {data_bytes} bytes: file truncated")
        needed = _byte_size(entry["shape"], DTYPE_BYTES[SAFETENSORS_DTYPES[entry["dtype"]]])
        if needed is None:
            raise CheckpointReadError(path, f"tensor {name!r}: shape {entry['shape']} overflows a 64-bit byte count")
        if end - start != needed:
            raise CheckpointReadError(path, f"tensor {name!r}: {end - start} bytes stored but shape {entry['shape']} "
                                            f"x {entry['dtype']} needs {needed}")
        position, previous = end, name
    if position != data_bytes:
        raise CheckpointReadError(path, f"{data_bytes - position} bytes after the last tensor's data "
                                        f"(the tensors cover {position} of {data_bytes}): not a valid safetensors file")


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
        if isinstance(self.path, RemotePath):
            return self._read_remote(name)
        try:
            if self._file is None:
                self._file = safe_open(str(self.path), framework="pt", device="cpu")
            return self._file.get_tensor(self.keys.original(name))
        except (SafetensorError, OSError) as e:
            raise CheckpointReadError(self.path, f"tensor {name!r}: {e}") from e

    def _read_remote(self, name: str) -> "torch.Tensor":
        """One tensor of a remote file: its exact byte range, one request (``safe_open`` maps local files only)."""
        import torch

        info = next((i for i in self._infos if i.name == name), None)
        if info is None:
            raise CheckpointReadError(self.path, f"no tensor {name!r}")
        offset, dtype = self._offsets[self.keys.original(name)]
        torch_dtype = getattr(torch, dtype)
        if info.size_bytes == 0:
            return torch.empty(info.shape, dtype=torch_dtype)
        blob = bytearray(self.path.read_range(offset, offset + info.size_bytes))
        return torch.frombuffer(blob, dtype=torch_dtype).reshape(info.shape)

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
