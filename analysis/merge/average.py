"""The averaged stream: every input's blocks read, added up by the adder that fits, in layout order.

:func:`stream_average` is the one loop both the merge (which writes each block) and the
evaluator search (:mod:`analysis.merge.in_memory`, which builds candidate averages in memory) go
through, so what is evaluated is exactly what would be written (the formula is in
:mod:`analysis.merge.arithmetic`). Which adder runs is :func:`arithmetic`'s choice: the compiled
kernel of :mod:`analysis.merge.fused` where it was built and covers the tensor, numpy otherwise,
torch (:mod:`analysis.merge.torch_adder`) where a float8 dtype is stored or written.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from ..checkpoints import CheckpointHandle, TensorInfo
from ..checkpoints.base import DTYPE_BYTES, RAW_BITS
from .arithmetic import NUMPY_DTYPES, Adder, NumpyAdder
from .fused import KINDS, FusedAdder, fused_kernel
from .read import BlockReader, ReadHashes, Whole

Progress = Callable[[float, str], None]
# Told the tensor and the positions of the inputs holding NaN/Inf in a block whose average is not finite.
NonFinite = Callable[[TensorInfo, tuple[int, ...]], None]
# Raw bits of each floating dtype with the sign clear and the exponent all ones (float8_e4m3fn: its NaN,
# it has no infinity): any value at or above it, either sign, is a NaN or an infinity.
NONFINITE_BITS = {"float64": 0x7FF0_0000_0000_0000, "float32": 0x7F80_0000, "float16": 0x7C00, "bfloat16": 0x7F80,
                  "float8_e5m2": 0x7C, "float8_e4m3fn": 0x7F}
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def stream_average(handles: Sequence[CheckpointHandle], weights: Sequence[float], layout: Sequence[TensorInfo],
                   progress: Progress | None = None, hashes: ReadHashes | None = None,
                   on_nonfinite: NonFinite | None = None) -> Iterator[tuple[TensorInfo, int, np.ndarray]]:
    """Yield ``(output info, start element, block)`` in ``layout`` order.

    ``layout`` is the output's headers (its dtypes); the newest input is ``handles[-1]``.
    A block is a flat numpy array whose items are as wide as the output dtype: a float
    array for float32/float16/float64, raw bits (unsigned integers) for bfloat16, float8
    and the non-floating tensors, which come whole from the newest input. A floating
    block lives in a buffer that is reused: it is valid until the next one is asked for.
    ``hashes``: where the reader hands every range it reads (the merge's sha256 of its inputs).
    ``on_nonfinite`` is told each averaged block holding a NaN or an infinity, with the inputs
    that hold one there: found in the merge's own pass (see :func:`has_nonfinite`), not by a second read.
    """
    reader = BlockReader(handles, layout, hashes)
    how = arithmetic(handles, layout)
    if how == "torch":
        # Imported here, not at the top: torch costs ~1.3 s to import and only float8 merges need it.
        from .torch_adder import TorchAdder, one_intra_op_thread
        with one_intra_op_thread():
            yield from _averaged(reader, TorchAdder(weights, reader.block), layout, progress, on_nonfinite)
        return
    if how.startswith("compiled"):
        adder: Adder = FusedAdder(weights, reader.block, fused_kernel())  # type: ignore[arg-type]
    else:
        adder = NumpyAdder(weights, reader.block)
    yield from _averaged(reader, adder, layout, progress, on_nonfinite)


def arithmetic(handles: Sequence[CheckpointHandle], layout: Sequence[TensorInfo]) -> str:
    """Which adder a merge runs: "torch" when a float8 dtype is stored or written; else "compiled"
    (:mod:`analysis.merge.fused`, where built) when it covers every tensor, "compiled and numpy" when it
    hands some to numpy (float64, inputs of mixed dtypes), or "numpy"."""
    stored_dtypes = [{i.name: i.dtype for i in h.tensors() if i.is_floating} for h in handles]
    dtypes = {i.dtype for i in layout if i.is_floating}
    dtypes |= {dtype for by_name in stored_dtypes for dtype in by_name.values()}
    if not dtypes <= NUMPY_DTYPES:
        return "torch"
    if fused_kernel() is None:
        return "numpy"
    for info in (i for i in layout if i.is_floating):
        stored = {by_name.get(info.name) for by_name in stored_dtypes}
        if info.dtype not in KINDS or len(stored) != 1 or not stored <= KINDS.keys():
            return "compiled and numpy"
    return "compiled"


def _averaged(reader: BlockReader, adder: Adder, layout: Sequence[TensorInfo], progress: Progress | None,
              on_nonfinite: NonFinite | None = None) -> Iterator[tuple[TensorInfo, int, np.ndarray]]:
    """Add up each block as the reader hands it over; report progress at each tensor's end."""
    total = max(sum(i.numel for i in layout), 1)
    done = 0
    for item in reader:
        if isinstance(item, Whole):
            yield item.info, 0, item.data
            done += item.info.numel
        elif item.buffer_set is None:
            yield item.info, item.start, np.empty(0, dtype=RAW_BITS[DTYPE_BYTES[item.info.dtype]])
        else:
            out = adder.add(item)
            if on_nonfinite is not None and has_nonfinite(out, item.info.dtype):
                on_nonfinite(item.info, tuple(i for i, (part, dtype) in enumerate(zip(item.parts, item.dtypes))
                                              if has_nonfinite(part, dtype)))
            yield item.info, item.start, out
            done += item.stop - item.start
        if progress is not None and (done == total or isinstance(item, Whole) or item.stop == item.info.numel):
            progress(done / total, item.info.name)


def has_nonfinite(block: np.ndarray, dtype: str) -> bool:
    """Whether a block of ``dtype`` values (a float array or raw bits) holds a NaN or an infinity.

    Two max reductions over the raw bits, without a temporary: a negative NaN/Inf is at or above
    ``sign | NONFINITE_BITS`` unsigned, a positive one at or above ``NONFINITE_BITS`` signed. Run on
    each averaged block (a NaN or Inf in any input makes its average one), it costs the merge a
    fraction of a pass over its output; the inputs' blocks are checked only where it is true.
    """
    threshold = NONFINITE_BITS.get(dtype)
    if threshold is None or block.size == 0:
        return False
    raw = block.view(RAW_BITS[block.itemsize])
    sign = 1 << (8 * block.itemsize - 1)
    return int(raw.max()) >= sign | threshold or int(raw.view(_SIGNED[block.itemsize]).max()) >= threshold
