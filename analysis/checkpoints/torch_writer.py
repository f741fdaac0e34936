"""A streaming writer of torch's zip serialization: ``torch.load(weights_only=True)`` reads what it writes.

``torch.save`` needs the whole state dict in memory; a merge must hold one block at a time.
torch's format is a zip archive (stored, not compressed): ``archive/data.pkl`` (the pickle of
the dict, each tensor a ``_rebuild_tensor_v2`` call whose storage is a persistent id),
then each storage as its own ``archive/data/N`` record, then ``archive/version``. Every shape
and dtype is known from the input headers before any data is read, so the pickle goes first
and each storage is appended as its blocks are averaged: memory holds a block, never a tensor.
Record data starts 64-byte aligned (an ``FB`` padding extra field, as torch writes it), so
``torch.load(weights_only=True, mmap=True)`` maps the storages in place. The merge's metadata (the recipe marker run
discovery tells merges apart by) goes into a record of its own, ``archive/.data/ckpt_select.json``,
which torch does not read: the pickle stays a plain dict of tensors.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..errors import MergeError
from .base import DTYPE_BYTES, TensorInfo, expected_block

ARCHIVE = "archive"
ALIGNMENT = 64                            # torch's .storage_alignment: where each record's data starts
METADATA_RECORD = ".data/ckpt_select.json"
# Storage classes torch has pickled since 1.x (``torch.FloatStorage``): element counts in the persistent id.
TYPED_STORAGES = {"float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
                  "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
                  "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}
_PADDING_ID = 0x4246                     # b"FB": torch's (miniz's) padding extra field
_LOCAL_HEADER_BYTES = 30
_ZIP64_EXTRA_BYTES = 20


def _text(value: str) -> bytes:
    """BINUNICODE."""
    raw = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    """The shortest pickle int opcode (LONG1 past 32 bits: shapes and byte counts can exceed them)."""
    if 0 <= value < 1 << 8:
        return b"K" + bytes([value])
    if 0 <= value < 1 << 16:
        return b"M" + struct.pack("<H", value)
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)
    raw = pickle.encode_long(value)
    return b"\x8a" + bytes([len(raw)]) + raw


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t" if items else b")"


def _strides(shape: tuple[int, ...]) -> list[int]:
    """Row-major (contiguous) strides, in elements."""
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return strides[::-1]


def _tensor(info: TensorInfo, key: str) -> bytes:
    """The pickle of one contiguous CPU tensor whose storage is record ``data/KEY``.

    Dtypes with a legacy storage class use ``_rebuild_tensor_v2`` (loadable by every torch since
    1.6); the others (float8, uint16/32/64) use ``_rebuild_tensor_v3`` with an untyped storage
    and the dtype named, as torch 2.x itself writes them.
    """
    typed = TYPED_STORAGES.get(info.dtype)
    count = info.numel if typed else info.numel * DTYPE_BYTES[info.dtype]
    storage_class = _global("torch", typed) if typed else _global("torch.storage", "UntypedStorage")
    storage = _tuple([_text("storage"), storage_class, _text(key), _text("cpu"), _int(count)]) + b"Q"
    args = [storage, _int(0), _tuple([_int(d) for d in info.shape]), _tuple([_int(s) for s in _strides(info.shape)]),
            b"\x89", _global("collections", "OrderedDict") + b")R"]
    if not typed:
        args.append(_global("torch", info.dtype))
    rebuild = "_rebuild_tensor_v2" if typed else "_rebuild_tensor_v3"
    return _global("torch._utils", rebuild) + _tuple(args) + b"R"


def state_dict_pickle(layout: list[TensorInfo], wrap_key: str | None = None) -> bytes:
    """The pickle of ``{name: tensor}`` (or ``{wrap_key: {name: tensor}}``), storages keyed 0, 1, ... in order."""
    items = b"".join(_text(info.name) + _tensor(info, str(i)) for i, info in enumerate(layout))
    tensors = b"}(" + items + b"u"
    body = b"}(" + _text(wrap_key) + tensors + b"u" if wrap_key else tensors
    return b"\x80\x02" + body + b"."


def read_merge_metadata(path: Path) -> dict[str, str]:
    """The metadata a :class:`TorchWriter` stored beside the pickle ({} for any other torch file).

    Run discovery tells a merge's output from a checkpoint by the recipe marker in it, as it
    does for safetensors headers; a torch file has no header, so the marker has a record of its own.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/" + METADATA_RECORD)), None)
            doc = json.loads(archive.read(name)) if name else {}
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return {}
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def _check_layout(path: Path, layout: list[TensorInfo]) -> None:
    """Refuse, before a byte is written, what torch could not load back."""
    for info in layout:
        if info.dtype not in DTYPE_BYTES or not all(type(d) is int and 0 <= d < 1 << 63 for d in info.shape):
            raise MergeError(f"{path}: cannot write tensor {info.name!r} with shape {list(info.shape)} and dtype "
                             f"{info.dtype} into a torch file")


