"""The merge's plan, from the inputs' headers: weights, the common layout, the output's dtypes, the dry run.

Nothing here reads a tensor, but the dry run's probe: :func:`project` averages the first blocks
of the largest tensor twice to project the merge's time, and its peak memory from the
reader's buffers. The files the output will have are planned by :mod:`analysis.merge.output`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..checkpoints import CheckpointHandle, TensorInfo
from ..checkpoints.base import DTYPE_BYTES
from ..checkpoints.location import locate
from ..errors import CheckpointMismatch, InvalidArgument
from ..recipe import OUTPUT_DTYPES
from .average import stream_average
from .output import OutputPlan
from .read import BLOCK_ELEMENTS, buffer_bytes

# The dry run's probe averages this many blocks of the largest tensor (32 MiB per bf16 input): fixed costs
# (thread start, the first read, which nothing overlaps) must be small beside it. With the compiled kernel
# a block takes ~0.1 ms, and 32 blocks projected 0.6-2.0 s for a 0.5 s merge of 8 x 220M bf16; 128: 0.4-0.6 s.
PROBE_BLOCKS = 128


def normalize_weights(weights: Sequence[float], count: int) -> tuple[float, ...]:
    """Validate weights (finite, >= 0, one per checkpoint, positive sum) and scale them to sum to 1."""
    if len(weights) != count:
        raise InvalidArgument(f"got {len(weights)} weights for {count} checkpoints")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise InvalidArgument(f"weights must be finite and non-negative, got {list(weights)}")
    total = math.fsum(weights)
    if total <= 0:
        raise InvalidArgument("weights sum to zero")
    return tuple(w / total for w in weights)


def output_layout(infos: list[TensorInfo], output_dtype: str) -> list[TensorInfo]:
    """The output's tensor headers: floating tensors take ``output_dtype`` unless it is 'same'."""
    if output_dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {output_dtype!r}")
    layout = []
    for info in infos:
        dtype = info.dtype if (output_dtype == "same" or not info.is_floating) else output_dtype
        layout.append(TensorInfo(info.name, info.shape, dtype, info.numel * DTYPE_BYTES[dtype]))
    return layout


