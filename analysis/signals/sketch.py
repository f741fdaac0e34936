"""Fixed-size sketches of a checkpoint's tensors, for similarity at any model size.

A CountSketch sends element i of a tensor to bucket h(i) with sign s(i); the sketch is
linear, so the sketch of an update θ_a − θ_b is the difference of the two sketches,
and inner products are preserved in expectation:

    E[<Sx, Sy>] = <x, y>,   Var[<Sx, Sy>] <= (|x|^2 |y|^2 + <x, y>^2) / k

for k buckets. Every tensor is sketched separately with its own seeded hash (the same
for every checkpoint of the run), so a whole-model cosine estimated from all sketches
has a standard error of at most sqrt(2 / K) with K the total number of buckets.
Tensors with at most ``buckets`` elements are stored exactly (no error at all), which
makes the signals exact for small models. One streaming pass per checkpoint, one chunk
of one tensor in memory; results are cached on disk keyed by the file's identity.

The same pass keeps each tensor's exact statistics (:class:`.tensor_stats.TensorStats`: sum of
squares, max |w|, finiteness) and the header's tensor count and bytes per dtype, so the health check
and the layer view (issue 25) are derived from it: every tensor of a checkpoint is read once in all.
"""

from __future__ import annotations

import hashlib
import os
import zlib
import json
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..checkpoints import CheckpointHandle, TensorInfo, open_checkpoint
from ..checkpoints.base import optimizer_state
from ..checkpoints.readahead import read_in_order
from ..executors import Executor, driver_threads, intra_op_threads
from ..run import CheckpointRef
from .tensor_stats import TensorStats, tensor_stats

SKETCH_VERSION = 2   # 2: exact per-tensor statistics and header counts kept beside the sketches (issue 25)
DEFAULT_BUCKETS = 4096
CHUNK_ELEMENTS = 1 << 22   # hashes generated per chunk: bounds memory for a huge embedding


@dataclass(frozen=True, slots=True)
class CheckpointSketch:
    """Per-tensor sketches of one checkpoint's weights (and Adam first moments, if saved)."""

    step: int
    weights: dict[str, torch.Tensor]     # name -> float64 vector (exact when the tensor is small)
    exp_avg: dict[str, torch.Tensor]     # param name -> sketch of its Adam first moment
    exact: bool                          # every weight tensor stored exactly
    buckets: int
    stats: dict[str, TensorStats] = field(default_factory=dict)   # name -> exact statistics, in file order
    n_tensors: int = 0                   # every tensor of the checkpoint, floating or not
    bytes_by_dtype: tuple[tuple[str, int], ...] = ()


