"""The compiled fused kernel for the merge's inner loop, used when it was built and proves exact.

Why: numpy makes one pass over memory per operation, five or six per input element for
bfloat16 (widen, shift, weigh, add, round); ``analysis/merge/_fused.c`` makes one, which cut the
arithmetic of averaging 8 x 220M checkpoints from ~0.66 s to ~0.15 s (bfloat16) and from
~3.8 s to ~0.44 s (float16) on 2 cores.
The install builds it when a C compiler is at hand (``setup.py``, ``optional=True``); it is
called through ctypes (2 ms to import, and ctypes releases the GIL, so the reader thread
keeps reading during the call).

Trust: before the first use the kernel averages special values (signed zeros, infinities,
NaN, subnormals, rounding ties) and must write exactly the bits :class:`NumpyAdder` writes
for every dtype pair it offers (but for a NaN's payload in a float32 or float16 output, which
the contract leaves free); a kernel built with other floating-point flags fails that and is
not used, with a warning. ``CKPT_SELECT_KERNEL=numpy`` turns it off (to compare, or to rule it out).
Blocks it does not cover (float64, inputs of mixed dtypes) go to numpy.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import warnings
from typing import Callable, Sequence

import numpy as np

from ..checkpoints.base import TensorInfo
from .arithmetic import NumpyAdder
from .read import Block

# Dtype codes of analysis/merge/_fused.c.
KINDS = {"bfloat16": 0, "float32": 1, "float16": 2}
# What each output dtype is handed on as: NumpyAdder's choice (bfloat16 as raw bits).
OUTPUT_VIEWS = {"bfloat16": np.uint16, "float32": np.float32, "float16": np.float16}
# Set to "numpy" to merge without the compiled kernel.
KERNEL_ENV = "CKPT_SELECT_KERNEL"

Kernel = Callable[..., int]


@functools.cache
def fused_kernel() -> Kernel | None:
    """The loaded kernel, or None where it was not built, is turned off, or fails the exactness check."""
    if os.environ.get(KERNEL_ENV, "").strip().lower() == "numpy":
        return None
    spec = importlib.util.find_spec(f"{__package__}._fused")
    if spec is None or spec.origin is None:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    kernel = library.ckpt_fused_average
    kernel.restype = ctypes.c_int
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    if not agrees_with_numpy(kernel):
        warnings.warn(f"{spec.origin} writes other bits than numpy on special values (built with other "
                      "floating-point flags?): merging with the numpy kernel instead", RuntimeWarning, stacklevel=2)
        return None
    return kernel


class FusedAdder:
    """:class:`analysis.merge.arithmetic.NumpyAdder`'s arithmetic in one compiled pass per block.

    Covers blocks whose inputs share a dtype in ``KINDS`` and whose output dtype is in
    ``KINDS``; any other block is handed to a NumpyAdder (made on first need).
    """

    def __init__(self, weights: Sequence[float], block: int, kernel: Kernel) -> None:
        self._kernel = kernel
        self._weights = [float(w) for w in weights]
        self._block = block
        # float32(w), as the reference's ``w * x.float()`` uses it.
        self._column = np.array(self._weights, dtype=np.float32)
        self._out = np.empty(block * 4, dtype=np.uint8)
        self._fallback: NumpyAdder | None = None

    def add(self, block: Block) -> np.ndarray:
        """The block's weighted sum in the output dtype, in a buffer reused by the next call."""
        out_kind = KINDS.get(block.info.dtype)
        stacked = block.stacked
        if stacked is None or out_kind is None or block.dtypes[0] not in KINDS:
            if self._fallback is None:
                self._fallback = NumpyAdder(self._weights, self._block)
            return self._fallback.add(block)
        count = block.stop - block.start
        view = np.dtype(OUTPUT_VIEWS[block.info.dtype])
        out = self._out[:count * view.itemsize].view(view)
        status = self._kernel(stacked.ctypes.data, KINDS[block.dtypes[0]], stacked.shape[0], count,
                              self._column.ctypes.data, out.ctypes.data, out_kind)
        if status != 0:
            raise RuntimeError(f"fused kernel refused {block.dtypes[0]} -> {block.info.dtype}")
        return out


def agrees_with_numpy(kernel: Kernel) -> bool:
    """Whether the kernel writes NumpyAdder's bits on special values, for every dtype pair it covers.

    Every element bit for bit, but for the payload of a NaN in a float32 or float16 output, which
    the contract leaves free (a bfloat16 NaN must be 0xFFFF, and is compared).
    """
    weights = [0.2, 0.3, -0.7, 1.0 / 3.0]
    rows = _special_rows(weights)
    for in_dtype in KINDS:
        raw = _as_dtype_bits(rows, in_dtype)
        for out_dtype in KINDS:
            info = TensorInfo("check", (raw.shape[1],), out_dtype, raw.shape[1] * 4)
            block = Block(info, 0, raw.shape[1], tuple(raw), (in_dtype,) * len(raw), raw, 0)
            expected = NumpyAdder(weights, raw.shape[1]).add(block).copy()
            got = FusedAdder(weights, raw.shape[1], kernel).add(block)
            if not same_values(got, expected, out_dtype):
                return False
    return True


def same_values(got: np.ndarray, expected: np.ndarray, dtype: str) -> bool:
    """Bit for bit, except that any NaN matches any NaN in a float32 or float16 array."""
    if dtype == "bfloat16":
        return np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    nan = np.isnan(expected)
    bits = np.uint32 if dtype == "float32" else np.uint16
    return bool(np.array_equal(np.isnan(got), nan) and np.array_equal(got[~nan].view(bits), expected[~nan].view(bits)))


def _special_rows(weights: Sequence[float]) -> np.ndarray:
    """Inputs of float32 bits where any fused multiply-add, flush-to-zero, wrong rounding or
    dropped ``0.0 +`` shows: specials in every position, random values of many magnitudes, and a
    column whose products are all -0.0 (the sum must start from +0.0, as the reference's does)."""
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 1e-45, 3.0e38, -3.0e38,
                       1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -9, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -23,
                       0.1, 1e-30, 7.0, 6e-8, -6e-8, 3e-8, 2.98023224e-8, 6.1e-5, 65504.0, 65519.0, 65520.0, 7e4],
                      dtype=np.float32)
    count = 3000     # more than one of the kernel's chunks, and not a multiple of any vector width
    tiled = np.resize(values, count)
    random = np.random.default_rng(0).standard_normal(count).astype(np.float32) * np.float32(1e3)
    rows = np.stack([np.roll(tiled, i) if i % 2 == 0 else random * np.float32(i) for i in range(len(weights))])
    rows[:, 1] = [-np.copysign(np.float32(0.0), w) for w in weights]
    return np.ascontiguousarray(rows).view(np.uint32)


def _as_dtype_bits(rows: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 rows as ``dtype``'s bits: bfloat16 by truncation (which keeps every special),
    float16 by numpy's rounding (overflow to infinity, subnormals and zeros included)."""
    if dtype == "float32":
        return rows
    if dtype == "bfloat16":
        return np.ascontiguousarray((rows >> 16).astype(np.uint16))
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(rows.view(np.float32).astype(np.float16).view(np.uint16))
