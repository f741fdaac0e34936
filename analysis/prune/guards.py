"""What ``prune`` must never move, and what a checkpoint is on disk.

The rules that make a prune safe whatever the policy says: the newest checkpoint, a checkpoint
written in the last minute, one a recipe in the run names, and every file that is not a checkpoint
the run read (logs, configs, merged outputs, files that could not be read) stay where they are.

A run in object storage (issue 22) is looked at from one listing of its prefix: sizes and
LastModified from it, and an object's stamp is (URL, size, ETag), since an overwritten object gets a
new ETag whatever its time says.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import yaml

from .. import unreadable
from ..errors import AnalysisError
from ..paths import is_within
from ..remote import RemotePath, RemoteStat, as_path, is_url
from ..run import MAX_DEPTH, SKIP_DIRS, CheckpointRef
from ..targets import MERGEKIT_MARKER, RECIPE_KEY

if TYPE_CHECKING:
    from .plan import PruneItem

# A recipe or mergekit config is a few KB: a larger YAML file is not one and is not parsed.
_RECIPE_MAX_BYTES = 1 << 20
TRASH_FOLDER = ".ckpt-select-trash"
# The recipe a merge writes into its output folder (analysis.merge.RECIPE_FILE; not imported: the merge
# engine is heavy and a plan never merges).
MERGE_RECIPE = "recipe.yaml"


def move_units(ref: CheckpointRef) -> tuple[Path, ...]:
    """What a prune moves for one checkpoint: its folder whole (a Trainer or DCP folder, with its
    optimizer.pt and trainer_state.json), else its files (a file, or an index and its shards, shards first)."""
    if ref.path.is_dir():
        return (ref.path,)
    shards = [f for f in ref.files if f != ref.path]
    return (*shards, ref.path)


def disk_bytes(paths: tuple[Path, ...]) -> int:
    """Bytes the files under ``paths`` hold (regular files only: a symlink frees nothing when moved)."""
    return sum(size for _, size, _ in _files_under(paths))


def newest_change_seconds(paths: tuple[Path, ...], now: float | None = None) -> float | None:
    """Seconds since the newest modification of any file under ``paths`` (None: no file)."""
    mtimes = [mtime for _, _, mtime in _files_under(paths)]
    return None if not mtimes else (now or time.time()) - max(mtimes)


def stamp(paths: tuple[Path, ...]) -> tuple[tuple[str, int, float | str | None], ...]:
    """(path, size, mtime) of every file under ``paths``: a prune moves nothing that changed since its plan.

    An object's is (URL, size, ETag): a rewritten object of the same size and second has a new ETag.
    """
    if any(isinstance(p, RemotePath) for p in paths):
        return tuple((obj.url, look.st_size, look.etag) for obj, look in objects_under(paths))
    return tuple((str(p), size, mtime) for p, size, mtime in _files_under(paths))


def objects_under(paths: tuple[RemotePath, ...]) -> list[tuple[RemotePath, RemoteStat]]:
    """Each object at or under the ``paths`` (keys or prefixes) with its size, time and ETag, from the listing."""
    found = []
    for path in paths:
        for key in sorted(path.list()):
            obj = RemotePath(path.url, store=path.store, key=key)
            found.append((obj, obj.stat()))
    return found


def still_as_planned(items: tuple[PruneItem, ...]) -> tuple[list[PruneItem], list[tuple[PruneItem, str]]]:
    """Items unchanged since the plan, and those left in place with the reason."""
    todo, skipped = [], []
    for item in items:
        fresh = recently_changed(item.moves)
        if fresh or stamp(item.moves) != item.stamp or not all(u.exists() for u in item.moves):
            skipped.append((item, fresh or "changed since the plan: left in place; plan again"))
        else:
            todo.append(item)
    return todo, skipped


def _files_under(paths: tuple[Path, ...]) -> list[tuple[Path, int, float]]:
    """(path, size, mtime) of each regular file at or under ``paths``, symlinks not followed (objects: listed)."""
    if any(isinstance(p, RemotePath) for p in paths):
        return [(obj, look.st_size, look.st_mtime) for obj, look in objects_under(paths)]
    found = []
    for path in paths:
        walk = os.walk(path) if path.is_dir() and not path.is_symlink() else [(str(path.parent), [], [path.name])]
        for dirpath, _, filenames in walk:
            for name in filenames:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                if not os.path.islink(os.path.join(dirpath, name)):
                    found.append((Path(dirpath) / name, st.st_size, st.st_mtime))
    return sorted(found)


def recently_changed(paths: tuple[Path, ...]) -> str | None:
    """Why a checkpoint may still be being written (a file changed in the last minute), or None."""
    age = newest_change_seconds(paths)
    if age is not None and age < unreadable.BEING_WRITTEN_SECONDS:
        return f"modified {max(age, 0):.0f} s ago: it may still be being written"
    return None


def recipe_references(run_path: Path, root: Path | None = None) -> dict[Path, list[Path]]:
    """Checkpoint path (resolved) -> the recipes that name it.

    Every CkptSelect recipe and mergekit config under the run folder counts, those written beside a
    merged output (``RUN/merges/*/``) included, and the ``recipe.yaml`` of a merge output beside the run
    (``RUN/../merged/recipe.yaml``) when it lies within ``root`` (the app's ``--root``); the trash is not searched.
    A run in object storage: the recipes below its prefix (from the one listing); a prefix beside it is not
    listed (that could be the whole bucket), see docs/prune.md.

    Raises:
        AnalysisError: a file that says it is a recipe but cannot be parsed: which checkpoints it needs is unknown.
    """
    refs: dict[Path, list[Path]] = {}
    for recipe in _yaml_files(run_path) + _beside(run_path, root):
        for target in _named_checkpoints(recipe):
            refs.setdefault(target, []).append(recipe)
    return refs


def _beside(run_path: Path, root: Path | None) -> list[Path]:
    """The recipe a merge wrote into each folder beside the run (``MERGE_RECIPE``), within ``root`` if set."""
    if isinstance(run_path, RemotePath):
        return []
    try:
        siblings = sorted(p for p in run_path.parent.iterdir() if p.is_dir() and p != run_path)
    except OSError:
        return []
    found = [s / MERGE_RECIPE for s in siblings if (s / MERGE_RECIPE).is_file()]
    return [f for f in found if root is None or is_within(f, root)]


def _yaml_files(root: Path) -> list[Path]:
    """YAML files under ``root`` as deep as run discovery looks, hidden folders (the trash) left out."""
    found = []
    for folder, dirnames, filenames in _walk(root):
        depth = len(folder.relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS and depth <= MAX_DEPTH)
        found.extend(folder / f for f in sorted(filenames) if f.endswith((".yaml", ".yml")))
    return found


def _walk(root: Path | RemotePath) -> Iterator[tuple[Path | RemotePath, list[str], list[str]]]:
    """``os.walk`` with the folder as a path (a prefix's walk from its listing); pruning ``dirnames`` works."""
    if isinstance(root, RemotePath):
        yield from root.walk()
        return
    for dirpath, dirnames, filenames in os.walk(root):
        yield Path(dirpath), dirnames, filenames


def _named_checkpoints(path: Path) -> list[Path]:
    """The checkpoint paths a recipe (ours or a mergekit config) names, resolved against its folder.

    Read leniently: a recipe whose weights do not sum to 1 still protects its checkpoints.
    """
    try:
        if path.stat().st_size > _RECIPE_MAX_BYTES:
            return []
        text = path.read_text(errors="replace")
    except OSError:
        return []
    if RECIPE_KEY not in text and "merge_method" not in text and not text.startswith(MERGEKIT_MARKER):
        return []
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        raise AnalysisError(f"{path}: looks like a merge recipe but is not valid YAML, so which checkpoints it "
                            "needs is unknown; fix or move it, then prune again") from None
    items = (doc.get("checkpoints") or doc.get("models") or []) if isinstance(doc, dict) else []
    names = [_entry_name(item) for item in items if isinstance(items, list)]
    return [_target(path, n) for n in names if n]


def _target(recipe: Path | RemotePath, name: str) -> Path | RemotePath:
    """A recipe entry's checkpoint: a URL as it is, else relative to the recipe's folder (a prefix's, in a bucket)."""
    if is_url(name):
        return as_path(name)
    if isinstance(recipe, RemotePath):
        return recipe.parent / name
    return (recipe.parent / Path(name).expanduser()).resolve()


def _entry_name(item: object) -> str | None:
    """``path`` of a recipe entry, ``model`` (or ``model.model``) of a mergekit one."""
    if not isinstance(item, dict):
        return None
    value = item.get("path", item.get("model"))
    value = value.get("model") if isinstance(value, dict) else value
    return str(value) if isinstance(value, (str, os.PathLike)) else None
