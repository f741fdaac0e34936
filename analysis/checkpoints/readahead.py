"""A checkpoint's tensors in order, the next ones fetched ahead when they sit in object storage.

Why: the sketch pass reads every tensor of a checkpoint once. Through ``handle.read`` a tensor of a
remote safetensors file is one exact ranged request, issued only when the previous tensor is done,
so a first analysis of a bucket is bound by round trips (S3's first byte takes 20-100 ms; a 70B
checkpoint has ~700 tensors a file), not by bandwidth. Here a thread fetches the next *window* of
consecutive tensors while the current one is sketched: consecutive tensors of a safetensors file are
contiguous, so a window's ranges coalesce into a few runs, each split into parts of at most
:data:`PART_BYTES` fetched concurrently in ONE ``Store.read_spans`` batch. At most
:data:`PREFETCH_BYTES` are fetched and not yet used (a tensor larger than that is fetched alone), so
memory stays bounded by a window, never a checkpoint; no byte is fetched twice.

A tensor is built from its bytes exactly as ``SafetensorsHandle.read`` builds a remote one (a
writable copy viewed with ``torch.frombuffer``, same dtype and shape), so sketches and statistics are
bit-identical. Local files, and layouts without raw locations (pickles, DCP), go through
``handle.read`` as before.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from ..remote import RemotePath
from ..remote.path import read_path_spans
from .location import TensorLocation, locate

if TYPE_CHECKING:
    import torch

    from .base import CheckpointHandle, TensorInfo

# Bytes fetched ahead and not yet handed over, at most; 0 turns the read-ahead off (one request a tensor).
PREFETCH_BYTES = 64 << 20
# Consecutive tensors up to this many bytes (and a quarter of the budget) make a window: one batch of requests,
# fetched while the previous window is used.
WINDOW_BYTES = 16 << 20
# The most one request fetches: a window's contiguous run is split into parts fetched concurrently.
PART_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Member:
    """One tensor of a window: its header entry and where its bytes sit in a remote object."""

    info: "TensorInfo"
    location: TensorLocation


@dataclass(frozen=True, slots=True)
class Fetched:
    """A window's bytes: every fetched part as (store id, object key, first byte, bytes)."""

    members: tuple[Member, ...]
    size: int
    parts: tuple[tuple[int, str, int, bytes], ...]


