"""The merge's reads: every input's blocks of a tensor, read ahead by a thread into reused buffers.

Why blocks: a weighted average is element-wise, so it can run over a block of a few
hundred thousand elements of every input at a time. The block of the accumulator stays
in the CPU cache while each input's block is added to it, memory holds a few blocks
instead of whole tensors (let alone whole models), and the result is written block by block.

Why a reader thread: safetensors inputs are read with ``os.preadv`` straight into
reusable buffers (no memory map, so the inputs' pages never count against the process's
resident memory). ``preadv`` and numpy's (or torch's) kernels release the GIL, so the
thread reads block k+1 of every input while the adder works on block k. A block's inputs
are read back to back into one buffer, so (sharing a dtype, the usual case) they form one
``[inputs, count]`` array that the adder converts and weights in one call each; a tensor of
a layout read whole (a pickle) is copied into its place in that buffer block by block, so
every block's parts live in the reader's buffers. A second
reader thread was tried and was slower (contention on 2 cores); a memory map plus
conversion cost as much as read plus conversion.

Remote inputs (``s3://`` ..., issue 22) have no file descriptor: their blocks come from
:class:`RemotePrefetch`, a thread that fetches every remote input's next few MiB of the tensors
ahead of the reader, in concurrent batches of exact ranges; the reader copies them into the
same buffer sets.

Blocks hold raw bits: unsigned integers as wide as the stored dtype (bfloat16 as
``uint16``), whatever the input's layout, so this module never needs torch. Inputs without
raw locations (pickles, DCP) are read whole through their handle once and viewed the same way.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from ..checkpoints.base import DTYPE_BYTES, RAW_BITS, dtype_name, raw_bits
from ..checkpoints.location import TensorLocation, locate
from ..errors import CheckpointReadError, MergeError
from ..hashing import StreamDigest
from ..remote import RemotePath
from ..remote.path import read_path_spans

if TYPE_CHECKING:
    from ..checkpoints import CheckpointHandle, TensorInfo

# Most elements per block: 128 Ki. A block's inputs are converted and weighted as one [inputs, block]
# float32 array (4 MiB for 8 inputs) that should stay in the CPU cache with the accumulator; larger
# blocks made 8 x 220M bf16 slower (1 Mi: ~1.9-2.1 s, 256 Ki: ~1.2-1.5 s, 128 Ki: ~1.0-1.4 s on 2 busy cores).
BLOCK_ELEMENTS = 1 << 17
# Fewest elements per block, whatever the number of inputs.
MIN_BLOCK_ELEMENTS = 1 << 16
# The read buffers of all inputs together stay under this, so memory stays flat as inputs are added.
BUFFER_BUDGET_BYTES = 64 << 20
# Buffer sets in rotation between the reader thread and the adder (one being read, one being added, one spare).
BUFFER_SETS = 3
# Remote inputs (issue 22): bytes per window over all inputs, the least per input, the most per request,
# and windows waiting ready (see RemotePrefetch): memory ~ (PREFETCH_WINDOWS + 2) windows.
REMOTE_WINDOW_BYTES = 32 << 20
MIN_WINDOW_BYTES = 1 << 20
REMOTE_PART_BYTES = 8 << 20
PREFETCH_WINDOWS = 1


@dataclass(frozen=True, slots=True)
class Block:
    """Elements ``[start, stop)`` of tensor ``info``: one part per input, oldest first, as raw bits."""

    info: "TensorInfo"
    start: int
    stop: int
    parts: tuple[np.ndarray, ...]     # every input's elements (raw bits), oldest first
    dtypes: tuple[str, ...]           # each part's stored dtype
    stacked: np.ndarray | None        # the parts as one [inputs, count] array when they share a dtype
    buffer_set: int | None            # returned to the reader when done (None: an empty tensor)


@dataclass(frozen=True, slots=True)
class Whole:
    """A tensor that is copied, not averaged (not floating point): the newest input's raw bits."""

    info: "TensorInfo"
    data: np.ndarray


