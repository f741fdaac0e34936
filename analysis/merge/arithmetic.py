"""The merge's inner loop: block-wise float32 accumulation, in numpy, without importing torch.

The arithmetic (the contract the bit-identity test pins) for every element:

    acc = 0.0 (float32)
    for x, w in inputs, oldest first:
        acc = acc + float32(w) * float32(x)     # two float32 roundings: the product, the sum
    out = acc rounded once (to nearest even) to the output dtype

i.e. ``acc = torch.zeros(shape); for x, w in ...: acc += w * x.float()`` in plain torch.
Each step is a single correctly rounded IEEE operation, so the result does not depend on
the library, the block size, the vector width or the number of threads: numpy and torch
give the same bits. NaN is the one value with a choice of bits: a NaN that reaches a
bfloat16 output is written as ``0xFFFF``, as torch's vectorised conversion writes it.

Why numpy: importing torch takes ~1.3 s, more than the whole arithmetic of averaging
8 x 220M bfloat16 checkpoints on 2 cores, and the merge of safetensors inputs needs none of
torch. numpy has float32, float16 and float64; bfloat16 is the top half of a float32, so
it is converted with a shift and rounded with integer arithmetic (round half to even:
``(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16``), exactly as torch does. Inputs or outputs
in a float8 dtype, which numpy does not have, go through :mod:`analysis.merge.torch_adder`.

Where the install compiled :mod:`analysis.merge.fused`'s kernel (and it proves to write these
same bits), blocks of bfloat16/float16/float32 go through it instead: one pass over memory per
block instead of one per numpy operation. Reads happen ahead on a thread
(:mod:`analysis.merge.read`); numpy and the compiled kernel release the GIL, so reading
block k+1 overlaps adding up block k.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .read import Block

# Floating dtypes numpy converts to and from float32 exactly as torch does.
NUMPY_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
# What a NaN becomes in a bfloat16 output (torch's vectorised float32 -> bfloat16 conversion writes this).
BF16_NAN = 0xFFFF


class Adder(Protocol):
    """Adds up one block of every input and rounds it to the output dtype."""

    def add(self, block: Block) -> np.ndarray:
        """The block's weighted sum in the output dtype (raw bits or a numpy float array), valid until the next call."""
        ...


class NumpyAdder:
    """The module docstring's arithmetic on one block at a time, in numpy, with no allocation per block.

    One thread: a helper thread taking half of each block was tried (ranges of 16 Ki-64 Ki
    columns) and made 8 x 220M bf16 slower (0.79 -> 1.1-2.2 s on 2 cores): the adding is
    bound by memory traffic, which a second core shares, and by per-call overhead, which
    smaller ranges multiply.
    """

    def __init__(self, weights: Sequence[float], block: int) -> None:
        n = len(weights)
        # float32(w), as the reference's ``w * x.float()`` uses it (a Python scalar is cast to float32).
        self._column = np.array([float(w) for w in weights], dtype=np.float32).reshape(n, 1)
        self._products = np.empty((n, block), dtype=np.float32)
        self._acc = np.empty(block, dtype=np.float32)
        self._bits = np.empty(block, dtype=np.uint32)
        self._out16 = np.empty(block, dtype=np.uint16)

    def add(self, block: Block) -> np.ndarray:
        """``products[i] = float32(x_i) * float32(w_i)`` for all inputs (one conversion and one
        multiplication when they share a dtype), the sum in input order, then one rounding.

        ``0.0 + p0`` starts the sum as the reference's zeroed accumulator does (a -0.0 product
        becomes +0.0), in one pass instead of a fill and an add. The result is a view of a
        reused buffer.
        """
        with np.errstate(all="ignore"):   # IEEE results (inf, NaN) are the contract, not errors
            count = block.stop - block.start
            products = self._products[:len(block.parts), :count]
            if block.stacked is not None:
                _weigh(block.stacked, block.dtypes[0], self._column, products)
            else:
                for i, (part, dtype) in enumerate(zip(block.parts, block.dtypes)):
                    _weigh(part.reshape(1, count), dtype, self._column[i:i + 1], products[i:i + 1])
            acc = self._acc[:count]
            np.add(products[0], np.float32(0.0), out=acc)
            for row in products[1:]:
                np.add(acc, row, out=acc)
            return self._round(acc, block.info.dtype)

    def _round(self, acc: np.ndarray, dtype: str) -> np.ndarray:
        """``acc`` rounded to nearest, ties to even, to ``dtype`` (in a reused buffer)."""
        if dtype == "float32":
            return acc
        out = self._out16[:acc.size]
        if dtype == "float16":
            half = out.view(np.float16)
            np.copyto(half, acc, casting="same_kind")
            return half
        if dtype == "float64":
            return acc.astype(np.float64)
        bits, work = acc.view(np.uint32), self._bits[:acc.size]   # bfloat16: the rounded top half
        np.right_shift(bits, 16, out=work)
        np.bitwise_and(work, 1, out=work)
        np.add(work, 0x7FFF, out=work)
        np.add(work, bits, out=work)
        np.right_shift(work, 16, out=out, casting="unsafe")
        nan = np.isnan(acc)
        if nan.any():
            out[nan] = BF16_NAN
        return out


def _weigh(raw: np.ndarray, dtype: str, column: np.ndarray, products: np.ndarray) -> None:
    """``products = float32(raw viewed as dtype) * column``: the conversion and the weighting."""
    if dtype == "float32":
        np.multiply(raw.view(np.float32), column, out=products)
        return
    if dtype == "bfloat16":      # a bfloat16 is the top half of the float32 with the same value
        bits = products.view(np.uint32)
        np.copyto(bits, raw)     # widen, then shift: faster than one shift with a cast (~0.22 vs 0.32 s per 1.8 G)
        np.left_shift(bits, 16, out=bits)
    else:                        # float16 widens exactly; float64 rounds to nearest, as .float() does
        np.copyto(products, raw.view(np.dtype(dtype)), casting="same_kind")
    np.multiply(products, column, out=products)
