"""Everything a merge checks before it writes a byte, and the dry run's projection.

Inputs against the recipe (``full``: sha256 of every byte; ``quick``: size and a sampled
fingerprint; ``none``), the target (never an input nor inside an input's folder, never an
existing folder unless forced, and forced only an earlier merge's output or an empty
folder), free disk space, and for ``--dry-run`` what would be read and written, the
projected peak memory and the projected time from a short probe of the real inputs.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..checkpoints import CheckpointHandle, TensorInfo, open_checkpoint
from ..checkpoints.location import locate
from ..errors import AnalysisError, InvalidArgument, MergeError
from ..hashing import checkpoint_etag, checkpoint_quick_hash, checkpoint_sha256, combine_sha256
from ..recipe import Recipe, RecipeEntry
from ..remote import RemotePath
from ..run import MERGE_MARKER_KEY, CheckpointRef, checkpoint_ref
from ..targets import storage_errors, written_by_ckpt_select
from .average import stream_average
from .output import INDEX_FILE, MODEL_FILE, RECIPE_FILE, TORCH_FILES, OutputPlan
from .read import BLOCK_ELEMENTS, buffer_bytes

VERIFY_MODES = ("full", "quick", "none")
# Free space kept beyond the output's size: file systems misbehave when completely full.
DISK_MARGIN_BYTES = 64 * 1024 * 1024
# The dry run's probe averages this many blocks of the largest tensor (32 MiB per bf16 input): fixed costs
# (thread start, the first read, which nothing overlaps) must be small beside it. With the compiled kernel
# a block takes ~0.1 ms, and 32 blocks projected 0.6-2.0 s for a 0.5 s merge of 8 x 220M bf16; 128: 0.4-0.6 s.
PROBE_BLOCKS = 128
# Remote inputs (issue 22): the probe reads over the network, so it reads less (8 blocks, 2 MiB per bf16 input).
REMOTE_PROBE_BLOCKS = 8

Progress = Callable[[float, str], None]


def verify_mode(verify: bool | str) -> str:
    """``True``/``False`` (the old flag) or a mode name -> a mode name."""
    mode = {True: "quick", False: "none"}.get(verify, verify) if isinstance(verify, bool) else verify
    if mode not in VERIFY_MODES:
        raise InvalidArgument(f"--verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    return mode


def resolve_inputs(recipe: Recipe) -> list[CheckpointRef | None]:
    """Each input's reference (its layout, files and size), or None where its path is missing."""
    return [checkpoint_ref(e.path, e.step) if e.path.exists() else None for e in recipe.checkpoints]


def verify_inputs(recipe: Recipe, progress: Progress | None = None, mode: str = "full",
                  refs: Sequence[CheckpointRef | None] | None = None,
                  sha256_of: Callable[[Sequence[Path]], dict[Path, str]] | None = None) -> None:
    """Check every input against the recipe: present, same size, same hash.

    A remote input recorded with its ETag (issue 22) is checked by size and ETag in ``quick`` mode
    (from the listing, no byte read), and by them and then its sha256 (or quick hash) in ``full`` mode.
    ``quick`` compares the quick hash; a recipe written before quick hashes existed falls
    back to its sha256, so old recipes are checked as thoroughly as before. ``full`` compares the
    sha256, or the quick hash of an entry recorded without one (a merge without ``--sha256``). ``refs``: the
    inputs as :func:`resolve_inputs` found them (resolved here when not given). ``sha256_of``: hashes
    a list of files at once (on a cluster, see :func:`analysis.merge.hash_units.sha256_of`); by default
    each checkpoint is hashed here in turn, with progress.

    Raises:
        MergeError: naming each changed or missing input.
    """
    if verify_mode(mode) == "none":
        return
    refs = resolve_inputs(recipe) if refs is None else refs
    problems, to_hash = [], []
    for entry, ref in zip(recipe.checkpoints, refs):
        if ref is None:
            problems.append(f"{entry.path}: missing")
        elif entry.size_bytes and ref.size_bytes != entry.size_bytes:
            problems.append(f"{entry.path}: {ref.size_bytes} bytes, the recipe says {entry.size_bytes} (the file changed)")
        elif entry.etag and checkpoint_etag(ref.files) != entry.etag:
            problems.append(f"{entry.path}: ETag differs from the recipe (the object was rewritten)")
        elif entry.etag and mode == "quick":
            continue   # size and ETag, from the listing: a remote input is checked without reading a byte
        elif (mode == "quick" or not entry.sha256) and entry.quick_hash:   # full, no sha256 recorded: quick
            if checkpoint_quick_hash(ref.files) != entry.quick_hash:
                problems.append(f"{entry.path}: quick hash differs from the recipe (the file changed)")
        elif entry.sha256:
            to_hash.append((entry, ref))
    digests = _sha256s(to_hash, progress, sha256_of)
    problems += [f"{entry.path}: sha256 differs from the recipe (the file changed)"
                 for (entry, _), digest in zip(to_hash, digests) if digest != entry.sha256]
    if problems:
        raise MergeError("inputs do not match the recipe: " + "; ".join(problems))