def widest_input(handles: Sequence["CheckpointHandle"]) -> int:
    """Bytes per element of the widest floating tensor any input stores (sizes the read buffers)."""
    return max((DTYPE_BYTES[i.dtype] for h in handles for i in h.tensors() if i.is_floating), default=4)


def block_elements(n_inputs: int, itemsize: int) -> int:
    """Elements per block: BLOCK_ELEMENTS, halved until every input's buffers fit the budget."""
    block = BLOCK_ELEMENTS
    while block > MIN_BLOCK_ELEMENTS and BUFFER_SETS * n_inputs * itemsize * block > BUFFER_BUDGET_BYTES:
        block //= 2
    return block


def buffer_bytes(handles: Sequence["CheckpointHandle"]) -> int:
    """Memory the reader's buffers and the adder's work arrays take: what the dry run adds to its projection."""
    widest = widest_input(handles)
    block = block_elements(len(handles), widest)
    return BUFFER_SETS * len(handles) * block * widest + len(handles) * block * 8 + 3 * block * 4


class ReadHashes:
    """The sha256 (and quick hash) of input files, computed from the merge's own reads on a thread of its own.

    The reader hands every range it reads to :meth:`feed`; a :class:`analysis.hashing.StreamDigest`
    per file hashes it in file order and reads only what the merge never reads (the header, a
    config, the tensors of the older inputs that are copied from the newest, or a whole pickle,
    whose bytes the reader never sees) in :meth:`finish`. Its own thread, so hashing overlaps both
    the reading and the adding; the reader waits for a buffer set's hashing before it reuses it.
    """

    def __init__(self, files: Iterable[Path]) -> None:
        self._digests = {f: StreamDigest(f) for f in files}
        self._queue: queue.Queue[tuple[Path, int, np.ndarray, int | None] | None] = queue.Queue()
        self._pending = [0] * BUFFER_SETS
        self._changed = threading.Condition()
        self._error: tuple[Path, BaseException] | None = None
        self._thread = threading.Thread(target=self._run, name="merge-hasher", daemon=True)
        self._thread.start()

    def __enter__(self) -> "ReadHashes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def feed(self, path: Path, offset: int, data: np.ndarray, buffer_set: int | None) -> None:
        """Queue ``data`` (bytes of ``path`` from ``offset``, in read buffer set ``buffer_set``) for hashing."""
        if path not in self._digests:
            return
        if buffer_set is not None:
            with self._changed:
                self._pending[buffer_set] += 1
        self._queue.put((path, offset, data, buffer_set))

    def wait_for(self, buffer_set: int) -> None:
        """Return once nothing queued still reads ``buffer_set`` (the reader is about to overwrite it)."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending[buffer_set] == 0)

    def finish(self) -> dict[Path, tuple[str, tuple[int, list[bytes]]]]:
        """Every file's (sha256, quick-hash samples), once the bytes the merge did not read are hashed too.

        Raises:
            CheckpointReadError: a file changed or ended early while it was hashed.
        """
        self.close()
        try:
            if self._error is not None:
                raise self._error[1]
            return {path: digest.finish() for path, digest in self._digests.items()}
        except OSError as e:
            raise CheckpointReadError(self._error[0] if self._error else Path(e.filename or "?"),
                                      f"could not be hashed ({e.strerror or e})") from None

    def close(self) -> None:
        """Stop the hashing thread (after what is queued)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            path, offset, data, buffer_set = item
            try:
                if self._error is None:
                    self._digests[path].feed(offset, memoryview(data))
            except BaseException as e:  # noqa: BLE001 - kept for finish(); the thread must go on releasing buffers
                self._error = (path, e)
            finally:
                if buffer_set is not None:
                    with self._changed:
                        self._pending[buffer_set] -= 1
                        self._changed.notify_all()


