"""The torch adder: :mod:`analysis.merge.arithmetic`'s arithmetic for dtypes numpy lacks (float8).

Same contract, same order of operations, same single rounding; only the library differs,
so it is used where numpy cannot convert an input or an output (float8 checkpoints).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from .read import Block
from ..checkpoints.base import raw_bits

_threads_lock = threading.Lock()
_threads_users = [0, 0]   # merges running, intra-op threads to restore when the last one ends


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


def as_tensor(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """Raw bits (or a numpy float array) as a torch tensor of ``dtype``, sharing the memory."""
    return torch.from_numpy(raw).view(getattr(torch, dtype))


class TorchAdder:
    """The arithmetic of :class:`analysis.merge.arithmetic.NumpyAdder`, in torch kernels."""

    def __init__(self, weights: Sequence[float], block: int) -> None:
        n = len(weights)
        self._column = torch.tensor([float(w) for w in weights], dtype=torch.float32).reshape(n, 1)
        self._products = torch.empty(n * block, dtype=torch.float32)
        self._acc = torch.empty(block, dtype=torch.float32)
        self._outputs: dict[str, torch.Tensor] = {}

    def add(self, block: Block) -> np.ndarray:
        """The block's weighted sum rounded once to the output dtype, as raw bits."""
        count = block.stop - block.start
        products = self._products[:len(block.parts) * count].view(len(block.parts), count)
        if block.stacked is not None:   # = x.float(): exact for 16-bit floats, rounds float64 as .float() does
            products.copy_(as_tensor(block.stacked, block.dtypes[0]))
        else:
            for row, part, dtype in zip(products, block.parts, block.dtypes):
                row.copy_(as_tensor(part, dtype))
        products.mul_(self._column[:len(block.parts)])
        acc = self._acc[:count]
        torch.add(products[0], 0.0, out=acc)
        for row in products[1:]:
            acc.add_(row)
        dtype = block.info.dtype
        if dtype == "float32":
            return acc.numpy()
        out = self._outputs.get(dtype)
        if out is None:
            out = self._outputs[dtype] = torch.empty(self._acc.numel(), dtype=getattr(torch, dtype))
        return raw_bits(out[:count].copy_(acc))   # one rounding (to nearest even), as acc.to(dtype) does
