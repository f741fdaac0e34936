"""Streaming weighted merge into a new folder that appears only when complete.

Memory holds one output tensor plus one input tensor at a time (inputs are
memory-mapped). The output is written into a hidden temporary folder beside the
target and renamed into place at the end, so an interrupted merge leaves no
half-written model at the target path; inputs are never written to.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import yaml

from .averaging import check_same_layout, iter_average, normalize_weights, output_layout
from .checkpoints import open_checkpoint, original_name
from .checkpoints.safetensors_writer import SafetensorsWriter
from .errors import MergeError
from .recipe import Recipe, checkpoint_sha256, dump_recipe, to_mergekit
from .run import MERGE_MARKER_KEY, CheckpointRef, checkpoint_ref

MODEL_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"
MERGEKIT_FILE = "mergekit_config.yml"
# Free space kept beyond the output's size: file systems misbehave when completely full.
DISK_MARGIN_BYTES = 64 * 1024 * 1024

Progress = Callable[[float, str], None]


@dataclass(frozen=True, slots=True)
class MergeResult:
    """Where the merge went and what it holds."""

    out_dir: Path
    model_file: Path
    recipe_file: Path
    size_bytes: int
    n_tensors: int
    steps: tuple[int, ...]
    weights: tuple[float, ...]


def verify_inputs(recipe: Recipe, progress: Progress | None = None) -> None:
    """Check every input against the recipe: present, same size, same sha256.

    Raises:
        MergeError: naming each changed or missing input.
    """
    problems = []
    for index, entry in enumerate(recipe.checkpoints):
        if not entry.path.exists():
            problems.append(f"{entry.path}: missing")
            continue
        ref = checkpoint_ref(entry.path, entry.step)
        if entry.size_bytes and ref.size_bytes != entry.size_bytes:
            problems.append(f"{entry.path}: {ref.size_bytes} bytes, the recipe says {entry.size_bytes}")
            continue
        if entry.sha256:
            def file_progress(frac: float, msg: str, index: int = index) -> None:
                if progress is not None:
                    progress((index + frac) / len(recipe.checkpoints), msg)

            if checkpoint_sha256(ref.files, file_progress) != entry.sha256:
                problems.append(f"{entry.path}: sha256 differs from the recipe (the file changed)")
    if problems:
        raise MergeError("inputs do not match the recipe: " + "; ".join(problems))


def merge_recipe(recipe: Recipe, out_dir: Path, verify: bool = True, progress: Progress | None = None) -> MergeResult:
    """Merge what ``recipe`` says into ``out_dir`` (after checking the inputs' hashes)."""
    if verify:
        verify_inputs(recipe, progress)
    refs = [checkpoint_ref(e.path, e.step) for e in recipe.checkpoints]
    return merge_checkpoints(refs, recipe.weights, out_dir, recipe.output_dtype, recipe, progress)


def merge_checkpoints(refs: Sequence[CheckpointRef], weights: Sequence[float], out_dir: Path,
                      output_dtype: str = "same", recipe: Recipe | None = None,
                      progress: Progress | None = None) -> MergeResult:
    """Average ``refs`` with ``weights`` into ``out_dir/model.safetensors``.

    The last of ``refs`` counts as the newest input: its non-floating tensors are copied.

    Raises:
        MergeError: the target exists, is an input, or the disk is too small.
        CheckpointMismatch: the inputs do not share tensor names and shapes.
        InvalidArgument: bad weights or dtype.
    """
    if not refs:
        raise MergeError("nothing to merge: no checkpoints given")
    weights = normalize_weights(weights, len(refs))
    out_dir = Path(out_dir).expanduser().resolve()
    _check_target(out_dir, refs)
    if recipe is None:
        recipe = Recipe("manual", (), output_dtype)
    with ExitStack() as stack:
        handles = [stack.enter_context(open_checkpoint(r.path, r.layout)) for r in refs]
        layout = output_layout(check_same_layout(handles), output_dtype)
        _check_disk(out_dir, sum(i.size_bytes for i in layout))
        tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            size = _write_output(tmp, handles, weights, layout, refs, recipe, progress)
            _fsync_dir(tmp)
            os.rename(tmp, out_dir)
            _fsync_dir(out_dir.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return MergeResult(out_dir, out_dir / MODEL_FILE, out_dir / RECIPE_FILE, size, len(layout),
                       tuple(r.step for r in refs), weights)


def _write_output(tmp: Path, handles, weights, layout, refs, recipe: Recipe, progress: Progress | None) -> int:
    """Write the model, our recipe and the mergekit config into ``tmp``; return the model's bytes."""
    recipe_text = dump_recipe(recipe) if recipe.checkpoints else ""
    metadata = {
        "format": "pt",
        MERGE_MARKER_KEY: hashlib.sha256(recipe_text.encode()).hexdigest(),
        "merged_steps": ",".join(str(r.step) for r in refs),
        "merged_weights": ",".join(f"{w:.8g}" for w in weights),
    }
    # Inputs are matched under normalised names (module./_orig_mod./model. stripped); the output
    # keeps the newest input's own names so it loads where that checkpoint loaded.
    newest = handles[-1]
    stored = [replace(info, name=original_name(newest, info.name)) for info in layout]
    with SafetensorsWriter(tmp / MODEL_FILE, stored, metadata) as writer:
        for name, tensor in iter_average(handles, weights, layout, progress):
            writer.write(original_name(newest, name), tensor)
    if recipe_text:
        (tmp / RECIPE_FILE).write_text(recipe_text)
        (tmp / MERGEKIT_FILE).write_text(yaml.safe_dump(to_mergekit(recipe), sort_keys=False))
    return writer.total_bytes


def _check_target(out_dir: Path, refs: Sequence[CheckpointRef]) -> None:
    """Refuse an existing target and any target that is, or holds, an input."""
    if out_dir.exists():
        raise MergeError(f"{out_dir}: already exists; choose a new output folder (a merge never overwrites)")
    for ref in refs:
        if out_dir == ref.path or ref.path.is_relative_to(out_dir):
            raise MergeError(f"{out_dir}: is or contains the input {ref.path}")


def _check_disk(out_dir: Path, needed: int) -> None:
    """Stop before writing if the target's file system cannot hold the output."""
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < needed + DISK_MARGIN_BYTES:
        raise MergeError(f"{parent}: {free / 1e9:.2f} GB free, the merge needs {needed / 1e9:.2f} GB "
                         f"(+{DISK_MARGIN_BYTES / 1e6:.0f} MB margin)")


def _fsync_dir(path: Path) -> None:
    """Persist a folder's entries (the rename) so a crash cannot lose them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

