"""Carry out a prune plan: move to a trash folder first, delete only once every move succeeded.

Every move is a rename on one file system, so a crash (even ``kill -9``) at any moment leaves each
file either in place or in the trash, never lost or half-copied. A manifest written into the trash
before the first move lists every move; :func:`restore_trash` moves them back.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..errors import InvalidArgument, OutputError
from ..paths import resolve_within
from ..remote import RemotePath, is_remote
from ..targets import fsync_folder
from .guards import TRASH_FOLDER, still_as_planned
from .plan import PrunePlan
from .results import MANIFEST, PruneRefused, PruneResult, RestoreResult, check_prune_allowed, check_trash_place

__all__ = ["MANIFEST", "PruneRefused", "PruneResult", "RestoreResult", "apply_prune", "check_prune_allowed",
           "restore_trash"]


def apply_prune(plan: PrunePlan, trash: Path | None = None, *, keep_trash: bool = False, root: Path | None = None,
                allow_prune: bool = False, progress: Callable[[float, str], None] | None = None) -> PruneResult:
    """Move every checkpoint the plan deletes into ``TRASH/<UTC time>/`` (relative paths kept), then delete it.

    A checkpoint changed since the plan (size, modification time, a file written in the last minute) is
    left in place. The trash is emptied only after every move succeeded; ``keep_trash`` leaves it full.

    Args:
        plan: from :func:`plan_prune`.
        trash: the trash folder (default ``RUN/.ckpt-select-trash``); on the run's file system (a run in a
            bucket: a prefix in the same bucket, see :mod:`.remote_apply`).
        keep_trash: leave the moved checkpoints in the trash (restore with the printed command).
        root, allow_prune: the app's ``--root`` and ``--allow-prune`` (None, as on the command line: allowed).
        progress: ``progress(fraction, message)`` after each move.

    Raises:
        PruneRefused: under a root without allow_prune, or a trash folder inside a checkpoint or the run's view.
        OutputError: a move or the deletion failed (what moved stays in the trash; the message says how to restore).
    """
    check_prune_allowed(root, allow_prune)
    if isinstance(plan.run_path, RemotePath):   # no rename in a bucket: copy server-side, then delete (issue 22)
        from .remote_apply import apply_remote_prune
        return apply_remote_prune(plan, trash, keep_trash=keep_trash, progress=progress)
    if trash is not None and is_remote(trash):
        raise PruneRefused(f"{trash}: the trash of a local run must be a folder on its disk, not a URL")
    base = _trash_base(plan, trash, root)
    todo, skipped = still_as_planned(plan.deleted)
    if not todo:
        return PruneResult(None, (), tuple(skipped), False, None)
    trash_dir = base / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    moves = [(unit, trash_dir / unit.relative_to(plan.run_path)) for item in todo for unit in item.moves]
    _write_manifest(trash_dir, plan.run_path, moves, "moving")
    restore = f"ckpt-select prune {shlex.quote(str(plan.run_path))} --restore {shlex.quote(str(trash_dir))}"
    _move_all(moves, trash_dir, restore, progress)
    if keep_trash:
        _write_manifest(trash_dir, plan.run_path, moves, "moved")
        return PruneResult(trash_dir, tuple(todo), tuple(skipped), False, restore)
    _write_manifest(trash_dir, plan.run_path, moves, "deleting")
    _empty(trash_dir, base, [dest for _, dest in moves])
    return PruneResult(trash_dir, tuple(todo), tuple(skipped), True, None)


def _trash_base(plan: PrunePlan, trash: Path | None, root: Path | None) -> Path:
    """The trash folder, checked: within the root, in no checkpoint, hidden if in the run, on the run's disk."""
    run = plan.run_path
    base = resolve_within(trash, root) if trash is not None else run / TRASH_FOLDER
    check_trash_place(base, plan)
    existing = next(p for p in (base, *base.parents) if p.exists())
    if os.stat(existing).st_dev != os.stat(run).st_dev:
        raise PruneRefused(f"{base}: on another file system than the run {run}; a move there would be a copy, "
                           "which a crash could leave half done. Choose a trash folder on the same disk")
    return base


def _move_all(moves: list[tuple[Path, Path]], trash_dir: Path, restore: str,
              progress: Callable[[float, str], None] | None) -> None:
    """Rename each unit into the trash, syncing the trash's folders so a crash keeps what moved."""
    for done, (source, dest) in enumerate(moves):
        try:
            if dest.exists() or dest.is_symlink():
                raise FileExistsError(f"{dest} exists")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, dest)
            fsync_folder(dest.parent)
        except OSError as e:
            raise OutputError(source, f"could not move it to the trash ({e.strerror or e}); {done} of {len(moves)} "
                                      f"moves done, nothing deleted; restore with: {restore}") from e
        if progress is not None:
            progress((done + 1) / len(moves), f"moved {source.name}")


def _empty(trash_dir: Path, base: Path, moved: list[Path]) -> None:
    """Delete what moved, then the manifest and the folder (a crash midway leaves the manifest to say so)."""
    try:
        for dest in moved:
            shutil.rmtree(dest) if dest.is_dir() and not dest.is_symlink() else dest.unlink()
        shutil.rmtree(trash_dir)
    except OSError as e:
        raise OutputError(trash_dir, f"every checkpoint moved to this trash, but deleting it failed "
                                     f"({e.strerror or e}); delete it by hand") from e
    _remove_if_empty(base)


def _remove_if_empty(base: Path) -> None:
    """The default trash folder goes when it is empty; a folder the user named stays."""
    if base.name == TRASH_FOLDER:
        try:
            base.rmdir()
        except OSError:
            pass


def _write_manifest(trash_dir: Path, run: Path, moves: list[tuple[Path, Path]], state: str) -> None:
    """The list of moves, written atomically (temporary file, fsync, rename) before the first and after the last."""
    trash_dir.mkdir(parents=True, exist_ok=True)
    doc = {"run": str(run), "state": state, "moves": [str(src.relative_to(run)) for src, _ in moves]}
    tmp = trash_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(doc, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, trash_dir / MANIFEST)
    fsync_folder(trash_dir)



def restore_trash(trash_dir: Path | str, *, root: Path | None = None, allow_prune: bool = False) -> RestoreResult:
    """Move every checkpoint of a prune's trash folder back where it was; never over an existing file.

    Raises:
        InvalidArgument: not a prune's trash folder (no readable manifest).
        PruneRefused: under the app's root without allow_prune.
    """
    check_prune_allowed(root, allow_prune)
    if is_remote(trash_dir):
        from .remote_apply import restore_remote_trash
        return restore_remote_trash(str(trash_dir))
    trash_dir = resolve_within(trash_dir, root)
    try:
        doc = json.loads((trash_dir / MANIFEST).read_text())
        run, rels = Path(doc["run"]), [str(r) for r in doc["moves"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"{trash_dir}: not a prune's trash folder (no readable {MANIFEST}: {e})") from None
    restored, left = [], []
    for rel in rels:
        source, dest = trash_dir / rel, run / rel
        if not (source.exists() or source.is_symlink()):
            continue   # never moved (a crash came first) or restored already
        if dest.exists() or dest.is_symlink():
            left.append((source, f"{dest} exists; left in the trash"))
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, dest)
        restored.append(dest)
    if not left:
        shutil.rmtree(trash_dir)
        _remove_if_empty(trash_dir.parent)
    return RestoreResult(trash_dir, tuple(restored), tuple(left))
