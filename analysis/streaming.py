"""The merge's inner loop: block-wise float32 accumulation with the reads done ahead by a thread.

Why blocks: a weighted average is element-wise, so it can run over a block of a few
hundred thousand elements of every input at a time. The block of the accumulator
stays in the CPU cache while each input's block is added to it, memory holds a few
blocks instead of whole tensors (let alone whole models), and the result can be written
block by block.

Why a reader thread: safetensors inputs are read with ``os.preadv`` straight into
reusable buffers (no memory map, so the inputs' pages never count against the
process's resident memory). ``preadv`` and torch's kernels both release the GIL, so the
thread reads block k+1 of every input while the main thread adds up block k.

The arithmetic (the contract the bit-identity test pins) for every element:

    acc = 0.0 (float32)
    for x, w in inputs, oldest first:
        acc = acc + float32(w) * float32(x)     # two float32 roundings: the product, the sum
    out = acc rounded once (to nearest even) to the output dtype

i.e. ``acc = torch.zeros(shape); for x, w in ...: acc += w * x.float()`` in plain torch.
Each step is a single correctly rounded operation, so the result does not depend on the
block size, the vector width or the number of threads.
"""

from __future__ import annotations

import os
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .checkpoints import CheckpointHandle, TensorInfo
from .checkpoints.base import DTYPE_BYTES
from .errors import CheckpointReadError

# Most elements per block: 1 Mi float32 = 4 MiB of accumulator. Fewer, larger torch calls cost less
# per element than cache-sized ones (measured: 1.7 s vs 2.0 s for 8 x 220M bf16).
BLOCK_ELEMENTS = 1 << 20
# Fewest elements per block, whatever the number of inputs.
MIN_BLOCK_ELEMENTS = 1 << 16
# The read buffers of all inputs together stay under this, so memory stays flat as inputs are added.
BUFFER_BUDGET_BYTES = 64 << 20
# Buffer sets in rotation between the reader thread and the adder (one being read, one being added, one spare).
BUFFER_SETS = 3
_threads_lock = threading.Lock()
_threads_users = [0, 0]   # merges running, intra-op threads to restore when the last one ends


@dataclass(frozen=True, slots=True)
class TensorLocation:
    """Where a tensor's raw little-endian bytes sit in a file (safetensors layouts)."""

    path: Path
    offset: int     # bytes from the start of the file
    dtype: str


@dataclass(frozen=True, slots=True)
class Block:
    """Elements ``[start, stop)`` of tensor ``info``: one block per input, oldest first."""

    info: TensorInfo
    start: int
    stop: int
    parts: tuple[torch.Tensor, ...]
    buffer_set: int | None      # returned to the reader when done (None: views of whole tensors)


@dataclass(frozen=True, slots=True)
class Whole:
    """A tensor that is copied, not averaged (not floating point): the newest input's."""

    info: TensorInfo
    tensor: torch.Tensor


def locate(handle: object, name: str) -> TensorLocation | None:
    """The raw location of ``name`` if the handle's layout has one (safetensors), else None."""
    method = getattr(handle, "locate", None)
    return method(name) if callable(method) else None


def widest_input(handles: Sequence[CheckpointHandle]) -> int:
    """Bytes per element of the widest floating tensor any input stores (sizes the read buffers)."""
    return max((DTYPE_BYTES[i.dtype] for h in handles for i in h.tensors() if i.is_floating), default=4)


def block_elements(n_inputs: int, itemsize: int) -> int:
    """Elements per block: BLOCK_ELEMENTS, halved until every input's buffers fit the budget."""
    block = BLOCK_ELEMENTS
    while block > MIN_BLOCK_ELEMENTS and BUFFER_SETS * n_inputs * itemsize * block > BUFFER_BUDGET_BYTES:
        block //= 2
    return block


