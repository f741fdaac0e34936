"""Streaming weighted merge into a new folder that appears only when complete.

Memory holds a few blocks of every input, never a whole tensor of the output
(see :mod:`analysis.merge.arithmetic`). The output is written into a hidden temporary folder
beside the target and renamed into place at the end, so an interrupted merge (even
``kill -9``) leaves either no output or a complete one at the target path; inputs are
never written to. ``force`` replaces an existing target: the old one is renamed aside,
the new one renamed in, then the old one deleted.

Hashes: an input the recipe has no sha256 for (``merge --checkpoints``, a mergekit config) is
hashed in the merge's own read pass, not in a pass of its own before it. The reader hands every
range it reads to a per-file sha256 on a thread of its own (:class:`analysis.merge.read.ReadHashes`);
what the reader never reads (the header, side files like config.json, the integer tensors of the
older inputs, a pickle's bytes, which torch reads) is read and hashed in file order as a gap or
at the end. So the recipe written beside the merge records the true ``sha256sum`` of every input
file, never a partial hash under that name, while each tensor byte is read once. The quick hash
is taken from the same bytes. The ``ckpt_select_recipe_sha256`` marker in the output's header
hashes the recipe as the merge began: the header is written before the read pass ends.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import yaml

from ..checkpoints import TensorInfo, open_checkpoint, original_name
from ..errors import MergeError
from ..hashing import combine_quick_hash, combine_sha256
from ..recipe import Recipe, dump_recipe, to_mergekit
from ..run import MERGE_MARKER_KEY, CheckpointRef, checkpoint_ref
from .average import arithmetic, stream_average
from .output import INDEX_FILE, MODEL_FILE, OutputPlan, plan_output, write_output
from .plan import check_same_layout, normalize_weights, output_layout
from .read import ReadHashes
from .verify import (DISK_MARGIN_BYTES, MergePlan, check_disk, check_target, project, resolve_inputs, verify_inputs,
                     verify_mode)

RECIPE_FILE = "recipe.yaml"
MERGEKIT_FILE = "mergekit_config.yml"

Progress = Callable[[float, str], None]

__all__ = ["DISK_MARGIN_BYTES", "MERGEKIT_FILE", "MODEL_FILE", "MergePlan", "MergeResult", "RECIPE_FILE", "dry_run",
           "merge", "merge_checkpoints", "merge_recipe", "plan_merge", "verify_inputs"]


@dataclass(frozen=True, slots=True)
class MergeResult:
    """Where the merge went and what it holds."""

    out_dir: Path
    model_file: Path            # model.safetensors, or model.safetensors.index.json when sharded
    recipe_file: Path
    size_bytes: int             # of the weight files
    n_tensors: int
    steps: tuple[int, ...]
    weights: tuple[float, ...]
    files: tuple[str, ...] = ()  # every file written into out_dir
    sharded: bool = False


def merge(recipe: Recipe, out_dir: Path, *, verify: bool | str = "quick", progress: Progress | None = None,
          force: bool = False, out_shard_size: int | None = None) -> MergeResult:
    """Merge what ``recipe`` says into ``out_dir`` after checking the inputs (``verify``: full|quick|none).

    Each input's reference is resolved once, here, and used by the check and the merge. Inputs
    the recipe has no sha256 for (an ad-hoc ``merge --checkpoints``, a mergekit config) are hashed
    in the merge's own read pass, and the recipe written beside the merge carries those hashes.
    Progress runs from 0 to 1 once: a full check (hashing every byte) takes the first half.
    """
    mode = verify_mode(verify)
    share = 0.5 if mode == "full" else 0.0
    refs = resolve_inputs(recipe)
    verify_inputs(recipe, _scaled(progress, 0.0, share), mode, refs)
    found = [ref or checkpoint_ref(e.path, e.step) for ref, e in zip(refs, recipe.checkpoints)]
    return merge_checkpoints(found, recipe.weights, out_dir, recipe.output_dtype, recipe,
                             _scaled(progress, share, 1.0), force=force, out_shard_size=out_shard_size)


def merge_recipe(recipe: Recipe, out_dir: Path, verify: bool | str = "quick", progress: Progress | None = None,
                 *, force: bool = False, out_shard_size: int | None = None) -> MergeResult:
    """:func:`merge` with ``verify`` and ``progress`` by position, as callers before :func:`merge` wrote it."""
    return merge(recipe, out_dir, verify=verify, progress=progress, force=force, out_shard_size=out_shard_size)


def dry_run(recipe: Recipe, out_dir: Path, *, force: bool = False, out_shard_size: int | None = None) -> MergePlan:
    """:func:`plan_merge` for a recipe: what ``merge --dry-run`` reports; writes nothing."""
    refs = [checkpoint_ref(e.path, e.step) for e in recipe.checkpoints]
    return plan_merge(refs, recipe.weights, out_dir, recipe.output_dtype, force=force, out_shard_size=out_shard_size)


def _scaled(progress: Progress | None, low: float, high: float) -> Progress | None:
    """``progress`` with fractions mapped into [low, high]."""
    if progress is None:
        return None
    return lambda fraction, message: progress(low + (high - low) * fraction, message)


def merge_checkpoints(refs: Sequence[CheckpointRef], weights: Sequence[float], out_dir: Path,
                      output_dtype: str = "same", recipe: Recipe | None = None,
                      progress: Progress | None = None, *, force: bool = False,
                      out_shard_size: int | None = None) -> MergeResult:
    """Average ``refs`` with ``weights`` into ``out_dir``, in the layout of the newest input.

    The last of ``refs`` counts as the newest input: its non-floating tensors, its tensor
    names and its side files (config, tokenizer) are what the output gets.

    Raises:
        MergeError: the target exists (without ``force``), is an input, or the disk is too small.
        CheckpointMismatch: the inputs do not share tensor names and shapes.
        InvalidArgument: bad weights, dtype or shard size.
    """
    if not refs:
        raise MergeError("nothing to merge: no checkpoints given")
    weights = normalize_weights(weights, len(refs))
    out_dir = Path(out_dir).expanduser().resolve()
    check_target(out_dir, refs, force)
    recipe = recipe if recipe is not None else Recipe("manual", (), output_dtype)
    with ExitStack() as stack:
        handles = [stack.enter_context(open_checkpoint(r.path, r.layout)) for r in refs]
        layout, plan = _plan(handles, refs, output_dtype, out_shard_size)
        remove_stale_hidden_folders(out_dir)
        check_disk(out_dir, plan.size_bytes)
        tmp = out_dir.parent / _hidden_name(out_dir, "partial")
        tmp.mkdir(parents=True)
        try:
            size = _write(tmp, handles, weights, layout, plan, refs, recipe, output_dtype, progress)
            _publish(tmp, out_dir, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    model_file = out_dir / (INDEX_FILE if plan.sharded else MODEL_FILE)
    files = tuple(sorted(p.name for p in out_dir.iterdir()))
    return MergeResult(out_dir, model_file, out_dir / RECIPE_FILE, size, len(layout),
                       tuple(r.step for r in refs), weights, files, plan.sharded)


def _hidden_name(out_dir: Path, kind: str) -> str:
    """A hidden folder's name beside the target (``partial``: the merge being written; ``old``: a
    replaced output set aside by ``--force``), with the writer's host and pid, so a later merge
    can tell that its writer died."""
    return f".{out_dir.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_hidden_folders(out_dir: Path) -> list[Path]:
    """Delete hidden folders of ``out_dir`` left by merges that were killed; return them.

    Both a half-written merge (``.partial-``) and an output that ``--force`` had set aside
    for replacement (``.old-``, left when the kill fell between the two renames) go. Only
    folders written on this host by a process that no longer exists are removed: a running
    merge's folder, another host's (on a shared file system), or one whose name has no pid
    (written before names carried one) are left alone.
    """
    removed = []
    host = socket.gethostname()
    for kind in ("partial", "old"):
        prefix = f".{out_dir.name}.{kind}-"
        for path in out_dir.parent.glob(f"{prefix}*"):
            owner, pid = _hidden_owner(path.name.removeprefix(prefix))
            if owner == host and pid is not None and not _alive(pid) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _hidden_owner(suffix: str) -> tuple[str | None, int | None]:
    """``HOST-PID-HEX`` -> (host, pid); (None, None) for other names."""
    parts = suffix.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None, None
    return parts[0], int(parts[1])


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one we may not signal still counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def plan_merge(refs: Sequence[CheckpointRef], weights: Sequence[float], out_dir: Path, output_dtype: str = "same",
               *, force: bool = False, out_shard_size: int | None = None) -> MergePlan:
    """What :func:`merge_checkpoints` would read and write, its peak memory and time; writes nothing.

    Raises the same errors as the merge would before writing (target, mismatch, disk).
    """
    weights = normalize_weights(weights, len(refs))
    out_dir = Path(out_dir).expanduser().resolve()
    check_target(out_dir, refs, force)
    with ExitStack() as stack:
        handles = [stack.enter_context(open_checkpoint(r.path, r.layout)) for r in refs]
        layout, plan = _plan(handles, refs, output_dtype, out_shard_size)
        free = check_disk(out_dir, plan.size_bytes)
        adder = arithmetic(handles, layout)     # first: loading the kernel is not the probe's to time
        peak, projected = project(handles, weights, layout, plan)
    files = plan.files + (RECIPE_FILE, MERGEKIT_FILE)
    return MergePlan(tuple((r.path, r.size_bytes) for r in refs), out_dir, files, plan.size_bytes, len(layout),
                     out_dir.exists(), free, peak, projected, adder)


def _plan(handles, refs: Sequence[CheckpointRef], output_dtype: str,
          out_shard_size: int | None) -> tuple[list[TensorInfo], OutputPlan]:
    """The output's headers (matched names) and its files (stored names of the newest input)."""
    layout = output_layout(check_same_layout(handles), output_dtype)
    stored = [replace(info, name=original_name(handles[-1], info.name)) for info in layout]
    return layout, plan_output(handles[-1], refs[-1].path, stored, out_shard_size)


