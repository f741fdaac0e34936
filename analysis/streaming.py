"""The merge's inner loop: block-wise float32 accumulation with the reads done ahead by a thread.

Why blocks: a weighted average is element-wise, so it can run over a block of a few
hundred thousand elements of every input at a time. The block of the accumulator
stays in the CPU cache while each input's block is added to it, memory holds a few
blocks instead of whole tensors (let alone whole models), and the result can be written
block by block.

Why a reader thread: safetensors inputs are read with ``os.preadv`` straight into
reusable buffers (no memory map, so the inputs' pages never count against the
process's resident memory). ``preadv`` and torch's kernels both release the GIL, so the
thread reads block k+1 of every input while the main thread adds up block k. A block's
inputs are read back to back into one buffer, so (sharing a dtype, the usual case) they
form one ``[inputs, count]`` tensor: the main thread converts it to float32 and multiplies
it by the weight column in one torch call each, then adds the rows in input order into an
accumulator and rounds into a reused output buffer (about 11 torch calls per block for 8
inputs instead of 26, no allocation per block). Measured on 8 x 220M bf16 (2 busy cores):
the main thread's CPU time went from ~1.0-1.4 s to ~0.4-0.5 s; reading (a page-cache copy,
~0.5-1 s) is now the longest stage. A second reader thread was tried and was slower (more
CPU, contention on 2 cores); a memory map plus conversion cost as much as read plus conversion.

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

# Most elements per block: 128 Ki. A block's inputs are converted and weighted as one [inputs, block]
# float32 tensor (4 MiB for 8 inputs) that should stay in the CPU cache with the accumulator; larger
# blocks made 8 x 220M bf16 slower (1 Mi: ~1.9-2.1 s, 256 Ki: ~1.2-1.5 s, 128 Ki: ~1.0-1.4 s on 2 busy cores).
BLOCK_ELEMENTS = 1 << 17
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
    parts: tuple[torch.Tensor, ...]   # every input's elements, oldest first
    stacked: torch.Tensor | None      # the same as one [inputs, count] tensor when they share a dtype
    buffer_set: int | None            # returned to the reader when done (None: an empty tensor)


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
    return BUFFER_SETS * len(handles) * block * widest + len(handles) * block * 4 + 2 * block * 4


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
    """Reads every input's blocks, in order, into rotating buffers on a background thread.

    A block's inputs are read one after another into one buffer, so when they share a dtype
    (the usual case) they form a single ``[inputs, count]`` tensor that the consumer converts
    and weights with one torch call each, instead of one per input.
    """

    def __init__(self, handles: Sequence[CheckpointHandle], layout: Sequence[TensorInfo]) -> None:
        self._handles, self._layout = handles, layout
        self._fds: dict[Path, int] = {}
        self._free: queue.Queue[int] = queue.Queue()
        self._ready: queue.Queue[object] = queue.Queue(maxsize=BUFFER_SETS)
        self._stop = threading.Event()
        self._widest = widest_input(handles)
        self.block = block_elements(len(handles), self._widest)
        self._buffers = [torch.empty(len(handles) * self.block * self._widest, dtype=torch.uint8)
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
        dtypes = {loc.dtype for loc in locations if loc is not None}
        uniform = all(w is None for w in wholes) and len(dtypes) == 1
        for start in range(0, info.numel, self.block):
            stop = min(start + self.block, info.numel)
            index = self._free.get()
            if self._stop.is_set():
                return
            buffer, count, parts = self._buffers[index], stop - start, []
            # Inputs back to back: packed when they share a dtype, else each in a widest-dtype slot.
            slot = count * (DTYPE_BYTES[locations[0].dtype] if uniform else self._widest)  # type: ignore[union-attr]
            for i, (whole, loc) in enumerate(zip(wholes, locations)):
                if whole is not None:
                    parts.append(whole[start:stop])
                    continue
                width = count * DTYPE_BYTES[loc.dtype]   # type: ignore[union-attr]
                parts.append(self._pread(loc, info, start, stop, buffer[i * slot:i * slot + width]))
            stacked = None
            if uniform:
                stacked = buffer[:len(parts) * slot].view(getattr(torch, locations[0].dtype)).view(len(parts), count)
            self._put(Block(info, start, stop, tuple(parts), stacked, index))
        if info.numel == 0:
            self._put(Block(info, 0, 0, (), None, None))

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
    A non-floating tensor comes as one block holding the newest input's tensor. A floating
    block lives in a buffer that is reused: it is valid until the next one is asked for
    (copy it to keep it).
    """
    total = max(sum(i.numel for i in layout), 1)
    reader = _Reader(handles, layout)
    # float32(w), as the reference's ``w * x.float()`` uses it (a Python scalar is cast to float32).
    column = torch.tensor([float(w) for w in weights], dtype=torch.float32).reshape(len(handles), 1)
    products = torch.empty(len(handles) * reader.block, dtype=torch.float32)
    acc = torch.empty(reader.block, dtype=torch.float32)
    outputs = {dtype: torch.empty(reader.block, dtype=getattr(torch, dtype))
               for dtype in {i.dtype for i in layout if i.is_floating} - {"float32"}}
    with one_intra_op_thread():
        yield from _averaged(reader, column, products, acc, outputs, total, progress)


def _averaged(reader: "_Reader", column: torch.Tensor, products: torch.Tensor, acc: torch.Tensor,
              outputs: dict[str, torch.Tensor], total: int, progress: Callable[[float, str], None] | None) -> Iterator[tuple[TensorInfo, int, torch.Tensor]]:
    """The body of :func:`stream_average`: add up each block's products as the reader hands them over."""
    done = 0
    for item in reader:
        if isinstance(item, Whole):
            yield item.info, 0, item.tensor
            done += item.info.numel
        elif item.buffer_set is None:
            yield item.info, item.start, torch.empty(0, dtype=getattr(torch, item.info.dtype))
        else:
            count = item.stop - item.start
            out = outputs.get(item.info.dtype)
            rows = products[:len(item.parts) * count].view(len(item.parts), count)
            yield item.info, item.start, _add_block(item, rows, column, acc[:count],
                                                    None if out is None else out[:count])
            done += count
        if progress is not None and (done == total or isinstance(item, Whole) or item.stop == item.info.numel):
            progress(done / total, item.info.name)


def _add_block(block: Block, products: torch.Tensor, weights: torch.Tensor, acc: torch.Tensor,
               out: torch.Tensor | None) -> torch.Tensor:
    """The module docstring's arithmetic on one block; returns it rounded into ``out`` (or ``acc`` for float32).

    ``products[i] = float32(x_i) * float32(w_i)`` for all inputs at once (one conversion, one
    multiplication), then the sum in input order. ``0.0 + p0`` starts it as the reference's
    zeroed accumulator does (a -0.0 product becomes +0.0), in one pass instead of a fill and an add.
    """
    if block.stacked is not None:
        products.copy_(block.stacked)   # = x.float(): exact for 16-bit floats, rounds float64 as .float() does
    else:
        for row, part in zip(products, block.parts):
            row.copy_(part)
    products.mul_(weights)
    torch.add(products[0], 0.0, out=acc)
    for row in products[1:]:
        acc.add_(row)
    if out is None:         # float32 output: the accumulator is the result
        return acc
    return out.copy_(acc)   # one rounding (to nearest even), as acc.to(dtype) does
