"""The merge as work units on an executor (issue 22): planned on the driver, each output shard a unit.

Shape (after Megatron-LM's ``tools/checkpoint/weighted_merge.py``): the driver plans from headers only,
splits the output's tensors into groups by estimated bytes moved, largest first, and hands each group
to an executor as a :class:`MergeUnit`. A unit opens every input itself (path or URL), streams its
tensors through :func:`analysis.merge.average.stream_average` (the same reader, adder and block sizes
as the local merge, so every output tensor is bit-identical to it) and writes one shard: into a hidden
part file first, renamed to the shard's name when complete, so a retried unit (its worker died) simply
writes it again. The engine writes the index and the recipe only after every unit succeeded, then
publishes the folder as a local merge does (:func:`analysis.merge.engine._publish`); a lost driver leaves
only the hidden partial folder, which holds no index and which the next merge removes.

Nothing here imports Ray: the executor decides where units run (:mod:`analysis.executors`).
"""

from __future__ import annotations

import heapq
import json
import os
import resource
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from ..checkpoints import TensorInfo, open_checkpoint, original_name
from ..checkpoints.base import DTYPE_BYTES
from ..errors import InvalidArgument
from ..executors import Executor, Resources
from ..remote import all_stats, is_url, store_for
from .average import stream_average
from .output import INDEX_FILE, OutputPlan, _copy_side_file, write_output
from .plan import check_same_layout, output_layout
from .read import BUFFER_BUDGET_BYTES, block_elements, widest_input

if TYPE_CHECKING:
    from .bucket import BucketUpload

Progress = Callable[[float, str], None]
NonFinite = Callable[[TensorInfo, tuple[int, ...]], None]
# Tests only: a folder where the first unit to start writes its pid ("held") and then waits, mid-shard, so a
# test can kill its worker (the retry finds "held" and goes on) or the driver. Read on the driver, shipped in the unit.
HOLD_ENV = "CKPT_SELECT_TEST_HOLD_UNIT"
HOLD_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class MergeUnit:
    """One output shard: which tensors, from which inputs, with which weights, written where."""

    inputs: tuple[tuple[str, str], ...]     # (path or URL, layout) of every input, oldest first
    weights: tuple[float, ...]
    output_dtype: str
    names: tuple[str, ...]                  # the group's tensors (matched names), in the output's order
    target: str                             # the shard file, inside the merge's hidden folder
    metadata: tuple[tuple[str, str], ...]   # the shard header's metadata, as the local merge writes it
    hold: str | None = None                 # see HOLD_ENV


@dataclass(frozen=True, slots=True)
class UnitResult:
    """What a unit wrote and read, and what it saw: small, sent back to the driver."""

    target: str
    size_bytes: int                         # of the shard written
    bytes_read: int                         # tensor bytes read from the inputs
    reads: int                              # reads issued (one per block and input)
    requests: int                           # requests to object storage (0 for local files), from the I/O layer's counters
    nonfinite: tuple[tuple[str, tuple[int, ...]], ...]   # (tensor, inputs holding NaN/Inf) as the local merge reports
    pid: int
    peak_rss: int                           # bytes, of the worker process so far
    seconds: float


def check_supported(out_format: str) -> None:
    """Refuse what only the local merge does, before anything is read.

    Raises:
        InvalidArgument: a torch output format (one file, which one process writes, not shards).
    """
    if out_format != "safetensors":
        raise InvalidArgument(f"--out-format {out_format} writes one file, which one process writes: use --executor "
                              "local (a cluster merge writes safetensors shards)")


def cost(info: TensorInfo, inputs: Sequence[str]) -> int:
    """Bytes a tensor's merge moves (Megatron's estimate): every input's bytes, the fp32 accumulator, the output."""
    read = sum(DTYPE_BYTES[dtype] for dtype in inputs)
    return info.numel * (read + 4 + DTYPE_BYTES[info.dtype])


def group_plan(plan: OutputPlan, stored_dtypes: dict[str, list[str]], slots: int) -> OutputPlan:
    """``plan``'s tensors regrouped into shards balanced by :func:`cost`, largest first, at least ``slots`` of them.

    ``stored_dtypes``: each tensor's (stored name) dtype in every input. Every group keeps the output's
    tensor order; the output is always sharded (the index is the commit marker).
    """
    stored = [info for _, infos in plan.shards for info in infos]
    count = max(1, min(len(stored), max(slots, len(plan.shards))))
    loads = [(0, index) for index in range(count)]
    members: list[list[int]] = [[] for _ in range(count)]
    order = sorted(range(len(stored)), key=lambda i: -cost(stored[i], stored_dtypes[stored[i].name]))
    for position in order:
        load, index = heapq.heappop(loads)
        members[index].append(position)
        heapq.heappush(loads, (load + cost(stored[position], stored_dtypes[stored[position].name]), index))
    groups = [sorted(m) for m in members if m]
    names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    shards = tuple((name, tuple(stored[i] for i in group)) for name, group in zip(names, groups))
    return replace(plan, sharded=True, shards=shards)