def _write(tmp: Path, handles, weights, layout: list[TensorInfo], plan: OutputPlan, refs, recipe: Recipe,
           output_dtype: str, progress: Progress | None) -> int:
    """Write the model, our recipe and the mergekit config into ``tmp``; return the weights' bytes."""
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
    with ReadHashes(_unhashed_files(recipe, refs)) as hashes:
        blocks = _stored_blocks(handles, weights, layout, progress, hashes)
        size = write_output(tmp, plan, blocks, metadata, output_dtype)
        recipe = _with_read_hashes(recipe, refs, hashes.finish())
    if recipe_text:
        (tmp / RECIPE_FILE).write_text(dump_recipe(recipe))
        same = layout[0].dtype if layout and output_dtype == "same" else None
        (tmp / MERGEKIT_FILE).write_text(yaml.safe_dump(to_mergekit(recipe, same_dtype=same), sort_keys=False))
    return size


def _stored_blocks(handles, weights, layout: list[TensorInfo], progress: Progress | None,
                   hashes: ReadHashes | None = None) -> Iterator[tuple[str, int, np.ndarray]]:
    """The averaged blocks under the newest input's stored tensor names."""
    for info, start, block in stream_average(handles, weights, layout, progress, hashes):
        yield original_name(handles[-1], info.name), start, block


def _unhashed_files(recipe: Recipe, refs: Sequence[CheckpointRef]) -> list[Path]:
    """The files of the inputs the recipe has no sha256 for: the read pass hashes them."""
    return [f for entry, ref in zip(recipe.checkpoints, refs) if not entry.sha256 for f in ref.files]


def _with_read_hashes(recipe: Recipe, refs: Sequence[CheckpointRef],
                      digests: dict[Path, tuple[str, tuple[int, list[bytes]]]]) -> Recipe:
    """The recipe with the read pass's sha256, quick hash and size for each input it had no sha256 for."""
    entries = []
    for entry, ref in zip(recipe.checkpoints, refs):
        if not entry.sha256:
            entry = replace(entry, sha256=combine_sha256({f: digests[f][0] for f in ref.files}),
                            quick_hash=entry.quick_hash or combine_quick_hash({f: digests[f][1] for f in ref.files}),
                            size_bytes=ref.size_bytes)
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