def cache_dir() -> Path:
    """Where sketches are cached (``CKPT_SELECT_CACHE_DIR`` or ~/.cache/ckpt-select/sketches)."""
    base = os.environ.get("CKPT_SELECT_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "ckpt-select" / "sketches"


def sketch_tensor(name: str, tensor: torch.Tensor, buckets: int, seed: int) -> torch.Tensor:
    """CountSketch of one tensor (exact copy when it has at most ``buckets`` elements)."""
    flat = tensor.reshape(-1)
    if flat.numel() <= buckets:
        return flat.to(torch.float64).clone()
    out = torch.zeros(buckets, dtype=torch.float64)
    base_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF
    for index, start in enumerate(range(0, flat.numel(), CHUNK_ELEMENTS)):
        chunk = flat[start:start + CHUNK_ELEMENTS].to(torch.float64)
        gen = torch.Generator().manual_seed(base_seed + index)
        where = torch.randint(buckets, (chunk.numel(),), generator=gen)
        signs = torch.randint(2, (chunk.numel(),), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
        out.index_add_(0, where, chunk * signs)
    return out


def sketch_checkpoint(ref: CheckpointRef, buckets: int = DEFAULT_BUCKETS, seed: int = 0, use_cache: bool = True,
                      progress: Callable[[float, str], None] | None = None) -> CheckpointSketch:
    """Sketch every floating tensor of ``ref`` in one streaming pass (cached on disk)."""
    cached = _cache_path(ref, buckets, seed)
    if use_cache and cached.is_file():
        return _load(cached, ref.step, buckets)
    moments: dict[str, torch.Tensor] = {}
    with open_checkpoint(ref.path, ref.layout) as handle:
        every = handle.tensors()
        infos = [i for i in every if i.is_floating]
        exact = all(info.numel <= buckets for info in infos)
        tell = None if progress is None else (lambda done: progress(done / len(infos), f"sketching {ref.name}"))
        weights, stats = _sketch_weights(handle, infos, buckets, seed, tell)
        for info in optimizer_state(handle):
            if info.name.endswith(".exp_avg"):
                moments[info.name.removesuffix(".exp_avg")] = sketch_tensor(
                    info.name.removesuffix(".exp_avg"), handle.read_optimizer(info.name), buckets, seed)
    result = CheckpointSketch(ref.step, weights, moments, exact, buckets, stats, len(every), _bytes_by_dtype(every))
    if use_cache:
        _store(cached, result)
    return result


def _sketch_weights(handle: CheckpointHandle, infos: list[TensorInfo], buckets: int, seed: int,
                    done: Callable[[int], None] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, TensorStats]]:
    """Each tensor's sketch and exact statistics, in order, from ONE read of it; a remote checkpoint's next
    tensors are fetched ahead while one is sketched (:func:`analysis.checkpoints.readahead.read_in_order`)."""
    sketches: dict[str, torch.Tensor] = {}
    stats: dict[str, TensorStats] = {}
    with closing(read_in_order(handle, infos)) as tensors:   # closed at once if a sketch fails: the thread stops
        for index, (info, tensor) in enumerate(tensors):
            sketches[info.name] = sketch_tensor(info.name, tensor, buckets, seed)
            stats[info.name] = tensor_stats(info.name, tensor)
            if done is not None:
                done(index + 1)
    return sketches, stats


def _bytes_by_dtype(infos) -> tuple[tuple[str, int], ...]:
    """Bytes per dtype over every tensor of the header, sorted by dtype name."""
    totals: dict[str, int] = {}
    for info in infos:
        totals[info.dtype] = totals.get(info.dtype, 0) + info.size_bytes
    return tuple(sorted(totals.items()))


def _cache_path(ref: CheckpointRef, buckets: int, seed: int) -> Path:
    """Content identity: every file's path, size and mtime (an object's URL, size and ETag: issue 22),
    plus the sketch parameters."""
    from ..remote import file_look

    parts = [f"v{SKETCH_VERSION}", str(buckets), str(seed)]
    for f in sorted(ref.files):
        name, size, version = file_look(f)
        parts.append(f"{name}|{size}|{version}")
    return cache_dir() / (hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32] + ".safetensors")


def _store(path: Path, sketch: CheckpointSketch) -> None:
    """Write atomically; a cache that cannot be written only costs speed."""
    tensors = {f"w/{k}": v for k, v in sketch.weights.items()}
    tensors.update({f"m/{k}": v for k, v in sketch.exp_avg.items()})
    tensors.update({f"s/{k}": v.to_tensor() for k, v in sketch.stats.items()})
    header = {"n_tensors": sketch.n_tensors, "bytes_by_dtype": sketch.bytes_by_dtype,
              "order": list(sketch.stats)}   # file order: safetensors sorts names on disk
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"exact": str(int(sketch.exact)), "header": json.dumps(header)})
        tmp.replace(path)
    except OSError:
        pass


def _load(path: Path, step: int, buckets: int) -> CheckpointSketch:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:   # one open for the metadata and the tensors
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    header = json.loads(metadata.get("header", "{}"))
    weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w/")}
    moments = {k[2:]: v for k, v in tensors.items() if k.startswith("m/")}
    stats = {name: TensorStats.from_tensor(tensors[f"s/{name}"]) for name in header.get("order", [])}
    return CheckpointSketch(step, weights, moments, metadata.get("exact") == "1", buckets, stats,
                            int(header.get("n_tensors", 0)), tuple((d, int(b)) for d, b in header.get("bytes_by_dtype", ())))


# --- the sketch pass as work units (issue 22): one per (checkpoint, tensor group), run by an executor ------------
# Bytes of tensors one unit reads: units small enough to spread a checkpoint over a cluster, large enough
# that opening the checkpoint (its headers) is a small part of a unit.
GROUP_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class SketchUnit:
    """Sketch these tensors of one checkpoint (by path or URL); ``moments``: its Adam first moments instead."""

    checkpoint: int                  # the checkpoint's place in the batch
    path: str
    layout: str | None
    names: tuple[str, ...]
    buckets: int
    seed: int
    moments: bool = False
    threads: int = 1                 # torch's intra-op threads on the driver: the unit's sums use as many


@dataclass(frozen=True, slots=True)
class SketchPart:
    """A unit's sketches and exact statistics (small: ``buckets`` floats a tensor)."""

    checkpoint: int
    sketches: dict[str, torch.Tensor]
    stats: dict[str, TensorStats]
    bytes_read: int