def balanced_plan(plan: OutputPlan, handles: Sequence, layout: Sequence[TensorInfo], slots: int) -> OutputPlan:
    """:func:`group_plan` for open input ``handles`` (newest last) and the output ``layout`` (matched names)."""
    stored_dtypes = [{i.name: i.dtype for i in h.tensors()} for h in handles]
    stored = [info for _, infos in plan.shards for info in infos]
    by_stored = {s.name: [d[i.name] for d in stored_dtypes] for s, i in zip(stored, layout)}
    return group_plan(plan, by_stored, slots)


def run_units(executor: Executor, tmp: Path, handles: Sequence, refs: Sequence, weights: Sequence[float],
              layout: Sequence[TensorInfo], plan: OutputPlan, metadata: dict[str, str], output_dtype: str,
              progress: Progress | None, nonfinite: NonFinite | None, bucket: "BucketUpload | None" = None) -> int:
    """The engine's hook: plan a unit per shard of ``plan``, run them, write the index; the shards' bytes.

    With a ``bucket`` output each unit uploads its own shard under the final prefix (workers on other
    machines share no folder with the driver); the driver's scratch then holds only the index, the
    side files and the recipe, which :class:`~analysis.merge.bucket.BucketUpload` sends last.
    """
    inputs = [(str(r.path), r.layout) for r in refs]
    stored = [original_name(handles[-1], i.name) for i in layout]
    units = plan_units(inputs, weights, output_dtype, layout, stored, plan, tmp, metadata)
    if bucket is not None:
        units = [replace(u, target=bucket.expect(Path(u.target).name)) for u in units]
    size, results = write_shards(executor, tmp, units, plan, layout, metadata, output_dtype, progress, nonfinite)
    if bucket is not None:
        for result in results:
            bucket.uploaded(result.target.rsplit("/", 1)[-1], result.size_bytes)
    return size


def plan_units(inputs: Sequence[tuple[str, str]], weights: Sequence[float], output_dtype: str,
               layout: Sequence[TensorInfo], stored_names: Sequence[str], plan: OutputPlan, tmp: Path,
               metadata: dict[str, str]) -> list[MergeUnit]:
    """One unit per shard of ``plan`` (largest first, so the longest units start first)."""
    matched = dict(zip(stored_names, (info.name for info in layout)))
    hold = os.environ.get(HOLD_ENV) or None
    units = [MergeUnit(tuple(inputs), tuple(weights), output_dtype, tuple(matched[i.name] for i in infos),
                       str(tmp / name), tuple(metadata.items()), hold)
             for name, infos in plan.shards]
    sizes = {name: sum(i.size_bytes for i in infos) for name, infos in plan.shards}
    return sorted(units, key=lambda u: -sizes[Path(u.target).name])


def write_shards(executor: Executor, tmp: Path, units: list[MergeUnit], plan: OutputPlan, layout: Sequence[TensorInfo],
                 metadata: dict[str, str], output_dtype: str, progress: Progress | None,
                 nonfinite: NonFinite | None) -> tuple[int, list[UnitResult]]:
    """Run the units, then write the index and the side files (after every unit succeeded).

    Returns:
        bytes of the shards written, and every unit's result.
    """
    by_name = {info.name: info for info in layout}
    memory = max((_unit_memory(u, by_name) for u in units), default=0)
    results = []
    for result in executor.map(merge_unit, units, Resources(memory=memory), task_progress(progress)):
        results.append(result)
        for name, inputs in result.nonfinite:
            if nonfinite is not None:
                nonfinite(by_name[name], inputs)
    for leftover in tmp.glob(".*.part-*"):   # what a unit whose worker died had begun; its retry wrote the shard
        leftover.unlink(missing_ok=True)
    write_index(tmp, plan, metadata)
    for source in plan.side_files:
        _copy_side_file(source, tmp / source.name, output_dtype)
    return sum(r.size_bytes for r in results), results