class BlockReader:
    """Reads every input's blocks, in order, into rotating buffers on a background thread.

    Iterating yields :class:`Block` and :class:`Whole` items in ``layout`` order; a block's
    buffers are handed back to the reader when the consumer asks for the next item.
    """

    def __init__(self, handles: Sequence["CheckpointHandle"], layout: Sequence["TensorInfo"],
                 hashes: ReadHashes | None = None) -> None:
        self._handles, self._layout, self._hashes = handles, layout, hashes
        self._fds: dict[Path, int] = {}
        self._free: queue.Queue[int] = queue.Queue()
        self._ready: queue.Queue[object] = queue.Queue(maxsize=BUFFER_SETS)
        self._stop = threading.Event()
        self._widest = widest_input(handles)
        self.block = block_elements(len(handles), self._widest)
        self._prefetch: RemotePrefetch | None = None   # started at the first remote block
        self._buffers = [np.empty(len(handles) * self.block * self._widest, dtype=np.uint8)
                         for _ in range(BUFFER_SETS)]
        for index in range(BUFFER_SETS):
            self._free.put(index)
        self._thread = threading.Thread(target=self._run, name="merge-reader", daemon=True)

    def __iter__(self) -> Iterator[Block | Whole]:
        self._thread.start()
        try:
            while (item := self._ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
                if isinstance(item, Block) and item.buffer_set is not None:
                    self._free.put(item.buffer_set)
        finally:
            self._close()

    def _close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:      # unblock a reader waiting to hand over a block
                self._ready.get(timeout=0.05)
            except queue.Empty:
                pass
            self._free.put(0)
            self._thread.join(timeout=0.05)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._prefetch is not None:
            self._prefetch.close()

    def _run(self) -> None:
        try:
            for info in self._layout:
                if self._stop.is_set():
                    return
                if not info.is_floating:
                    self._put(Whole(info, self._read_whole(self._handles[-1], info)))
                    continue
                self._read_tensor(info)
            self._put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(e)

    def _put(self, item: object) -> None:
        put_until_stopped(self._ready, item, self._stop)

    def _read_whole(self, handle: "CheckpointHandle", info: "TensorInfo") -> np.ndarray:
        """A non-floating tensor of the newest input, whole, as raw bits."""
        loc = locate(handle, info.name)
        if loc is None:
            return raw_bits(handle.read(info.name))
        data = np.empty(info.numel * DTYPE_BYTES[loc.dtype], dtype=np.uint8)
        self._pread(loc, info, 0, info.numel, data, None)
        return data.view(RAW_BITS[DTYPE_BYTES[loc.dtype]])

    def _read_tensor(self, info: "TensorInfo") -> None:
        """Hand over the tensor block by block; layouts without raw locations are read whole once."""
        locations = [locate(h, info.name) for h in self._handles]
        tensors = [None if loc is not None else h.read(info.name) for h, loc in zip(self._handles, locations)]
        wholes = [None if t is None else raw_bits(t) for t in tensors]
        dtypes = tuple(loc.dtype if loc is not None else dtype_name(t.dtype)  # type: ignore[union-attr]
                       for t, loc in zip(tensors, locations))
        uniform = len(set(dtypes)) == 1
        for start in range(0, info.numel, self.block):
            stop = min(start + self.block, info.numel)
            index = self._free.get()
            if self._stop.is_set():
                return
            if self._hashes is not None:
                self._hashes.wait_for(index)
            buffer, count, parts = self._buffers[index], stop - start, []
            # Inputs back to back: packed when they share a dtype, else each in a widest-dtype slot.
            slot = count * (DTYPE_BYTES[dtypes[0]] if uniform else self._widest)
            remote: list[tuple[int, TensorLocation, np.ndarray]] = []
            for i, (whole, loc, dtype) in enumerate(zip(wholes, locations, dtypes)):
                target = buffer[i * slot:i * slot + count * DTYPE_BYTES[dtype]].view(RAW_BITS[DTYPE_BYTES[dtype]])
                if whole is not None:        # copied in beside the others, so a shared-dtype block is one array
                    np.copyto(target, whole[start:stop])
                elif isinstance(loc.path, RemotePath):   # type: ignore[union-attr]
                    remote.append((i, loc, target.view(np.uint8)))   # type: ignore[arg-type]
                else:
                    assert loc is not None
                    self._pread(loc, info, start, stop, target.view(np.uint8), index)
                parts.append(target)
            self._fetch(remote, info, start, stop, index)
            stacked = None
            if uniform:
                stacked = buffer[:len(parts) * slot].view(RAW_BITS[DTYPE_BYTES[dtypes[0]]]).reshape(len(parts), count)
            self._put(Block(info, start, stop, tuple(parts), dtypes, stacked, index))
        if info.numel == 0:
            self._put(Block(info, 0, 0, (), dtypes, None, None))

    def _pread(self, loc: TensorLocation, info: "TensorInfo", start: int, stop: int, target: np.ndarray,
               buffer_set: int | None) -> None:
        """Read elements [start, stop) of the tensor at ``loc`` into ``target`` (in ``buffer_set``, None: a
        buffer of its own) and hand the bytes to the hashing, if any; a short read is an error."""
        itemsize = DTYPE_BYTES[loc.dtype]
        want = (stop - start) * itemsize
        assert target.nbytes == want, "read buffers are sized for the widest input dtype"
        if isinstance(loc.path, RemotePath):
            self._fetch([(-1, loc, target)], info, start, stop, buffer_set)
            return
        fd = self._fds.get(loc.path)
        if fd is None:
            fd = self._fds[loc.path] = os.open(loc.path, os.O_RDONLY)
        got, view = 0, memoryview(target)
        while got < want:
            n = os.preadv(fd, [view[got:]], loc.offset + start * itemsize + got)
            if n <= 0:
                raise CheckpointReadError(loc.path, f"tensor {info.name!r}: file ended early (truncated or changed)")
            got += n
        if self._hashes is not None:
            self._hashes.feed(loc.path, loc.offset + start * itemsize, target, buffer_set)

    def _fetch(self, reads: Sequence[tuple[int, TensorLocation, np.ndarray]], info: "TensorInfo", start: int,
               stop: int, buffer_set: int | None) -> None:
        """Elements [start, stop) of remote inputs (input index, location, target) into their targets, and the
        bytes to the hashing like a local read. Index -1 (a copied tensor, read once): one request now;
        else from the windows :class:`RemotePrefetch` fetches ahead on its own thread."""
        if not reads:
            return
        if len(reads) == 1 and reads[0][0] == -1:
            _, loc, target = reads[0]
            target[:] = np.frombuffer(loc.path.read_range(*_span(loc, start, stop)), dtype=np.uint8)   # type: ignore[union-attr]
        else:
            if self._prefetch is None:
                self._prefetch = RemotePrefetch(self._handles, self._layout, self.block)
            self._prefetch.fill(info, start, [(i, target) for i, _, target in reads])
        if self._hashes is not None:
            for _, loc, target in reads:
                self._hashes.feed(loc.path, _span(loc, start, stop)[0], target, buffer_set)


def _span(loc: TensorLocation, start: int, stop: int) -> tuple[int, int]:
    """The byte range of elements [start, stop) of the tensor at ``loc``."""
    itemsize = DTYPE_BYTES[loc.dtype]
    return loc.offset + start * itemsize, loc.offset + stop * itemsize


@dataclass(frozen=True, slots=True)
class Window:
    """Elements [start, stop) of one tensor, as bytes, for each remote input (by input index)."""

    name: str
    start: int
    stop: int
    data: dict[int, bytes]


class RemotePrefetch:
    """Remote inputs' bytes fetched ahead, window by window, on a thread of its own (issue 22).

    A block (256 KiB of a bf16 input) per request would pay a round trip (10-50 ms on S3) per
    256 KiB, and fetching in the reader thread would leave the adder idle while the network works.
    So a thread walks the layout the reader will ask for, in the same order, and fetches windows of
    whole blocks (:data:`REMOTE_WINDOW_BYTES` over all remote inputs, at least :data:`MIN_WINDOW_BYTES`
    per input, never past a tensor's end, so the bytes fetched are exactly the bytes merged): every
    remote input's range of a window in one concurrent batch per store (:meth:`Store.read_spans`),
    in requests of at most :data:`REMOTE_PART_BYTES`. At most :data:`PREFETCH_WINDOWS` windows wait
    ready, one is being fetched and one read: memory stays a few windows, whatever the model.
    """

    def __init__(self, handles: Sequence["CheckpointHandle"], layout: Sequence["TensorInfo"], block: int) -> None:
        self._handles, self._layout, self._block = handles, layout, block
        self._ready: queue.Queue[Window | BaseException] = queue.Queue(maxsize=PREFETCH_WINDOWS)
        self._stop = threading.Event()
        self._held: Window | None = None
        self._thread = threading.Thread(target=self._run, name="merge-prefetch", daemon=True)
        self._thread.start()

    def fill(self, info: "TensorInfo", start: int, targets: Sequence[tuple[int, np.ndarray]]) -> None:
        """Copy elements [start, start + block) of ``info`` of each (input index, target) from the windows."""
        while self._held is None or self._held.name != info.name or not self._held.start <= start < self._held.stop:
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            self._held = item
        held = self._held
        for index, target in targets:
            offset = (start - held.start) * (len(held.data[index]) // (held.stop - held.start))
            target[:] = np.frombuffer(held.data[index], dtype=np.uint8, count=target.nbytes, offset=offset)

    def close(self) -> None:
        """Stop fetching (the merge ended or failed)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._ready.get(timeout=0.05)
            except queue.Empty:
                pass

    def _run(self) -> None:
        try:
            for info in self._layout:
                if not info.is_floating:
                    continue
                remote = {i: loc for i, h in enumerate(self._handles)
                          if (loc := locate(h, info.name)) is not None and isinstance(loc.path, RemotePath)}
                if remote:
                    self._tensor(info, remote)
            self._put(MergeError("the merge asked for remote bytes past the last window (a bug: please report it)"))
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which re-raises it
            self._put(e)

    def _tensor(self, info: "TensorInfo", remote: dict[int, TensorLocation]) -> None:
        """Fetch and queue the windows of one tensor, in order."""
        widest = max(DTYPE_BYTES[loc.dtype] for loc in remote.values())
        per_input = max(REMOTE_WINDOW_BYTES // len(remote), MIN_WINDOW_BYTES)
        step = max(self._block, per_input // widest // self._block * self._block)
        for start in range(0, info.numel, step):
            if self._stop.is_set():
                return
            stop = min(start + step, info.numel)
            self._put(Window(info.name, start, stop, _fetch_window(remote, start, stop)))

    def _put(self, item: Window | BaseException) -> None:
        put_until_stopped(self._ready, item, self._stop)


def put_until_stopped(ready: queue.Queue, item: object, stop: threading.Event) -> None:
    """Hand ``item`` to the consumer through a bounded queue, giving up once ``stop`` is set (the consumer
    left early, an error or a close): a reader thread must never block forever on a full queue."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _fetch_window(remote: dict[int, TensorLocation], start: int, stop: int) -> dict[int, bytes]:
    """Elements [start, stop) of each remote input's tensor: one batch of requests per store."""
    inputs = list(remote)
    spans = [(remote[i].path, *_span(remote[i], start, stop)) for i in inputs]
    return dict(zip(inputs, read_path_spans(spans, REMOTE_PART_BYTES)))   # type: ignore[arg-type]
