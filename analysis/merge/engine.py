"""Streaming weighted merge into a new folder that appears only when complete.

Memory holds a few blocks of every input, never a whole tensor of the output
(see :mod:`analysis.merge.arithmetic`). The output is written into a hidden temporary folder
beside the target and renamed into place at the end, so an interrupted merge (even
``kill -9``) leaves either no output or a complete one at the target path; inputs are
never written to. A URL target (``s3://bucket/merged``) has no rename: :mod:`analysis.merge.bucket`
uploads the files one by one with the recipe last, as the commit marker (issue 22).
``force`` replaces an existing target, when it is an earlier merge's output
or empty (see :func:`analysis.merge.verify.check_target`): the old one is renamed aside, the
new one renamed in, then the old one deleted. Each merge first removes what killed merges
left in the target's folder, and says so in its result.

Hashes: an input the recipe has no sha256 for (``merge --checkpoints``, a mergekit config) gets its
size and quick hash in the recipe written beside the merge (a few sampled blocks: cheap), and its
sha256 only when asked (``hash_inputs``, ``merge --sha256``): sha256 runs at about 1 GB/s on one
core, so 8 x 220M bf16 inputs (3.5 GB) cost 3.2 s of hashing against a 1.3 s merge, 0.34x mergekit
instead of 0.14x (``benchmarks/merge_paths.py``); ``export --format ckpt-select`` and ``--sha256``
record it later, and ``--verify full`` checks such an entry by its quick hash. When asked, it is
hashed in the merge's own read pass, not in a pass of its own before it. The reader hands every
range it reads to a per-file sha256 on a thread of its own (:class:`analysis.merge.read.ReadHashes`);
what the reader never reads (the header, side files like config.json, the integer tensors of the
older inputs, a pickle's bytes, which torch reads) is read and hashed in file order as a gap or
at the end. So the recipe written beside the merge records the true ``sha256sum`` of every input
file, never a partial hash under that name, while each tensor byte is read once. The quick hash
is taken from the same bytes. The ``ckpt_select_recipe_sha256`` marker in the output's header
hashes the recipe as the merge began: the header is written before the read pass ends. A merge on
an executor (a Ray cluster) has no single read pass: its inputs are hashed by units of one file
each, after the shard units (:mod:`analysis.merge.hash_units`), and ``--verify full`` hashes there too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import uuid
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from ..checkpoints import TensorInfo, open_checkpoint, original_name
from ..errors import MergeError
from ..hashing import checkpoint_etag, checkpoint_quick_hash, combine_quick_hash, combine_sha256
from ..remote import RemotePath, as_path, is_remote
from ..remote.outputs import incomplete_output
from ..recipe import Recipe, RecipeEntry, dump_mergekit, dump_recipe
from ..run import MERGE_MARKER_KEY, CheckpointRef, checkpoint_ref
from ..targets import process_alive, storage_errors
from .average import arithmetic, stream_average
from .bucket import BucketUpload, check_bucket_target
from .output import (MERGEKIT_FILE, MODEL_FILE, RECIPE_FILE, OutputPlan, format_suggestion, plan_output,
                     write_output)
from ..inputs import normalize_weights
from .plan import check_same_layout, output_layout
from .read import ReadHashes
from . import distributed
from .hash_units import hash_files, sha256_of
from .verify import (DISK_MARGIN_BYTES, MergePlan, check_disk, check_target, project, resolve_inputs, verify_inputs,
                     verify_mode)

if TYPE_CHECKING:
    from ..executors import Executor

# A hidden folder a merge leaves beside its target: .NAME.partial-HOST-PID-HEX (being written) or
# .NAME.old-HOST-PID-HEX (an output --force set aside); see _hidden_name.
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<owner>.+)$")

Progress = Callable[[float, str], None]

__all__ = ["DISK_MARGIN_BYTES", "MERGEKIT_FILE", "MODEL_FILE", "MergePlan", "MergeResult", "RECIPE_FILE",
           "StaleFolders", "dry_run", "merge", "merge_checkpoints", "merge_recipe", "plan_merge", "verify_inputs"]


@dataclass(frozen=True, slots=True)
class StaleFolders:
    """Hidden folders of killed merges that a merge removed before it started, and the bytes that freed."""

    paths: tuple[Path, ...] = ()
    freed_bytes: int = 0

    def describe(self) -> str:
        """One line for the user, naming the folders."""
        count = len(self.paths)
        return (f"removed {count} folder{'s' * (count != 1)} left by killed merges "
                f"({', '.join(p.name for p in self.paths)}): {self.freed_bytes / 1e6:,.1f} MB freed")


@dataclass(frozen=True, slots=True)
class MergeResult:
    """Where the merge went and what it holds."""

    out_dir: Path               # a RemotePath for a bucket output (issue 22)
    model_file: Path            # model.safetensors, or model.safetensors.index.json when sharded
    recipe_file: Path
    size_bytes: int             # of the weight files
    n_tensors: int
    steps: tuple[int, ...]
    weights: tuple[float, ...]
    files: tuple[str, ...] = ()  # every file written into out_dir
    sharded: bool = False
    stale: StaleFolders = StaleFolders()   # what killed merges had left in out_dir's folder, removed first
    warnings: tuple[str, ...] = ()   # one line each: inputs holding NaN/Inf, averages that overflow
    out_format: str = "safetensors"  # safetensors | torch | lightning (issue 21)
    suggestion: str = ""             # another output format that suits these inputs better, in a sentence


def merge(recipe: Recipe, out_dir: Path, *, verify: bool | str = "quick", progress: Progress | None = None,
          force: bool = False, out_shard_size: int | None = None, hash_inputs: bool = False,
          executor: "Executor | None" = None) -> MergeResult:
    """Merge what ``recipe`` says into ``out_dir`` after checking the inputs (``verify``: full|quick|none).

    ``executor`` (issue 22): the output's shards are written by work units it runs (a Ray cluster), see
    :mod:`analysis.merge.distributed`; None merges in this process.

    Each input's reference is resolved once, here, and used by the check and the merge. Inputs
    the recipe has no sha256 for (an ad-hoc ``merge --checkpoints``, a mergekit config) get their
    quick hash in the recipe written beside the merge, and with ``hash_inputs`` their sha256 too,
    hashed in the merge's own read pass.
    Progress runs from 0 to 1 once: a full check (hashing every byte) takes the first half.
    """
    mode = verify_mode(verify)
    share = 0.5 if mode == "full" else 0.0
    refs = resolve_inputs(recipe)
    verify_inputs(recipe, _scaled(progress, 0.0, share), mode, refs,
                  sha256_of(executor) if executor is not None else None)
    found = [ref or checkpoint_ref(e.path, e.step) for ref, e in zip(refs, recipe.checkpoints)]
    return merge_checkpoints(found, recipe.weights, out_dir, recipe.output_dtype, recipe,
                             _scaled(progress, share, 1.0), force=force, out_shard_size=out_shard_size,
                             out_format=recipe.output_format, hash_inputs=hash_inputs, executor=executor)


def merge_recipe(recipe: Recipe, out_dir: Path, verify: bool | str = "quick", progress: Progress | None = None,
                 *, force: bool = False, out_shard_size: int | None = None) -> MergeResult:
    """:func:`merge` with ``verify`` and ``progress`` by position, as callers before :func:`merge` wrote it."""
    return merge(recipe, out_dir, verify=verify, progress=progress, force=force, out_shard_size=out_shard_size)


def dry_run(recipe: Recipe, out_dir: Path, *, force: bool = False, out_shard_size: int | None = None) -> MergePlan:
    """:func:`plan_merge` for a recipe: what ``merge --dry-run`` reports; writes nothing."""
    refs = [checkpoint_ref(e.path, e.step) for e in recipe.checkpoints]
    return plan_merge(refs, recipe.weights, out_dir, recipe.output_dtype, force=force, out_shard_size=out_shard_size,
                      out_format=recipe.output_format)


def _scaled(progress: Progress | None, low: float, high: float) -> Progress | None:
    """``progress`` with fractions mapped into [low, high]."""
    if progress is None:
        return None
    return lambda fraction, message: progress(low + (high - low) * fraction, message)


def merge_checkpoints(refs: Sequence[CheckpointRef], weights: Sequence[float], out_dir: Path,
                      output_dtype: str = "same", recipe: Recipe | None = None,
                      progress: Progress | None = None, *, force: bool = False,
                      out_shard_size: int | None = None, out_format: str | None = None,
                      hash_inputs: bool = False, executor: "Executor | None" = None) -> MergeResult:
    """Average ``refs`` with ``weights`` into ``out_dir``, in the layout of the newest input.

    The last of ``refs`` counts as the newest input: its non-floating tensors, its tensor
    names and its side files (config, tokenizer) are what the output gets. ``out_format``
    (default: the recipe's, else safetensors): "torch" or "lightning" write one torch file instead.

    Raises:
        MergeError: the target exists (without ``force``; with it, holds what no merge wrote), is,
            holds or lies in an input, or the disk is too small.
        OutputError: the storage refuses the write (read-only, no permission).
        CheckpointMismatch: the inputs do not share tensor names and shapes.
        InvalidArgument: bad weights, dtype or shard size.
    """
    if not refs:
        raise MergeError("nothing to merge: no checkpoints given")
    weights = normalize_weights(weights, len(refs), [str(r.path) for r in refs])
    out_dir = output_target(out_dir)
    replaced = _check_any_target(out_dir, refs, force)
    recipe = recipe if recipe is not None else Recipe("manual", (), output_dtype)
    out_format = out_format or recipe.output_format
    recipe = replace(recipe, output_format=out_format)   # the recipe beside the merge says which file it holds
    if executor is not None:
        distributed.check_supported(out_format)
    nonfinite = _NonFinite(refs)
    with ExitStack() as stack:
        handles = [stack.enter_context(open_checkpoint(r.path, r.layout)) for r in refs]
        layout, plan = _plan(handles, refs, output_dtype, out_shard_size, out_format, executor)

        def write(folder: Path, on_file: Callable[[Path], None] | None = None,
                  bucket: "BucketUpload | None" = None) -> int:
            return _write(folder, handles, weights, layout, plan, refs, recipe, output_dtype, progress, nonfinite,
                          hash_inputs, on_file, executor, bucket)

        if isinstance(out_dir, RemotePath):
            size, files, stale = *_write_to_bucket(out_dir, replaced, plan, write), StaleFolders()
        else:
            size, files, stale = _write_to_folder(out_dir, plan, write, force, progress)
    model_file = out_dir / plan.model_file
    return MergeResult(out_dir, model_file, out_dir / RECIPE_FILE, size, len(layout),
                       tuple(r.step for r in refs), weights, files, plan.sharded, stale,
                       nonfinite.warnings(output_dtype), out_format, format_suggestion(refs[-1].path, out_format))


def output_target(out_dir: "str | Path | RemotePath") -> "Path | RemotePath":
    """Where the merge goes: a prefix in object storage for a URL (issue 22), else the resolved local folder."""
    return as_path(out_dir) if is_remote(out_dir) else Path(out_dir).expanduser().resolve()


def _check_any_target(out_dir: "Path | RemotePath", refs: Sequence[CheckpointRef], force: bool) -> tuple[str, ...]:
    """:func:`check_target` for a folder, :func:`check_bucket_target` for a prefix; the keys a forced merge replaces.

    Also refuses a remote sharded input that is an incomplete merge output (a killed merge's shards).
    """
    for ref in refs:
        if isinstance(ref.path, RemotePath) and len(ref.files) > 1:
            note = incomplete_output(ref.path if ref.path.is_dir() else ref.path.parent)
            if note:
                raise MergeError(note)
    if isinstance(out_dir, RemotePath):
        return check_bucket_target(out_dir, [p for r in refs for p in (r.path, *r.files)], force)
    check_target(out_dir, refs, force)
    return ()


def _write_to_folder(out_dir: Path, plan: OutputPlan, write: Callable[[Path], int], force: bool,
                     progress: Progress | None) -> tuple[int, tuple[str, ...], StaleFolders]:
    """Write into a hidden folder beside ``out_dir`` and rename it into place: (bytes, file names, stale removed)."""
    stale = remove_stale_hidden_folders(out_dir)
    if stale.paths and progress is not None:
        progress(0.0, stale.describe())
    tmp = _make_partial(out_dir)
    try:
        check_disk(out_dir, plan.size_bytes)
        with storage_errors(out_dir):
            size = write(tmp)
            _publish(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size, tuple(sorted(p.name for p in out_dir.iterdir())), stale


def _write_to_bucket(prefix: RemotePath, replaced: Sequence[str], plan: OutputPlan,
                     write: Callable[[Path, Callable[[Path], None]], int]) -> tuple[int, tuple[str, ...]]:
    """Write file by file into local scratch, each uploaded and deleted once written, the recipe last
    (:mod:`analysis.merge.bucket`); on failure the uploaded objects are deleted. (bytes, object names)."""
    with BucketUpload(prefix, replaced) as upload:
        check_disk(upload.scratch / "output", plan.largest_file_bytes)
        with storage_errors(upload.scratch):
            size = write(upload.scratch, upload.send, upload)
        upload.commit()
    return size, tuple(sorted(upload.sizes))


def _make_partial(out_dir: Path) -> Path:
    """Create the hidden folder the merge is written into: the first write, where read-only storage stops it.

    Raises:
        OutputError: the storage refuses (read-only, no permission), naming ``out_dir``.
    """
    tmp = out_dir.parent / _hidden_name(out_dir, "partial")
    with storage_errors(out_dir):
        tmp.mkdir(parents=True)
    return tmp


class _NonFinite:
    """What the merge's pass found not finite: the inputs holding NaN/Inf, and averages of finite
    inputs that overflow the output dtype. The recommender leaves such inputs out; a merge of
    checkpoints named by hand keeps them, and says so (issue 19)."""

    def __init__(self, refs: Sequence[CheckpointRef]) -> None:
        self._refs = refs
        self._inputs: dict[int, str] = {}     # input position -> first tensor found not finite
        self._overflow: list[str] = []

    def __call__(self, info: TensorInfo, inputs: tuple[int, ...]) -> None:
        for index in inputs:
            self._inputs.setdefault(index, info.name)
        if not inputs and info.name not in self._overflow:
            self._overflow.append(info.name)

    def warnings(self, output_dtype: str) -> tuple[str, ...]:
        lines = [f"{self._refs[i].path}: holds NaN or Inf values (first in tensor {name!r}), so the merged model does "
                 "too; the recommender leaves such checkpoints out" for i, name in sorted(self._inputs.items())]
        if self._overflow:
            more = f" (+{len(self._overflow) - 1} more)" if len(self._overflow) > 1 else ""
            lines.append(f"the average of tensor {self._overflow[0]!r}{more} overflows the output dtype "
                         f"({output_dtype}) to Inf; choose a wider --dtype")
        return tuple(lines)


def _hidden_name(out_dir: Path, kind: str) -> str:
    """A hidden folder's name beside the target (``partial``: the merge being written; ``old``: a
    replaced output set aside by ``--force``), with the writer's host and pid, so a later merge
    can tell that its writer died."""
    return f".{out_dir.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_hidden_folders(out_dir: Path) -> StaleFolders:
    """Delete the hidden folders killed merges left in ``out_dir``'s folder; say which and how many bytes.

    A half-written merge (``.NAME.partial-``) goes whatever its output name (issue 19: a killed
    merge's tens of MB stayed until a merge to the same name). An output that ``--force`` had set
    aside (``.NAME.old-``, left when the kill fell between the two renames) goes only for
    ``out_dir``'s own name, which this merge replaces anyway: for another name it may be the only
    copy left. Only folders written on this host by a process that no longer exists are removed:
    a running merge's folder, another host's (on a shared file system), or one whose name has no
    pid (written before names carried one) are left alone.
    """
    parent = out_dir.parent
    candidates = sorted(p for p in parent.iterdir() if p.name.startswith(".")) if parent.is_dir() else []
    removed, freed = [], 0
    for path in candidates:
        if _is_stale(path, out_dir.name):
            size = _tree_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():   # read-only storage, say, keeps it: then it is not reported as removed
                removed.append(path)
                freed += size
    return StaleFolders(tuple(removed), freed)


def _is_stale(path: Path, out_name: str) -> bool:
    """A hidden merge folder (see ``_HIDDEN``) of a dead process on this host, that may go (see above)."""
    match = _HIDDEN.match(path.name)
    if match is None or path.is_symlink() or not path.is_dir():
        return False
    if match["kind"] == "old" and match["name"] != out_name:
        return False
    host, pid = _hidden_owner(match["owner"])
    return host == socket.gethostname() and pid is not None and not process_alive(pid)


def _tree_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (symlinks not followed)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _hidden_owner(suffix: str) -> tuple[str | None, int | None]:
    """``HOST-PID-HEX`` (HEX: 8 hex digits) -> (host, pid); (None, None) for other names."""
    parts = suffix.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not re.fullmatch(r"[0-9a-f]{8}", parts[2]):
        return None, None
    return parts[0], int(parts[1])


def plan_merge(refs: Sequence[CheckpointRef], weights: Sequence[float], out_dir: Path, output_dtype: str = "same",
               *, force: bool = False, out_shard_size: int | None = None,
               out_format: str = "safetensors") -> MergePlan:
    """What :func:`merge_checkpoints` would read and write, its peak memory and time; writes nothing.

    Raises the same errors as the merge would before writing (target, mismatch, disk).
    """
    weights = normalize_weights(weights, len(refs), [str(r.path) for r in refs])
    out_dir = output_target(out_dir)
    _check_any_target(out_dir, refs, force)
    with ExitStack() as stack:
        handles = [stack.enter_context(open_checkpoint(r.path, r.layout)) for r in refs]
        layout, plan = _plan(handles, refs, output_dtype, out_shard_size, out_format)
        if isinstance(out_dir, RemotePath):   # local scratch holds one file of the output at a time
            free = check_disk(Path(tempfile.gettempdir()) / "output", plan.largest_file_bytes)
        else:
            free = check_disk(out_dir, plan.size_bytes)
        adder = arithmetic(handles, layout)     # first: loading the kernel is not the probe's to time
        peak, projected = project(handles, weights, layout, plan)
    files = plan.files + (RECIPE_FILE, MERGEKIT_FILE)
    return MergePlan(tuple((r.path, r.size_bytes) for r in refs), out_dir, files, plan.size_bytes, len(layout),
                     out_dir.exists(), free, peak, projected, adder)


def _plan(handles, refs: Sequence[CheckpointRef], output_dtype: str, out_shard_size: int | None,
          out_format: str = "safetensors", executor: "Executor | None" = None) -> tuple[list[TensorInfo], OutputPlan]:
    """The output's headers (matched names) and its files (stored names of the newest input);
    with an executor, shards balanced by bytes for its units (:func:`distributed.group_plan`)."""
    layout = output_layout(check_same_layout(handles), output_dtype)
    stored = [replace(info, name=original_name(handles[-1], info.name)) for info in layout]
    plan = plan_output(handles[-1], refs[-1].path, stored, out_shard_size, out_format)
    if executor is not None:
        plan = distributed.balanced_plan(plan, handles, layout, executor.slots)
    return layout, plan


def _write(tmp: Path, handles, weights, layout: list[TensorInfo], plan: OutputPlan, refs, recipe: Recipe,
           output_dtype: str, progress: Progress | None, nonfinite: "_NonFinite | None" = None,
           hash_inputs: bool = False, on_file: Callable[[Path], None] | None = None,
           executor: "Executor | None" = None, bucket: "BucketUpload | None" = None) -> int:
    """Write the model, our recipe and the mergekit config into ``tmp``; return the weights' bytes.

    ``on_file`` is called with each weights file once it is complete (a bucket output uploads it then);
    with an ``executor`` the units write the shards (to a bucket output, each unit uploads its own shard).
    """
    recipe_text = dump_recipe(recipe) if recipe.checkpoints else ""
    metadata = {
        "format": "pt",
        # The recipe as the merge began: hashes the read pass fills in come after the header is written.
        MERGE_MARKER_KEY: hashlib.sha256(recipe_text.encode()).hexdigest(),
        "merged_steps": ",".join(str(r.step) for r in refs),
        "merged_weights": ",".join(f"{w:.8g}" for w in weights),
    }
    # Inputs are matched under normalised names (module./_orig_mod./model. stripped); the output
    # keeps the newest input's own names so it loads where that checkpoint loaded.
    # A hashing thread only when there is something to hash (--sha256 and inputs the recipe has no sha256 for).
    unhashed = _unhashed_files(recipe, refs) if hash_inputs else []
    if executor is not None:   # the units write the shards; the index is written once all of them succeeded
        size = distributed.run_units(executor, tmp, handles, refs, weights, layout, plan, metadata, output_dtype,
                                     _scaled(progress, 0.0, 0.5) if unhashed else progress, nonfinite, bucket)
        # no single read pass to hash from: one unit per file, spread over the cluster (hash_units.py)
        digests = hash_files(executor, unhashed, _scaled(progress, 0.5, 1.0)) if unhashed else None
        recipe = _with_read_hashes(recipe, refs, digests) if digests else _with_quick_hashes(recipe, refs)
    else:
        with ReadHashes(unhashed) if unhashed else nullcontext() as hashes:
            blocks = _stored_blocks(handles, weights, layout, progress, hashes, nonfinite)
            size = write_output(tmp, plan, blocks, metadata, output_dtype, on_file)
            recipe = _with_read_hashes(recipe, refs, hashes.finish()) if hashes else _with_quick_hashes(recipe, refs)
    if recipe_text:
        (tmp / RECIPE_FILE).write_text(dump_recipe(recipe))
        (tmp / MERGEKIT_FILE).write_text(dump_mergekit(recipe, newest=handles[-1].tensors()))
    return size


def _stored_blocks(handles, weights, layout: list[TensorInfo], progress: Progress | None,
                   hashes: ReadHashes | None = None,
                   nonfinite: "_NonFinite | None" = None) -> Iterator[tuple[str, int, np.ndarray]]:
    """The averaged blocks under the newest input's stored tensor names."""
    for info, start, block in stream_average(handles, weights, layout, progress, hashes, nonfinite):
        yield original_name(handles[-1], info.name), start, block


def _unhashed_files(recipe: Recipe, refs: Sequence[CheckpointRef]) -> list[Path]:
    """The files of the inputs the recipe has no sha256 for: the read pass hashes them."""
    return [f for entry, ref in zip(recipe.checkpoints, refs) if not entry.sha256 for f in ref.files]


def _with_quick_hashes(recipe: Recipe, refs: Sequence[CheckpointRef]) -> Recipe:
    """The recipe with the quick hash and size of each input it has no sha256 for (see the module docstring)."""
    entries = [entry if entry.sha256 else _fingerprinted(entry, ref) for entry, ref in zip(recipe.checkpoints, refs)]
    return replace(recipe, checkpoints=tuple(entries))


def _fingerprinted(entry: RecipeEntry, ref: CheckpointRef) -> RecipeEntry:
    """The entry with its size and ETag (a remote input: from the listing, free) or else its quick hash
    (~2 MiB read per file; for a remote object the ETag already fingerprints it, issue 22)."""
    etag = entry.etag or checkpoint_etag(ref.files)
    quick = entry.quick_hash or ("" if etag else checkpoint_quick_hash(ref.files))
    return replace(entry, quick_hash=quick, size_bytes=ref.size_bytes, etag=etag)


def _with_read_hashes(recipe: Recipe, refs: Sequence[CheckpointRef],
                      digests: dict[Path, tuple[str, tuple[int, list[bytes]]]]) -> Recipe:
    """The recipe with the read pass's sha256, quick hash and size for each input it had no sha256 for."""
    entries = []
    for entry, ref in zip(recipe.checkpoints, refs):
        if not entry.sha256:
            entry = replace(entry, sha256=combine_sha256({f: digests[f][0] for f in ref.files}),
                            quick_hash=entry.quick_hash or combine_quick_hash({f: digests[f][1] for f in ref.files}),
                            size_bytes=ref.size_bytes, etag=entry.etag or checkpoint_etag(ref.files))
        entries.append(entry)
    return replace(recipe, checkpoints=tuple(entries))


def _publish(tmp: Path, out_dir: Path, force: bool) -> None:
    """Make ``tmp`` durable, then rename it to ``out_dir`` (replacing an old one when forced).

    The rename is the only moment the target changes; with ``force`` the old folder is renamed
    aside first and deleted only once the new one is in place.
    """
    for path in tmp.iterdir():
        _fsync(path, os.O_RDONLY)
    _fsync(tmp, os.O_RDONLY)
    aside = None
    if force and out_dir.exists():
        aside = out_dir.parent / _hidden_name(out_dir, "old")
        os.rename(out_dir, aside)
    try:
        os.rename(tmp, out_dir)
    except OSError as e:
        if aside is not None:
            os.rename(aside, out_dir)
        raise MergeError(f"{out_dir}: could not move the merge into place ({e.strerror or e})") from e
    _fsync(out_dir.parent, os.O_RDONLY)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _fsync(path: Path, flags: int) -> None:
    """Persist a file's data or a folder's entries, so a crash cannot lose what the rename points at."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
