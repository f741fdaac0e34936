"""``torch.save`` files in object storage, read by exact ranges (issue 22).

A small file (up to :data:`WHOLE_FILE_BYTES`) is fetched whole in one request and loaded from
memory. A large one is loaded lazily: torch's own zip reader walks the central directory and
unpickles only ``data.pkl`` (weights-only, ``map_location="meta"``, so no storage byte is read),
and each tensor is then fetched by its own range, located by the record offset torch gives every
meta storage. The head and the tail of the file are fetched once, so the zip directory, the
small records and ``data.pkl`` (which ``torch.save`` writes first) cost two requests, not one per
record. Scalars (a saved ``step``, Adam's counters) are read right away in one batch: they are the
metadata. ``torch.load`` never sees a URL and never runs code: the weights-only unpickler is used
for every byte that is unpickled.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from ..remote import RemotePath
from ..remote.path import RangeView

if TYPE_CHECKING:
    import torch

# Up to this size a torch file is fetched whole (one request); above it, tensors are fetched one by one when read.
WHOLE_FILE_BYTES = 64 << 20
# Bytes fetched from each end of a large file before torch's zip reader looks at it: data.pkl sits at the
# head, the central directory and the small records (.format_version, byteorder) at the tail.
HEAD_BYTES = 1 << 20
TAIL_BYTES = 256 << 10
# Tensors of at most this many elements are read at load time (one batch of ranges): they are metadata.
SCALAR_ELEMENTS = 1


class EndsFile(RangeView):
    """A remote file seen through its head and tail (fetched once) and exact ranges for the rest.

    What torch's zip reader and :mod:`zipfile` read: the directory at the end, ``data.pkl`` at the
    start. Every other read is one exact range, counted by the store.
    """

    def __init__(self, path: RemotePath, size: int) -> None:
        super().__init__(size)
        self._path = path
        head_end = min(size, HEAD_BYTES)
        tail_start = max(head_end, size - TAIL_BYTES)
        ranges = [(0, head_end)] + ([(tail_start, size)] if tail_start < size else [])
        blobs = path.store.read_ranges(path.key, ranges)
        self._head, self._tail = blobs[0], (blobs[1] if len(blobs) > 1 else b"")
        self._tail_start = tail_start

    def range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``: from the cached ends when they hold them, else one exact request."""
        if end <= len(self._head):
            return self._head[start:end]
        if start >= self._tail_start:
            return self._tail[start - self._tail_start:end - self._tail_start]
        return self._path.read_range(start, end)

    _bytes = range


class RemoteTorchFile:
    """One remote ``torch.save`` file: its payload (lazy when large), its tensors' bytes, its zip records."""

    def __init__(self, path: RemotePath) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.lazy = False
        self._source: io.IOBase | None = None

    def load(self, lazy: bool) -> object:
        """The weights-only payload. ``lazy`` (and a large zip file): tensors are meta, fetched by :meth:`fetch`.

        The caller holds ``torch.serialization.safe_globals`` for whatever plain-data globals it allows.
        """
        import torch

        if lazy and self.size > WHOLE_FILE_BYTES:
            ends = EndsFile(self.path, self.size)
            if ends.range(0, 4) == b"PK\x03\x04":   # a zip (torch >= 1.6); a legacy pickle is read whole below
                self._source, self.lazy = ends, True
                payload = torch.load(ends, weights_only=True, map_location="meta")
                return self._with_scalars(payload)
        self._source = io.BytesIO(self.path.read_bytes())
        return torch.load(self._source, weights_only=True, map_location="cpu")

    def source(self) -> io.IOBase:
        """A seekable file over the bytes already fetched (for :mod:`zipfile`: the merge marker record)."""
        assert self._source is not None, "load() first"
        self._source.seek(0)
        return self._source

    def fetch(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """A meta tensor's values: the bytes its view spans in its storage's record, one exact range."""
        return self.fetch_many([tensor])[0]

    def fetch_many(self, tensors: list["torch.Tensor"]) -> list["torch.Tensor"]:
        """Several meta tensors in one concurrent batch of exact ranges."""
        import torch

        spans = [_span(t) for t in tensors]
        wanted = [(start, end) for start, end in spans if end > start]
        blobs = iter(self.path.store.read_ranges(self.path.key, wanted))
        out = []
        for tensor, (start, end) in zip(tensors, spans):
            if end == start:
                out.append(torch.empty(tensor.shape, dtype=tensor.dtype))
                continue
            flat = torch.frombuffer(bytearray(next(blobs)), dtype=tensor.dtype)
            out.append(flat.as_strided(tuple(tensor.shape), tuple(tensor.stride()), 0))
        return out

    def _with_scalars(self, payload: object) -> object:
        """``payload`` with its one-element tensors read (a step, a counter): metadata is read at load time."""
        found: list["torch.Tensor"] = []
        _collect(payload, found)
        values = {id(t): v for t, v in zip(found, self.fetch_many(found))} if found else {}
        return _replaced(payload, values)


def _span(tensor: "torch.Tensor") -> tuple[int, int]:
    """Absolute byte range of the elements a (meta) view covers in its file."""
    storage = tensor.untyped_storage()
    record = getattr(storage, "_checkpoint_offset", None)
    if record is None:
        raise ValueError("a meta tensor without a record offset")
    if tensor.numel() == 0:
        return record, record
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    item = tensor.element_size()
    start = record + tensor.storage_offset() * item
    return start, start + extent * item


def _collect(tree: object, found: list) -> None:
    """Meta tensors of at most SCALAR_ELEMENTS elements anywhere in a loaded payload."""
    from .base import is_tensor

    if is_tensor(tree):
        if tree.is_meta and tree.numel() <= SCALAR_ELEMENTS:   # type: ignore[attr-defined]
            found.append(tree)
    elif isinstance(tree, dict):
        for value in tree.values():
            _collect(value, found)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _collect(value, found)


def _replaced(tree: object, values: dict[int, object]) -> object:
    """A copy of the containers of ``tree`` with the tensors in ``values`` (by id) replaced."""
    if id(tree) in values:
        return values[id(tree)]
    if isinstance(tree, dict):   # dict or OrderedDict: all the weights-only unpickler builds
        return type(tree)((k, _replaced(v, values)) for k, v in tree.items())
    if isinstance(tree, list):
        return [_replaced(v, values) for v in tree]
    if isinstance(tree, tuple) and type(tree) is tuple:
        return tuple(_replaced(v, values) for v in tree)
    return tree