def _sha256s(entries: list[tuple[RecipeEntry, CheckpointRef]], progress: Progress | None,
             sha256_of: Callable[[Sequence[Path]], dict[Path, str]] | None) -> list[str]:
    """Each checkpoint's sha256 (as :func:`analysis.hashing.checkpoint_sha256` combines its files')."""
    if sha256_of is not None:
        digests = sha256_of([f for _, ref in entries for f in ref.files]) if entries else {}
        return [combine_sha256({f: digests[f] for f in ref.files}) for _, ref in entries]
    return [checkpoint_sha256(ref.files, _part(progress, index, len(entries))) for index, (_, ref) in enumerate(entries)]


def _part(progress: Progress | None, index: int, count: int) -> Progress | None:
    """Progress of input ``index`` of ``count`` as a share of the whole check."""
    if progress is None:
        return None
    return lambda frac, msg: progress((index + frac) / count, msg)


def check_target(out_dir: Path, refs: Sequence[CheckpointRef], force: bool) -> None:
    """Refuse a target that is, holds or lies in an input, and an existing one unless forced.

    Forced, only a folder that an earlier merge wrote, or an empty one, may be replaced: a
    typo in ``-o`` must not delete another run with its checkpoints (issue 19).

    Raises:
        MergeError: naming the target and what is wrong with it.
    """
    for ref in refs:
        if isinstance(ref.path, RemotePath):
            continue   # a local folder cannot be, hold or lie in an object of a bucket
        for path in (ref.path, *ref.files):
            if out_dir == path or path.is_relative_to(out_dir):
                raise MergeError(f"{out_dir}: is or contains the input {path}; a merge never writes over an input")
        if ref.path.is_dir() and out_dir.is_relative_to(ref.path):
            raise MergeError(f"{out_dir}: lies inside the input checkpoint folder {ref.path}; a merge never "
                             "writes into an input")
    if not out_dir.exists():
        return
    if not force:
        raise MergeError(f"{out_dir}: already exists; choose a new output folder, or pass --force to replace it")
    if not out_dir.is_dir():
        raise MergeError(f"{out_dir}: exists and is not a folder; a merge replaces only a folder")
    problem = foreign_contents(out_dir)
    if problem:
        raise MergeError(f"{out_dir}: {problem}; --force replaces only an earlier CkptSelect merge output "
                         "or an empty folder")


def foreign_contents(folder: Path) -> str | None:
    """None when ``--force`` may replace ``folder`` (empty, or a merge's output); else what it holds.

    A merge's output holds files only, its weights carry :data:`MERGE_MARKER_KEY` (as run
    discovery tells merges apart), and its recipe, when it has one, is ours.
    """
    entries = list(folder.iterdir())
    if not entries:
        return None
    folders = sum(1 for e in entries if e.is_dir() and not e.is_symlink())
    if folders == 0 and _is_merge_output(folder):
        return None
    files = len(entries) - folders
    return (f"holds {files} file{'s' * (files != 1)}, {folders} folder{'s' * (folders != 1)}, "
            "not a CkptSelect merge output")


def _is_merge_output(folder: Path) -> bool:
    """Whether ``folder``'s weights carry the merge marker and its recipe (if any) is ours."""
    candidates = [folder / INDEX_FILE, folder / MODEL_FILE, *(folder / name for name, _ in TORCH_FILES.values())]
    weights = next((path for path in candidates if path.is_file()), folder / MODEL_FILE)
    recipe = folder / RECIPE_FILE
    if not weights.is_file() or (recipe.exists() and not written_by_ckpt_select(recipe)):
        return False
    try:
        with open_checkpoint(weights) as handle:
            return MERGE_MARKER_KEY in handle.metadata()
    except AnalysisError:
        return False


def check_disk(out_dir: Path, needed: int) -> int:
    """Stop before writing if the target's file system cannot hold the output; return free bytes.

    Raises:
        MergeError: too little free space. OutputError: the parent folder cannot be created.
    """
    parent = out_dir.parent
    with storage_errors(parent):
        parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < needed + DISK_MARGIN_BYTES:
        raise MergeError(f"{parent}: {free / 1e9:.2f} GB free, the merge needs {needed / 1e9:.2f} GB "
                         f"(+{DISK_MARGIN_BYTES / 1e6:.0f} MB margin)")
    return free


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
        if isinstance(self.out_dir, RemotePath):
            lines.append(f"free local scratch (one output file at a time): {self.free_bytes / 1e9:,.2f} GB")
        else:
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
    blocks = REMOTE_PROBE_BLOCKS if any(isinstance(p, RemotePath) for h in handles for p in _files(h)) else PROBE_BLOCKS
    probe = TensorInfo(largest.name, (min(largest.numel, blocks * BLOCK_ELEMENTS),), largest.dtype, 0)
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


def _files(handle: CheckpointHandle) -> list[object]:
    """The handle's files, when its layout lists them (to tell remote inputs apart)."""
    files = getattr(handle, "files", None)
    return list(files()) if callable(files) else [getattr(handle, "path", None)]


def _input_itemsizes(handles: Sequence[CheckpointHandle], info: TensorInfo) -> list[int]:
    """Bytes per element of ``info`` in each input."""
    sizes = []
    for handle in handles:
        match = next((i for i in handle.tensors() if i.name == info.name), None)
        sizes.append(match.size_bytes // max(match.numel, 1) if match else 4)
    return sizes
