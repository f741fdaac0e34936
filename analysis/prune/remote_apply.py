"""Carry out a prune plan on a run in object storage: copy into a trash prefix, delete only what was copied.

Object stores have no rename, so a move is a server-side copy (no byte comes to this machine; s3fs
copies objects over its threshold part by part, server-side too) followed by a delete. The order
makes a crash harmless at any moment: the manifest ``TRASH/<UTC>-<id>/ckpt-select-prune.json``,
listing every object to move, is written before the first copy; a checkpoint's originals are
deleted only once each of its copies is in the trash with the original's size; the trash copies
are deleted only once every checkpoint moved, and the manifest last. So each object is in place,
in the trash, or in both, never lost, and :func:`restore_remote_trash` copies back whatever is
missing from the run. Every request goes through the one counted, retried :class:`~analysis.remote.Store`.
"""

from __future__ import annotations

import json
import shlex
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..errors import InvalidArgument, RemoteError
from ..remote import RemotePath, is_url
from ..remote.path import object_version
from .guards import TRASH_FOLDER, objects_under, still_as_planned
from .plan import PruneItem, PrunePlan
from .results import MANIFEST, PruneRefused, PruneResult, RestoreResult, check_trash_place


@dataclass(frozen=True, slots=True)
class _Copy:
    """One object a prune moves: where it is, where its trash copy goes, its size and ETag at plan time."""

    source: RemotePath
    dest: RemotePath
    size: int
    etag: str | None


def apply_remote_prune(plan: PrunePlan, trash: Path | str | None = None, *, keep_trash: bool = False,
                       progress: Callable[[float, str], None] | None = None) -> PruneResult:
    """Move every checkpoint the plan deletes into the trash prefix by server-side copies, then delete it.

    Raises:
        PruneRefused: a trash outside the run's bucket (a copy there is no server-side copy), or inside a checkpoint.
        RemoteError: a copy or a delete failed: the message says what was done and the restore command.
    """
    run: RemotePath = plan.run_path   # type: ignore[assignment]
    base = _trash_base(plan, trash)
    run.relist()   # the objects as they are now: a checkpoint changed since the plan stays
    todo, skipped = still_as_planned(plan.deleted)
    if not todo:
        return PruneResult(None, (), tuple(skipped), False, None)
    trash_dir = base / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    groups = [_copies(item, run, trash_dir) for item in todo]
    restore = f"ckpt-select prune {shlex.quote(run.url)} --restore {shlex.quote(trash_dir.url)}"
    _write_manifest(trash_dir, run, groups, "moving")
    _move_all(todo, groups, trash_dir, run, restore, progress)
    try:
        _write_manifest(trash_dir, run, groups, "moved")
    except RemoteError as e:
        raise RemoteError(e.url, f"{e.reason}; every checkpoint moved to the trash, nothing deleted from it; "
                                 f"restore with: {restore}") from e
    if keep_trash:
        return PruneResult(trash_dir, tuple(todo), tuple(skipped), False, restore)
    _empty(trash_dir, groups, restore)
    run.refresh()
    return PruneResult(trash_dir, tuple(todo), tuple(skipped), True, None)


def _bucket(path: RemotePath) -> str:
    """``s3://bucket``: what a server-side copy cannot leave."""
    return f"{path.store.protocol}://{path.key.split('/', 1)[0]}"


def _trash_base(plan: PrunePlan, trash: Path | str | None) -> RemotePath:
    """The trash prefix, checked: in the run's bucket, in no checkpoint, hidden if inside the run."""
    run: RemotePath = plan.run_path   # type: ignore[assignment]
    if trash is None:
        base = run / TRASH_FOLDER
    elif not (is_url(str(trash)) and _bucket(RemotePath(str(trash))) == _bucket(run)):
        raise PruneRefused(f"{trash}: the trash of a run in {_bucket(run)} must be a prefix of that bucket "
                           f"(e.g. {_bucket(run)}/trash): a copy to another bucket or disk is not server-side")
    else:
        base = RemotePath(str(trash))
    check_trash_place(base, plan, "prefix")
    return base


def _copies(item: PruneItem, run: RemotePath, trash_dir: RemotePath) -> list[_Copy]:
    """Every object of one checkpoint, with its place in the trash (its key relative to the run kept)."""
    return [_Copy(obj, trash_dir / str(obj.relative_to(run)), look.st_size, look.etag)
            for obj, look in objects_under(item.moves)]


def _move_all(todo: list[PruneItem], groups: list[list[_Copy]], trash_dir: RemotePath, run: RemotePath,
              restore: str, progress: Callable[[float, str], None] | None) -> None:
    """Per checkpoint: copy its objects into the trash, check every copy, then delete its originals."""
    store = run.store
    for done, (item, copies) in enumerate(zip(todo, groups)):
        try:
            for c in copies:
                store.copy(c.source.key, c.dest.key, c.size)
            _check_copies(item, copies, trash_dir, run)
            store.remove([c.source.key for c in copies])
        except RemoteError as e:
            raise RemoteError(e.url, f"{e.reason}; {done} of {len(todo)} checkpoints moved, nothing deleted from "
                                     f"the trash; restore with: {restore}") from e
        if progress is not None:
            progress((done + 1) / len(todo), f"moved {item.path.name}")