def buffer_bytes(handles: Sequence[CheckpointHandle]) -> int:
    """Memory the reader's buffers and the accumulator take: what the dry run adds to its projection."""
    widest = widest_input(handles)
    block = block_elements(len(handles), widest)
    return BUFFER_SETS * len(handles) * block * widest + 2 * block * 4


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run torch's kernels on the calling thread only while merges run.

    Why: the reader thread already keeps a second core busy, and when the machine is shared
    every multi-threaded kernel waits at a barrier for a descheduled worker: on 2 busy cores a
    merge took 24-40 s with 2 intra-op threads and 1.7-2.0 s with one. Restored when the last
    concurrent merge ends.
    """
    with _threads_lock:
        if _threads_users[0] == 0:
            _threads_users[1] = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users[0] += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users[0] -= 1
            if _threads_users[0] == 0:
                torch.set_num_threads(_threads_users[1])


class _Reader:
    """Reads every input's blocks, in order, into rotating buffers on a background thread."""

    def __init__(self, handles: Sequence[CheckpointHandle], layout: Sequence[TensorInfo]) -> None:
        self._handles, self._layout = handles, layout
        self._fds: dict[Path, int] = {}
        self._free: queue.Queue[int] = queue.Queue()
        self._ready: queue.Queue[object] = queue.Queue(maxsize=BUFFER_SETS)
        self._stop = threading.Event()
        widest = widest_input(handles)
        self.block = block_elements(len(handles), widest)
        self._buffers = [[torch.empty(self.block * widest, dtype=torch.uint8) for _ in handles]
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

    def _run(self) -> None:
        try:
            for info in self._layout:
                if self._stop.is_set():
                    return
                if not info.is_floating:
                    self._put(Whole(info, self._handles[-1].read(info.name)))
                    continue
                self._read_tensor(info)
            self._put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(e)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _read_tensor(self, info: TensorInfo) -> None:
        """Hand over the tensor block by block; layouts without raw locations are read whole once."""
        locations = [locate(h, info.name) for h in self._handles]
        wholes = [None if loc is not None else h.read(info.name).reshape(-1) for h, loc in zip(self._handles, locations)]
        for start in range(0, info.numel, self.block):
            stop = min(start + self.block, info.numel)
            if all(w is not None for w in wholes):
                self._put(Block(info, start, stop, tuple(w[start:stop] for w in wholes), None))  # type: ignore[index]
                continue
            index = self._free.get()
            if self._stop.is_set():
                return
            parts = tuple(w[start:stop] if w is not None else self._pread(loc, info, start, stop, self._buffers[index][i])
                          for i, (w, loc) in enumerate(zip(wholes, locations)))
            self._put(Block(info, start, stop, parts, index))
        if info.numel == 0:
            self._put(Block(info, 0, 0, tuple(torch.empty(0, dtype=getattr(torch, info.dtype)) for _ in wholes), None))

    def _pread(self, loc: TensorLocation | None, info: TensorInfo, start: int, stop: int,
               buffer: torch.Tensor) -> torch.Tensor:
        """Read elements [start, stop) of the tensor at ``loc`` into ``buffer``; a short read is an error."""
        assert loc is not None
        itemsize = DTYPE_BYTES[loc.dtype]
        want = (stop - start) * itemsize
        view = buffer[:want]
        assert view.numel() == want, "read buffers are sized for the widest input dtype"
        fd = self._fds.get(loc.path)
        if fd is None:
            fd = self._fds[loc.path] = os.open(loc.path, os.O_RDONLY)
        got, target = 0, memoryview(view.numpy())
        while got < want:
            n = os.preadv(fd, [target[got:]], loc.offset + start * itemsize + got)
            if n <= 0:
                raise CheckpointReadError(loc.path, f"tensor {info.name!r}: file ended early (truncated or changed)")
            got += n
        return view.view(getattr(torch, loc.dtype))


def stream_average(handles: Sequence[CheckpointHandle], weights: Sequence[float], layout: Sequence[TensorInfo],
                   progress: Callable[[float, str], None] | None = None
                   ) -> Iterator[tuple[TensorInfo, int, torch.Tensor]]:
    """Yield ``(output info, start element, block in the output dtype)`` in ``layout`` order.

    ``layout`` is the output's headers (its dtypes); the newest input is ``handles[-1]``.
    A non-floating tensor comes as one block holding the newest input's tensor.
    """
    total = max(sum(i.numel for i in layout), 1)
    reader = _Reader(handles, layout)
    acc = torch.empty(reader.block, dtype=torch.float32)
    scratch = torch.empty(reader.block, dtype=torch.float32)
    with one_intra_op_thread():
        yield from _averaged(reader, weights, acc, scratch, total, progress)


def _averaged(reader: "_Reader", weights: Sequence[float], acc: torch.Tensor, scratch: torch.Tensor, total: int,
              progress: Callable[[float, str], None] | None) -> Iterator[tuple[TensorInfo, int, torch.Tensor]]:
    """The body of :func:`stream_average`: average each block as the reader hands it over."""
    done = 0
    for item in reader:
        if isinstance(item, Whole):
            yield item.info, 0, item.tensor
            done += item.info.numel
        else:
            count = item.stop - item.start
            yield item.info, item.start, _add_block(item.parts, weights, acc[:count], scratch[:count], item.info.dtype)
            done += count
        if progress is not None and (done == total or isinstance(item, Whole) or item.stop == item.info.numel):
            progress(done / total, item.info.name)


def _add_block(parts: Sequence[torch.Tensor], weights: Sequence[float], acc: torch.Tensor, scratch: torch.Tensor,
               out_dtype: str) -> torch.Tensor:
    """The module docstring's arithmetic on one block; returns it rounded to ``out_dtype``."""
    acc.zero_()
    for part, weight in zip(parts, weights):
        if part.dtype == torch.float32:
            torch.mul(part, weight, out=scratch)
        else:
            scratch.copy_(part)     # = part.float(): exact for 16-bit floats, rounds float64 as .float() does
            scratch.mul_(weight)
        acc.add_(scratch)
    return acc.to(getattr(torch, out_dtype))