def write_index(tmp: Path, plan: OutputPlan, metadata: dict[str, str]) -> None:
    """``model.safetensors.index.json`` for the shards of ``plan``, as the local merge writes it."""
    weight_map = {info.name: name for name, infos in plan.shards for info in infos}
    index = {"metadata": {"total_size": plan.data_bytes, **metadata}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _unit_memory(unit: MergeUnit, by_name: dict[str, TensorInfo]) -> int:
    """A unit's memory for Ray to reserve: the reader's buffers and the adder's arrays (bounded by the buffer
    budget, ~3x with headroom), the largest whole tensor it copies, and the interpreter (~150 MB measured)."""
    largest = max((by_name[n].size_bytes for n in unit.names if not by_name[n].is_floating), default=0)
    return 3 * BUFFER_BUDGET_BYTES + largest + (150 << 20)


def task_progress(progress: Progress | None,
                  counted: str = "tasks {done}/{total}") -> Callable[[int, int, int], None] | None:
    """Units done/total and bytes read, as the engine's ``progress(fraction, message)``; ``counted`` words the count."""
    if progress is None:
        return None
    return lambda done, total, read: progress(done / max(total, 1),
                                              f"{counted.format(done=done, total=total)}, {read / 1e9:.2f} GB read")


def merge_unit(unit: MergeUnit) -> UnitResult:
    """Average one group of tensors from every input and write it as one shard (the work unit; pure, retryable)."""
    began, requests = time.perf_counter(), _requests()
    with ExitStack() as stack:
        handles = [stack.enter_context(open_checkpoint(path, layout)) for path, layout in unit.inputs]
        wanted = set(unit.names)
        group = [info for info in output_layout(check_same_layout(handles), unit.output_dtype) if info.name in wanted]
        found: list[tuple[str, tuple[int, ...]]] = []
        size = _write_shard(unit, handles, group, lambda info, inputs: found.append((info.name, inputs)))
        read, reads = _read_bytes(handles, group)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return UnitResult(unit.target, size, read, reads, _requests() - requests, tuple(found), os.getpid(), peak,
                      time.perf_counter() - began)


def _write_shard(unit: MergeUnit, handles: Sequence, group: list[TensorInfo], nonfinite: NonFinite) -> int:
    """Stream ``group``'s averages into a hidden part file, renamed to the shard when complete; its bytes.

    The part file is named after this process, so a retry on another worker never writes into a dead
    worker's file; the driver removes what dead workers left (:func:`write_shards`).
    """
    stored = tuple(replace(info, name=original_name(handles[-1], info.name)) for info in group)
    remote = is_url(unit.target)
    scratch = Path(tempfile.mkdtemp(prefix="ckpt-select-unit-")) if remote else None
    target = scratch / unit.target.rsplit("/", 1)[-1] if scratch is not None else Path(unit.target)
    part = target.with_name(f".{target.name}.part-{os.getpid()}")
    shard = OutputPlan(False, ((part.name, stored),), (), sum(i.size_bytes for i in stored))
    stream = stream_average(handles, unit.weights, group, None, None, nonfinite)
    blocks = _held(((original_name(handles[-1], i.name), s, b) for i, s, b in stream), unit.hold)
    try:
        size = write_output(part.parent, shard, blocks, dict(unit.metadata), unit.output_dtype)
        os.replace(part, target)
        if scratch is not None:   # one PUT (multipart when large): the object appears whole or not at all
            store, key = store_for(unit.target)
            store.put_file(str(target), key)
    finally:
        part.unlink(missing_ok=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return size


def _requests() -> int:
    """Requests this process sent to object storage so far (every protocol)."""
    return sum(stats.get("requests", 0) for stats in all_stats().values())


def _read_bytes(handles, group: Sequence[TensorInfo]) -> tuple[int, int]:
    """Tensor bytes the unit read and reads it issued: every input's floating tensors, the newest's others."""
    block = block_elements(len(handles), widest_input(handles))
    stored = [{i.name: i for i in h.tensors()} for h in handles]
    total = reads = 0
    for info in group:
        sources = stored if info.is_floating else stored[-1:]
        total += sum(s[info.name].size_bytes for s in sources)
        reads += len(sources) * (max(1, -(-info.numel // block)) if info.is_floating else 1)
    return total, reads


def _held(blocks: Iterator[tuple[str, int, np.ndarray]], hold: str | None) -> Iterator[tuple[str, int, np.ndarray]]:
    """``blocks``; for the tests' fault injection (see HOLD_ENV), the first unit waits after its first block."""
    for index, item in enumerate(blocks):
        yield item
        if index == 0 and hold:
            _hold(Path(hold))


def _hold(folder: Path) -> None:
    """Claim ``folder/held`` with this pid and wait; a unit finding it claimed (the retry) goes on at once."""
    mine = folder / f"held.{os.getpid()}"
    mine.write_text(str(os.getpid()))
    try:
        os.link(mine, folder / "held")   # atomic, and the file already holds the pid when it appears
    except FileExistsError:
        return
    finally:
        mine.unlink()
    time.sleep(HOLD_SECONDS)