def read_in_order(handle: "CheckpointHandle", infos: Sequence["TensorInfo"],
                  budget: int | None = None) -> Iterator[tuple["TensorInfo", "torch.Tensor"]]:
    """Each of ``infos`` with its tensor, in order, as ``handle.read`` returns it; tensors of remote
    safetensors files come from windows fetched ahead on a thread, at most ``budget`` bytes
    (default :data:`PREFETCH_BYTES`) ahead. Closing the iterator early stops the thread."""
    budget = PREFETCH_BYTES if budget is None else budget
    located = [(info, _remote_location(handle, info) if budget > 0 else None) for info in infos]
    if not any(loc is not None for _, loc in located):
        for info in infos:
            yield info, handle.read(info.name)
        return
    members = [Member(info, loc) for info, loc in located if loc is not None]
    with Readahead(plan_windows(members, min(WINDOW_BYTES, max(budget // 4, 1))), budget) as ahead:
        for info, loc in located:
            yield info, (ahead.tensor(info) if loc is not None else handle.read(info.name))


def _remote_location(handle: "CheckpointHandle", info: "TensorInfo") -> TensorLocation | None:
    """Where ``info``'s raw bytes sit if that is a remote object, else None (read through the handle)."""
    loc = locate(handle, info.name)
    return loc if loc is not None and isinstance(loc.path, RemotePath) else None


def plan_windows(members: Sequence[Member], window_bytes: int | None = None) -> list[tuple[Member, ...]]:
    """Consecutive tensors, up to ``window_bytes`` (default :data:`WINDOW_BYTES`) a window; a larger one alone."""
    window_bytes = window_bytes or WINDOW_BYTES
    windows: list[list[Member]] = []
    filled = 0
    for member in members:
        if not windows or (filled + member.info.size_bytes > window_bytes and windows[-1]):
            windows.append([])
            filled = 0
        windows[-1].append(member)
        filled += member.info.size_bytes
    return [tuple(w) for w in windows]


def coalesce(members: Sequence[Member]) -> list[tuple[RemotePath, int, int]]:
    """The byte runs of a window: each (object, start, end) covering tensors that follow each other in it."""
    runs: list[tuple[RemotePath, int, int]] = []
    for member in members:
        path, start = member.location.path, member.location.offset
        end = start + member.info.size_bytes
        if end == start:
            continue
        last = runs[-1] if runs else None
        if last is not None and _same_object(last[0], path) and last[2] == start:
            runs[-1] = (last[0], last[1], end)
        else:
            runs.append((path, start, end))   # type: ignore[arg-type]
    return runs


def _same_object(a: RemotePath, b: RemotePath) -> bool:
    return a.store is b.store and a.key == b.key


def fetch_window(members: tuple[Member, ...]) -> Fetched:
    """A window's bytes: its runs, in requests of at most :data:`PART_BYTES`, one concurrent batch per store."""
    runs = coalesce(members)
    parts = tuple((id(p.store), p.key, s, blob) for (p, s, _), blob in zip(runs, read_path_spans(runs, PART_BYTES)))
    return Fetched(members, sum(m.info.size_bytes for m in members), parts)


def tensor_from(fetched: Fetched, member: Member) -> "torch.Tensor":
    """One tensor of a fetched window, built as ``SafetensorsHandle.read`` builds a remote one."""
    import torch

    info, loc = member.info, member.location
    dtype = getattr(torch, loc.dtype)
    if info.size_bytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    blob = bytearray(info.size_bytes)
    view, start, end = memoryview(blob), loc.offset, loc.offset + info.size_bytes
    for store, key, first, data in fetched.parts:
        if store == id(loc.path.store) and key == loc.path.key and first < end and first + len(data) > start:
            lo, hi = max(first, start), min(first + len(data), end)
            view[lo - start:hi - start] = memoryview(data)[lo - first:hi - first]
    return torch.frombuffer(blob, dtype=dtype).reshape(info.shape)


class Readahead:
    """Fetches planned windows in order on a thread, at most ``budget`` bytes ahead of the consumer.

    The consumer asks for tensors in window order (:meth:`tensor`); moving on to the next window
    hands the previous one's bytes back to the budget. Errors of the thread (a ``RemoteError``)
    are raised in the consumer at the tensor that needed them.
    """

    def __init__(self, windows: Sequence[tuple[Member, ...]], budget: int) -> None:
        self._windows, self._budget = list(windows), budget
        self._ready: queue.Queue[Fetched | BaseException] = queue.Queue()
        self._room = threading.Condition()
        self._ahead = 0            # bytes fetched or being fetched and not yet released by the consumer
        self.peak = 0              # the most bytes that were ever ahead: what the budget bounds
        self._stop = False
        self._current: Fetched | None = None
        self._position = 0
        self._thread = threading.Thread(target=self._run, name="sketch-readahead", daemon=True)

    def __enter__(self) -> "Readahead":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tensor(self, info: "TensorInfo") -> "torch.Tensor":
        """The next planned tensor (it must be ``info``), from the window fetched ahead."""
        if self._current is None or self._position == len(self._current.members):
            self._next_window()
        assert self._current is not None
        member = self._current.members[self._position]
        assert member.info.name == info.name, "tensors must be asked for in the planned order"
        self._position += 1
        return tensor_from(self._current, member)

    def _next_window(self) -> None:
        """Hand the used window back to the budget and wait for the next one."""
        if self._current is not None:
            self._release(self._current.size)
        self._current = None
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        self._current, self._position = item, 0

    def _release(self, size: int) -> None:
        with self._room:
            self._ahead -= size
            self._room.notify_all()

    def close(self) -> None:
        """Stop fetching (the pass ended or failed); a batch in flight finishes and is dropped."""
        with self._room:
            self._stop = True
            self._room.notify_all()
        self._thread.join()
        self._current = None

    def _run(self) -> None:
        try:
            for members in self._windows:
                size = sum(m.info.size_bytes for m in members)
                if not self._reserve(size):
                    return
                self._ready.put(fetch_window(members))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._ready.put(e)

    def _reserve(self, size: int) -> bool:
        """Wait until ``size`` more bytes fit the budget (or nothing else is ahead); False once closed."""
        with self._room:
            self._room.wait_for(lambda: self._stop or self._ahead == 0 or self._ahead + size <= self._budget)
            if self._stop:
                return False
            self._ahead += size
            self.peak = max(self.peak, self._ahead)
            return True