def check_same_layout(handles: Sequence[CheckpointHandle]) -> list[TensorInfo]:
    """The common tensor list of all inputs, or CheckpointMismatch naming every difference."""
    reference = handles[-1].tensors()
    ref_map = {i.name: i for i in reference}
    problems = []
    for handle in handles[:-1]:
        infos = {i.name: i for i in handle.tensors()}
        missing = sorted(set(ref_map) - set(infos))
        extra = sorted(set(infos) - set(ref_map))
        shapes = [f"{n}: {infos[n].shape} vs {ref_map[n].shape}" for n in sorted(set(infos) & set(ref_map))
                  if infos[n].shape != ref_map[n].shape]
        for label, items in (("missing", missing), ("extra", extra), ("shape differs", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                problems.append(f"{handle.path.name} vs {handles[-1].path.name}: {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointMismatch("checkpoints do not share tensors: " + "; ".join(problems))
    return reference


# A first probe pass this many times slower than the second read its inputs from storage, not the page cache
# (thread start-up and loading the kernel, the first pass's other costs, stay well under this with 128 blocks).
UNCACHED_RATIO = 1.5

# How the dry run names each adder (analysis.merge.average.arithmetic).
ARITHMETIC = {"compiled": "compiled kernel",
              "compiled and numpy": "compiled kernel, numpy for tensors of other dtypes or mixed dtypes",
              "numpy": "numpy kernel, no compiled one was built", "torch": "torch, for float8"}


@dataclass(frozen=True, slots=True)
class Projection:
    """The dry run's time estimate, from two passes of the speed probe."""

    seconds: float                  # with the inputs in the page cache (the faster pass's speed)
    probe_mb_per_s: float           # input MB read and averaged per second in the faster pass
    uncached_seconds: float | None  # at the first pass's speed, when it read from storage; else None


@dataclass(frozen=True, slots=True)
class MergePlan:
    """What ``--dry-run`` reports: nothing is written to produce it."""

    inputs: tuple[tuple[Path, int], ...]        # path, bytes
    out_dir: Path
    files: tuple[str, ...]                      # written into out_dir
    output_bytes: int
    n_tensors: int
    replaces_existing: bool
    free_bytes: int
    peak_memory_bytes: int                      # this process now + the merge's buffers
    projection: Projection
    arithmetic: str                             # the adder that runs (analysis.merge.average.arithmetic)

    @property
    def input_bytes(self) -> int:
        """What the merge reads: every input's size."""
        return sum(size for _, size in self.inputs)

    @property
    def projected_seconds(self) -> float:
        """With the inputs in the page cache."""
        return self.projection.seconds

    @property
    def probe_mb_per_s(self) -> float:
        """Input MB read and averaged per second in the probe's faster pass."""
        return self.projection.probe_mb_per_s

    def describe(self) -> list[str]:
        """Plain lines for the command line."""
        lines = [f"would read {len(self.inputs)} checkpoints, {self.input_bytes / 1e6:,.1f} MB:"]
        lines += [f"  {path}  ({size / 1e6:,.1f} MB)" for path, size in self.inputs]
        verb = "replace" if self.replaces_existing else "write"
        lines.append(f"would {verb} {self.out_dir} ({self.n_tensors} tensors, {self.output_bytes / 1e6:,.1f} MB):")
        lines += [f"  {name}" for name in self.files]
        lines.append(f"free disk: {self.free_bytes / 1e9:,.2f} GB")
        lines.append(f"projected peak memory: {self.peak_memory_bytes / 1e6:,.0f} MB")
        lines.append(f"projected time: {self.projected_seconds:,.1f} s with the inputs in the page cache "
                     f"(probe: {self.probe_mb_per_s:,.0f} MB/s of input read and averaged, {ARITHMETIC[self.arithmetic]})")
        if self.projection.uncached_seconds is not None:
            lines.append(f"projected time from storage: {self.projection.uncached_seconds:,.1f} s (the probe's first "
                         "read was slower: the inputs are not all in the page cache)")
        return lines


def project(handles: Sequence[CheckpointHandle], weights: Sequence[float], layout: list[TensorInfo],
            plan: OutputPlan) -> tuple[int, Projection]:
    """(projected peak memory bytes, projected time) for merging ``handles``.

    The probe averages the first blocks of the largest tensor twice, reading the real inputs
    the way the merge does, and scales the time by the bytes to read and write.
    """
    import psutil   # imported here, not at the top: only the dry run needs it (a merge skips its import)

    floating = [i for i in layout if i.is_floating] or layout
    largest = max(floating, key=lambda i: i.numel)
    whole = [h for h in handles if locate(h, largest.name) is None]
    extra = len(whole) * max(i.size_bytes for i in layout) + max((i.size_bytes for i in layout if not i.is_floating),
                                                                 default=0)
    peak = psutil.Process().memory_info().rss + buffer_bytes(handles) + extra
    probe = TensorInfo(largest.name, (min(largest.numel, PROBE_BLOCKS * BLOCK_ELEMENTS),), largest.dtype,
                       0)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        for _ in stream_average(handles, weights, [probe]):
            pass
        times.append(time.perf_counter() - start)
    itemsizes = sum(_input_itemsizes(handles, largest))
    total_read = sum(i.numel for i in layout) * itemsizes
    return peak, projection(times[0], times[1], probe.numel * itemsizes, total_read, plan.data_bytes)


def projection(first_s: float, second_s: float, probe_bytes: int, read_bytes: int, write_bytes: int) -> Projection:
    """Scale the probe's passes to the whole merge.

    The faster pass is the merge with its inputs in the page cache; writing goes into the
    page cache about as fast as reading comes from it, so it is counted at the same rate.
    A first pass more than UNCACHED_RATIO x slower than the second read its inputs from
    storage (the second found them cached): a merge of inputs that are not in the page cache,
    the usual case for hundreds of gigabytes, reads at that first speed, so it is projected too.
    """
    first_s, second_s = max(first_s, 1e-6), max(second_s, 1e-6)
    warm_rate = probe_bytes / min(first_s, second_s)
    seconds = (read_bytes + write_bytes) / warm_rate
    uncached = None
    if first_s > UNCACHED_RATIO * second_s:
        uncached = read_bytes / (probe_bytes / first_s) + write_bytes / warm_rate
    return Projection(seconds, warm_rate / 1e6, uncached)


def _input_itemsizes(handles: Sequence[CheckpointHandle], info: TensorInfo) -> list[int]:
    """Bytes per element of ``info`` in each input."""
    sizes = []
    for handle in handles:
        match = next((i for i in handle.tensors() if i.name == info.name), None)
        sizes.append(match.size_bytes // max(match.numel, 1) if match else 4)
    return sizes
