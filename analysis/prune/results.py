"""What a prune did and what it may not do, shared by the local (``apply``) and bucket (``remote_apply``) ways.

Why a module of its own: a prune of a local run renames, one of a run in object storage copies
server-side then deletes; both report the same :class:`PruneResult` and :class:`RestoreResult`,
write the same manifest name and refuse in the same words, and ``apply`` hands a bucket's plan to
``remote_apply`` without the two importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import AnalysisError
from .plan import PruneItem, PrunePlan

MANIFEST = "ckpt-select-prune.json"


class PruneRefused(AnalysisError):
    """A prune the app may not do (``ui --root`` without ``--allow-prune``), or a trash folder refused."""


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What a prune did: where the trash is, what moved, what was left and why, whether it was emptied."""

    trash_dir: Path | None
    moved: tuple[PruneItem, ...]
    skipped: tuple[tuple[PruneItem, str], ...]
    emptied: bool                 # the trash was deleted (the bytes are free); else the files wait there
    restore_command: str | None   # how to move them back, while they are in the trash

    @property
    def bytes_freed(self) -> int:
        return sum(i.size_bytes for i in self.moved) if self.emptied else 0


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What a restore moved back, and what it left in the trash and why."""

    trash_dir: Path
    restored: tuple[Path, ...]
    left: tuple[tuple[Path, str], ...]


def check_prune_allowed(root: Path | None, allow_prune: bool) -> None:
    """The app confined to ``root`` (``ui --root``) deletes nothing unless started with ``--allow-prune``.

    Raises:
        PruneRefused: a root is set and pruning was not allowed.
    """
    if root is not None and not allow_prune:
        raise PruneRefused(f"{root}: deleting checkpoints is off in an app confined with --root; start it with "
                           "`ckpt-select ui --root DIR --allow-prune` to allow it, or run `ckpt-select prune`")


def check_trash_place(base: "Path", plan: "PrunePlan", hidden_what: str = "folder") -> None:
    """A trash never lies in a checkpoint, and inside the run only hidden (or the run would find the trash again).

    Raises:
        PruneRefused: naming the trash and the problem.
    """
    run = plan.run_path
    for item in plan.items:
        if base == item.path or base.is_relative_to(item.path):
            raise PruneRefused(f"{base}: the trash cannot lie inside the checkpoint {item.path}")
    if base.is_relative_to(run) and not any(p.startswith(".") for p in base.relative_to(run).parts):
        raise PruneRefused(f"{base}: a trash inside the run must be a hidden {hidden_what} (a name starting with "
                           "'.'), or the run would find the trashed checkpoints again")