def _check_copies(item: PruneItem, copies: list[_Copy], trash_dir: RemotePath, run: RemotePath) -> None:
    """Each copy is in the trash with its original's size (one listing per folder, one HEAD per file).

    Raises:
        RemoteError: a copy missing or of another size: the originals are not deleted.
    """
    found: dict[str, dict] = {}
    for unit in item.moves:
        dest = trash_dir / str(unit.relative_to(run))
        found.update(run.store.list_prefix(dest.key) if unit.is_dir() else {dest.key: run.store.info(dest.key)})
    for c in copies:
        size = (found.get(c.dest.key) or {}).get("size")
        if size != c.size:
            raise RemoteError(c.dest.url, f"the trash copy of {c.source.url} has {size} bytes, not {c.size}; "
                                          "the original was not deleted")


def _write_manifest(trash_dir: RemotePath, run: RemotePath, groups: list[list[_Copy]], state: str) -> None:
    """The objects to move, with size and ETag, as one object (written whole or not at all)."""
    doc = {"run": run.url, "state": state,
           "objects": [{"path": str(c.source.relative_to(run)), "bytes": c.size, "etag": c.etag}
                       for copies in groups for c in copies]}
    trash_dir.store.write_bytes((trash_dir / MANIFEST).key, json.dumps(doc, indent=1).encode())


def _empty(trash_dir: RemotePath, groups: list[list[_Copy]], restore: str) -> None:
    """Delete the trash copies, then the manifest (a crash midway leaves the manifest to say what was there)."""
    try:
        trash_dir.store.remove([c.dest.key for copies in groups for c in copies])
        trash_dir.store.remove([(trash_dir / MANIFEST).key])
    except RemoteError as e:
        raise RemoteError(e.url, f"{e.reason}; every checkpoint moved to the trash {trash_dir.url}, but emptying it "
                                 f"failed: delete that prefix to free the bytes, or restore with: {restore}") from e


def restore_remote_trash(url: str) -> RestoreResult:
    """Copy back into the run every object of a prune's trash prefix the run lacks, then delete the trash.

    An object still in the run (a prune stopped before deleting it) with the ETag it had is fine; one
    there with another ETag (written since) is never overwritten: its trash copy stays, with why.

    Raises:
        InvalidArgument: not a prune's trash prefix (no readable manifest).
        RemoteError: a copy or a delete failed (the trash keeps what was not restored; run it again).
    """
    trash = RemotePath(url)
    run, entries = _read_manifest(trash)
    in_trash = trash.store.list_prefix(trash.key)
    restored, left, done = _copy_back(trash, run, entries, in_trash)
    _check_restored(run, restored, in_trash, trash)
    if not left:
        trash.store.remove(done)
        trash.store.remove([(trash / MANIFEST).key])
    run.refresh()
    return RestoreResult(trash, tuple(restored), tuple(left))


def _copy_back(trash: RemotePath, run: RemotePath, entries: list[dict], in_trash: dict[str, dict]
               ) -> tuple[list[RemotePath], list[tuple[RemotePath, str]], list[str]]:
    """(objects copied back, trash copies left with why, trash keys no longer needed) for the manifest's entries."""
    in_run = run.store.list_prefix(run.key)
    restored, left, done = [], [], []
    for entry in entries:
        source, dest = trash / entry["path"], run / entry["path"]
        if source.key not in in_trash:
            continue   # never copied (a stop came first), or restored already
        if dest.key not in in_run:
            trash.store.copy(source.key, dest.key, int(in_trash[source.key].get("size") or 0))
            restored.append(dest)
        elif (object_version(in_run[dest.key]), in_run[dest.key].get("size")) != \
                (entry.get("etag"), entry.get("bytes")):
            left.append((source, f"{dest.url} exists and differs from it; left in the trash"))
            continue
        done.append(source.key)
    return restored, left, done


def _read_manifest(trash: RemotePath) -> tuple[RemotePath, list[dict]]:
    """The run and the object entries a trash prefix's manifest lists, read afresh."""
    try:
        blob = trash.store.read_range((trash / MANIFEST).key, 0, int(trash.store.info((trash / MANIFEST).key)["size"]))
        doc = json.loads(blob)
        run, entries = RemotePath(str(doc["run"])), [dict(e) for e in doc["objects"]]
    except (RemoteError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"{trash.url}: not a prune's trash prefix (no readable {MANIFEST}: {e})") from None
    if _bucket(run) != _bucket(trash):
        raise InvalidArgument(f"{trash.url}: its manifest names a run in another bucket ({run.url})")
    return run, entries


def _check_restored(run: RemotePath, restored: list[RemotePath], in_trash: dict[str, dict], trash: RemotePath) -> None:
    """Every object copied back is in the run with its trash copy's size, before the trash goes.

    Raises:
        RemoteError: one is missing or of another size: the trash is left whole.
    """
    now = run.store.list_prefix(run.key) if restored else {}
    for dest in restored:
        want = in_trash[(trash / str(dest.relative_to(run))).key].get("size")
        if (now.get(dest.key) or {}).get("size") != want:
            raise RemoteError(dest.url, f"copied back from {trash.url} but not found with {want} bytes; the trash "
                                        "was left whole: restore again")
