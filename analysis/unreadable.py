"""Files of a run that could not be read: why, and whether they are a save still being written (issue 19).

One bad file must not sink the run: :mod:`analysis.run` lists it as an :class:`UnreadableFile` with the
reason and leaves it out of everything. A checkpoint that fails to open while it is young or still
growing is "being written", not corrupt, and so is a merge's prefix in a bucket that lacks the recipe a
merge writes last while its objects are young (issue 22): ``watch`` looks at those again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .discovery import step_of
from .remote import RemotePath
from .remote.outputs import incomplete_output, merge_output_prefix

# A checkpoint that cannot be read and was modified less than this many seconds ago, or whose size
# changes between two looks SIZE_RECHECK_SECONDS apart, is a save still being written, not a corrupt file.
BEING_WRITTEN_SECONDS = 60.0
SIZE_RECHECK_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class UnreadableFile:
    """A file of the run that could not be read: listed with the reason, left out of everything (issue 19)."""

    path: Path
    reason: str
    kind: str = "checkpoint"       # "checkpoint" | "log"
    step: int | None = None        # a checkpoint's step, when its name gives one
    being_written: bool = False    # modified in the last BEING_WRITTEN_SECONDS or still growing

    @property
    def status(self) -> str:
        """"being written" for a save in progress, else "unreadable"."""
        return "being written" if self.being_written else "unreadable"

    def describe(self) -> str:
        """One line for notes and warnings: which file, what it is, why it was passed over."""
        step = f" (step {self.step})" if self.step is not None else ""
        return f"{self.kind} {self.path}{step}: {self.status}: {self.reason}"


def problem(path: Path, error: Exception) -> str:
    """Why a file could not be read, without the path the message already names elsewhere."""
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or str(error)
    if isinstance(path, Path) and path.is_symlink():
        reason = f"{reason} (a symlink to {os.readlink(path)})"
    return reason


def unreadable_checkpoints(failed: list[tuple[Path, str]]) -> list[UnreadableFile]:
    """The checkpoints that failed to open, each marked "being written" when it is a save in progress.

    A file modified in the last BEING_WRITTEN_SECONDS, or whose size changes between two looks
    SIZE_RECHECK_SECONDS apart, is still being written (stat only: nothing is read). One pause for all.
    """
    if not failed:
        return []
    first = [_sizes_and_mtimes(path) for path, _ in failed]
    now = time.time()
    recent = [any(now - mtime < BEING_WRITTEN_SECONDS for _, mtime in looks) for looks in first]
    if not all(recent):
        time.sleep(SIZE_RECHECK_SECONDS)
    growing = [not fresh and [size for size, _ in looks] != [size for size, _ in _sizes_and_mtimes(path)]
               for (path, _), looks, fresh in zip(failed, first, recent)]
    return [UnreadableFile(path, reason, "checkpoint", step_of(path, {})[0], fresh or grows)
            for (path, reason), fresh, grows in zip(failed, recent, growing)]


def _sizes_and_mtimes(path: Path) -> list[tuple[int, float]]:
    """(size, mtime) of a checkpoint file, or of each file directly in a checkpoint folder; [] if none."""
    try:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
    except OSError:
        return []
    looks = []
    for f in files:
        try:
            stat = f.stat()
        except OSError:
            continue
        looks.append((stat.st_size, stat.st_mtime))
    return looks


def set_aside_merge(path: Path, merged: list[Path], unreadable: list[UnreadableFile],
                    checked: dict[RemotePath, str | None]) -> None:
    """A merge's output found in the run: never a checkpoint; listed in ``merged`` when complete.

    A merge into a bucket commits by writing its recipe last (no rename there), so a prefix of ours
    without it is a merge killed or still running (issue 22): that prefix goes to ``unreadable``
    once, with why, however many shards it holds. ``checked``: each prefix's verdict (one look each).
    A local merge appears by a rename, complete or not at all: it needs no check.
    """
    prefix = merge_output_prefix(path) if isinstance(path, RemotePath) else None
    if prefix is not None and prefix not in checked:
        checked[prefix] = note = incomplete_output(prefix)
        if note:
            unreadable.append(UnreadableFile(prefix, note.removeprefix(f"{prefix}: "), "checkpoint", None,
                                             _written_lately(prefix)))
    if prefix is None or not checked[prefix]:
        merged.append(path)


def _written_lately(prefix: RemotePath) -> bool:
    """Whether an object under ``prefix`` is younger than BEING_WRITTEN_SECONDS (from the listing): a merge still
    uploading, as far as anyone can tell, rather than one killed; ``watch`` looks at it again each time."""
    now = time.time()
    return any(now - (prefix / key[len(prefix.key) + 1:]).stat().st_mtime < BEING_WRITTEN_SECONDS
               for key in prefix.list())
