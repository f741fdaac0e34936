"""Everything a merge checks before it writes a byte.

Inputs against the recipe (``full``: sha256 of every byte; ``quick``: size and a sampled
fingerprint; ``none``), the target (never an input, never an existing folder unless
forced) and free disk space. The dry run's projection is planning: :mod:`analysis.merge.plan`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

from ..errors import InvalidArgument, MergeError
from ..hashing import checkpoint_quick_hash, checkpoint_sha256
from ..recipe import Recipe
from ..run import CheckpointRef, checkpoint_ref

VERIFY_MODES = ("full", "quick", "none")
# Free space kept beyond the output's size: file systems misbehave when completely full.
DISK_MARGIN_BYTES = 64 * 1024 * 1024

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
                  refs: Sequence[CheckpointRef | None] | None = None) -> None:
    """Check every input against the recipe: present, same size, same hash.

    ``quick`` compares the quick hash; a recipe written before quick hashes existed falls
    back to its sha256, so old recipes are checked as thoroughly as before. ``refs``: the
    inputs as :func:`resolve_inputs` found them (resolved here when not given).

    Raises:
        MergeError: naming each changed or missing input.
    """
    if verify_mode(mode) == "none":
        return
    refs = resolve_inputs(recipe) if refs is None else refs
    problems = []
    for index, (entry, ref) in enumerate(zip(recipe.checkpoints, refs)):
        if ref is None:
            problems.append(f"{entry.path}: missing")
            continue
        if entry.size_bytes and ref.size_bytes != entry.size_bytes:
            problems.append(f"{entry.path}: {ref.size_bytes} bytes, the recipe says {entry.size_bytes} (the file changed)")
        elif mode == "quick" and entry.quick_hash:
            if checkpoint_quick_hash(ref.files) != entry.quick_hash:
                problems.append(f"{entry.path}: quick hash differs from the recipe (the file changed)")
        elif entry.sha256 and checkpoint_sha256(ref.files, _part(progress, index, len(recipe.checkpoints))) != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs from the recipe (the file changed)")
    if problems:
        raise MergeError("inputs do not match the recipe: " + "; ".join(problems))


def _part(progress: Progress | None, index: int, count: int) -> Progress | None:
    """Progress of input ``index`` of ``count`` as a share of the whole check."""
    if progress is None:
        return None
    return lambda frac, msg: progress((index + frac) / count, msg)


def check_target(out_dir: Path, refs: Sequence[CheckpointRef], force: bool) -> None:
    """Refuse a target that is, holds or lies in an input's files, and an existing one unless forced."""
    for ref in refs:
        for path in (ref.path, *ref.files):
            if out_dir == path or path.is_relative_to(out_dir):
                raise MergeError(f"{out_dir}: is or contains the input {path}; a merge never writes over an input")
    if out_dir.exists() and not force:
        raise MergeError(f"{out_dir}: already exists; choose a new output folder, or pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"{out_dir}: exists and is not a folder; a merge replaces only a folder")


def check_disk(out_dir: Path, needed: int) -> int:
    """Stop before writing if the target's file system cannot hold the output; return free bytes."""
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < needed + DISK_MARGIN_BYTES:
        raise MergeError(f"{parent}: {free / 1e9:.2f} GB free, the merge needs {needed / 1e9:.2f} GB "
                         f"(+{DISK_MARGIN_BYTES / 1e6:.0f} MB margin)")
    return free
