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


def stream_average(handles: Sequence[CheckpointHandle], weights: Sequence[float], layout: Sequence[TensorInfo],
                   progress: Progress | None = None,
                   hashes: ReadHashes | None = None) -> Iterator[tuple[TensorInfo, int, np.ndarray]]:
    """Yield ``(output info, start element, block)`` in ``layout`` order.

    ``layout`` is the output's headers (its dtypes); the newest input is ``handles[-1]``.
    A block is a flat numpy array whose items are as wide as the output dtype: a float
    array for float32/float16/float64, raw bits (unsigned integers) for bfloat16, float8
    and the non-floating tensors, which come whole from the newest input. A floating
    block lives in a buffer that is reused: it is valid until the next one is asked for.
    ``hashes``: where the reader hands every range it reads (the merge's sha256 of its inputs).
    """
    reader = BlockReader(handles, layout, hashes)
    how = arithmetic(handles, layout)
    if how == "torch":
        # Imported here, not at the top: torch costs ~1.3 s to import and only float8 merges need it.
        from .torch_adder import TorchAdder, one_intra_op_thread
        with one_intra_op_thread():
            yield from _averaged(reader, TorchAdder(weights, reader.block), layout, progress)
        return
    if how.startswith("compiled"):
        adder: Adder = FusedAdder(weights, reader.block, fused_kernel())  # type: ignore[arg-type]
    else:
        adder = NumpyAdder(weights, reader.block)
    yield from _averaged(reader, adder, layout, progress)


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


def _averaged(reader: BlockReader, adder: Adder, layout: Sequence[TensorInfo],
              progress: Progress | None) -> Iterator[tuple[TensorInfo, int, np.ndarray]]:
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
            yield item.info, item.start, adder.add(item)
            done += item.stop - item.start
        if progress is not None and (done == total or isinstance(item, Whole) or item.stop == item.info.numel):
            progress(done / total, item.info.name)