def sketch_unit(unit: SketchUnit) -> SketchPart:
    """Sketch one group of tensors, exactly as :func:`sketch_checkpoint` does each (the work unit; pure)."""
    sketches: dict[str, torch.Tensor] = {}
    stats: dict[str, TensorStats] = {}
    with intra_op_threads(unit.threads), open_checkpoint(unit.path, unit.layout) as handle:
        if unit.moments:
            for name in unit.names:
                sketches[name] = sketch_tensor(name, handle.read_optimizer(f"{name}.exp_avg"), unit.buckets, unit.seed)
        else:
            by_name = {i.name: i for i in handle.tensors()}
            sketches, stats = _sketch_weights(handle, [by_name[n] for n in unit.names], unit.buckets, unit.seed)
        sizes = {i.name: i.size_bytes for i in (optimizer_state(handle) if unit.moments else handle.tensors())}
        read = sum(sizes.get(f"{n}.exp_avg" if unit.moments else n, 0) for n in unit.names)
    return SketchPart(unit.checkpoint, sketches, stats, read)


def plan_sketch_units(index: int, ref: CheckpointRef, buckets: int = DEFAULT_BUCKETS, seed: int = 0,
                      group_bytes: int | None = None) -> list[SketchUnit]:
    """The units of one checkpoint, from its header only: consecutive floating tensors up to ``group_bytes``
    (default :data:`GROUP_BYTES`) a unit (a larger tensor alone), and one unit for the Adam first moments if
    it saved them."""
    group_bytes = group_bytes or GROUP_BYTES
    with open_checkpoint(ref.path, ref.layout) as handle:
        infos = [i for i in handle.tensors() if i.is_floating]
        moments = tuple(i.name.removesuffix(".exp_avg") for i in optimizer_state(handle) if i.name.endswith(".exp_avg"))
    groups: list[list[str]] = []
    filled = 0
    for info in infos:   # an empty first tensor opens a group too (it used to find none: an IndexError)
        if not groups or (filled + info.size_bytes > group_bytes and groups[-1]):
            groups.append([])
            filled = 0
        groups[-1].append(info.name)
        filled += info.size_bytes
    threads = driver_threads()
    units = [SketchUnit(index, str(ref.path), ref.layout, tuple(g), buckets, seed, False, threads) for g in groups]
    return units + ([SketchUnit(index, str(ref.path), ref.layout, moments, buckets, seed, True, threads)]
                    if moments else [])


def sketch_run(refs: list[CheckpointRef], executor: Executor, buckets: int = DEFAULT_BUCKETS, seed: int = 0,
               progress: Callable[[float, str], None] | None = None) -> list[CheckpointSketch]:
    """Sketch every checkpoint not cached yet as units on ``executor`` and cache each, as :func:`sketch_checkpoint`
    would have: the analysis that follows reads the cache. Returns every checkpoint's sketch, in order."""
    todo = [i for i, ref in enumerate(refs) if not _cache_path(ref, buckets, seed).is_file()]
    units = [unit for i in todo for unit in plan_sketch_units(i, refs[i], buckets, seed)]
    parts: dict[int, list[SketchPart]] = {i: [] for i in todo}
    report = None if progress is None else (
        lambda done, total, read: progress(done / max(total, 1), f"tasks {done}/{total}, {read / 1e9:.2f} GB read"))
    for part in executor.map(sketch_unit, units, progress=report):
        parts[part.checkpoint].append(part)
    made = {i: _assemble(refs[i], parts[i], buckets) for i in todo}
    for i, sketch in made.items():
        _store(_cache_path(refs[i], buckets, seed), sketch)
    return [made[i] if i in made else sketch_checkpoint(ref, buckets, seed) for i, ref in enumerate(refs)]


def _assemble(ref: CheckpointRef, parts: list[SketchPart], buckets: int) -> CheckpointSketch:
    """One checkpoint's sketch from its units' parts, in file order, as :func:`sketch_checkpoint` builds it."""
    with open_checkpoint(ref.path, ref.layout) as handle:
        every = handle.tensors()
    weights = {k: v for part in parts for k, v in part.sketches.items() if k in part.stats}
    moments = {k: v for part in parts for k, v in part.sketches.items() if k not in part.stats}
    stats = {k: v for part in parts for k, v in part.stats.items()}
    floating = [i for i in every if i.is_floating]
    order = [i.name for i in floating]
    return CheckpointSketch(ref.step, {n: weights[n] for n in order}, moments,
                            all(i.numel <= buckets for i in floating), buckets, {n: stats[n] for n in order},
                            len(every), _bytes_by_dtype(every))