class TorchWriter:
    """Write tensors in the order declared by ``layout`` into a torch zip file; ``close`` checks completeness.

    The same interface as :class:`analysis.checkpoints.safetensors_writer.SafetensorsWriter`
    (``write_block``, ``remaining``, ``total_bytes``), so the merge's output stage drives either.
    ``largest_block_bytes`` is the writer's own account of the most it was handed at once.
    """

    def __init__(self, path: Path, layout: list[TensorInfo], metadata: dict[str, str] | None = None,
                 wrap_key: str | None = None) -> None:
        _check_layout(path, layout)
        self.path = path
        self._layout = layout
        self._next = 0
        self._filled = 0
        self._entry = None
        self.largest_block_bytes = 0
        self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._record("data.pkl", state_dict_pickle(layout, wrap_key))
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(ALIGNMENT).encode())
        self._record("byteorder", sys.byteorder.encode())
        if metadata:
            self._record(METADATA_RECORD, json.dumps(metadata, sort_keys=True).encode())

    @property
    def remaining(self) -> int:
        """Declared tensors not yet completely written."""
        return len(self._layout) - self._next

    @property
    def total_bytes(self) -> int:
        """Size of the file (final once closed)."""
        return self.path.stat().st_size

    def _open(self, name: str, size: int):
        """A record opened for writing whose data starts ``ALIGNMENT``-aligned in the file."""
        assert self._zip is not None and self._zip.fp is not None, "write after close"
        info = zipfile.ZipInfo(f"{ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT   # zipfile's own rule for a size known in advance
        start = (self._zip.fp.tell() + _LOCAL_HEADER_BYTES + len(info.filename.encode())
                 + 4 + _ZIP64_EXTRA_BYTES * zip64)
        info.extra = struct.pack("<HH", _PADDING_ID, -start % ALIGNMENT) + b"Z" * (-start % ALIGNMENT)
        return self._zip.open(info, "w", force_zip64=zip64)

    def _record(self, name: str, data: bytes) -> None:
        with self._open(name, len(data)) as entry:
            entry.write(data)

    def write_block(self, name: str, start: int, block: np.ndarray) -> None:
        """Append elements ``[start, start + len(block))`` of the current tensor (blocks come in order).

        ``block`` is a flat numpy array as wide as the declared dtype (raw bits for bfloat16 and
        float8): its bytes are the storage's bytes, as torch lays them out.
        """
        info = expected_block(self.path, self._layout, self._next, self._filled, name, start, block)
        if self._entry is None:
            self._entry = self._open(f"data/{self._next}", info.numel * DTYPE_BYTES[info.dtype])
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        self.largest_block_bytes = max(self.largest_block_bytes, data.nbytes)
        self._entry.write(memoryview(data))
        self._filled += block.size
        if self._filled == info.numel:
            self._finish_tensor()

    def _finish_tensor(self) -> None:
        self._entry.close()
        self._entry, self._next, self._filled = None, self._next + 1, 0

    def close(self) -> None:
        """Write ``version`` and the central directory, flush to disk; raise if tensors are missing."""
        if self._zip is None:
            return
        if self._next != len(self._layout):
            missing = [info.name for info in self._layout[self._next:]][:5]
            self._abandon()
            raise MergeError(f"{self.path}: {len(self._layout) - self._next} tensors never written (first: {missing})")
        self._record("version", b"3\n")
        self._zip.close()   # closes the file it opened; fsync through a fresh descriptor
        self._zip = None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _abandon(self) -> None:
        """Close the file without a central directory: what is left is not a loadable torch file."""
        if self._zip is not None and self._zip.fp is not None:
            handle, self._zip.fp = self._zip.fp, None   # so zipfile never writes its directory into it
            handle.close()
        self._zip, self._entry = None, None

    def __enter__(self) -> "TorchWriter":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()
