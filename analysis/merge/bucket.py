"""A merge into object storage (``-o s3://bucket/prefix``): the target's rules and an upload that commits last.

Object stores have no rename, so the local merge's "write a hidden folder, rename it into place"
cannot work there. Instead (issue 22):

- Each output file is written to local scratch, uploaded as one object and deleted before the
  next is written, so local disk holds about one shard at a time. An object appears only once
  complete (a single PUT, or a multipart upload that s3fs completes last), never half of one.
- Shards and side files go first, then the index, then the mergekit config, then ``recipe.yaml``
  as the very last object: the commit marker (:func:`analysis.remote.outputs.incomplete_output`
  calls a prefix without it, or with a shard the index names missing, incomplete).
- On any failure (an error, Ctrl-C) the objects this merge uploaded are deleted again; a killed
  merge (``kill -9``) leaves shards but never the recipe, so our readers say "incomplete".
- The target prefix must be empty, or, with ``--force``, hold only an earlier merge output of
  ours (the same rule as a local folder: a typo in ``-o`` must not delete another run). With no
  rename, ``--force`` removes the old output's recipe and index first (so it stops looking
  finished), then its other objects, then writes the new one.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import MergeError, RemoteError
from ..remote import RemotePath
from ..remote.outputs import INDEX_FILE, RECIPE_FILE, carries_merge_marker
from ..targets import process_alive, written_by_ckpt_select
from .output import MERGEKIT_FILE, MODEL_FILE, SIDE_FILES, TORCH_FILES

# Every name a merge writes under its prefix; anything else there is someone else's.
_OUR_NAMES = frozenset({MODEL_FILE, INDEX_FILE, RECIPE_FILE, MERGEKIT_FILE, *SIDE_FILES,
                        *(name for name, _ in TORCH_FILES.values())})
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Local scratch folders of bucket merges: PREFIX-HOST-PID-random, so a later merge can tell its writer died.
SCRATCH_PREFIX = "ckpt-select-merge-"
# Objects removed first when --force replaces an earlier output: the commit marker, then the index.
_DECOMMIT_ORDER = (RECIPE_FILE, INDEX_FILE)


def check_bucket_target(prefix: RemotePath, inputs: Sequence[object], force: bool) -> tuple[str, ...]:
    """The keys an allowed ``--force`` replaces (empty for an empty prefix); refuse any other target.

    Raises:
        MergeError: the prefix is, holds or lies in an input, or holds objects (without ``force``;
            with it, objects that are not an earlier CkptSelect merge output).
    """
    for path in inputs:
        if isinstance(path, RemotePath) and (path.is_relative_to(prefix) or prefix.is_relative_to(path)):
            raise MergeError(f"{prefix}: is, holds or lies in the input {path}; a merge never writes over an input")
    objects = prefix.list()
    if not objects:
        return ()
    if not force:
        raise MergeError(f"{prefix}: already holds {len(objects)} object{'s' * (len(objects) != 1)}; choose a new "
                         "prefix, or pass --force to replace an earlier merge output there")
    problem = foreign_objects(prefix, objects)
    if problem:
        raise MergeError(f"{prefix}: {problem}; --force replaces only an earlier CkptSelect merge output")
    return tuple(objects)


def foreign_objects(prefix: RemotePath, objects: dict[str, dict]) -> str | None:
    """None when the objects under ``prefix`` are an earlier merge output of ours (complete or killed), else why not."""
    names = [key[len(prefix.key) + 1:] for key in objects]
    others = [name for name in names if name not in _OUR_NAMES and not _SHARD.match(name)]
    if others:
        return f"holds {len(others)} object{'s' * (len(others) != 1)} a merge does not write (e.g. {others[0]})"
    if RECIPE_FILE in names:
        return None if written_by_ckpt_select(prefix / RECIPE_FILE) else f"its {RECIPE_FILE} is not CkptSelect's"
    weights = sorted(name for name in names if name.endswith(".safetensors"))
    if weights and carries_merge_marker(prefix / weights[0]):
        return None   # a killed merge's shards: no recipe yet, but our marker in the header
    return "holds objects without a CkptSelect recipe or merge marker"


class BucketUpload:
    """Local scratch for the output's files, each uploaded and deleted as soon as it is written.

    Use as a context: entering removes what ``--force`` replaces; leaving deletes the scratch and,
    on an error, every object this upload sent.
    """

    def __init__(self, prefix: RemotePath, replaced: Sequence[str] = ()) -> None:
        self.prefix, self.store = prefix, prefix.store
        self.replaced = tuple(replaced)
        remove_stale_scratch()
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{socket.gethostname()}-{os.getpid()}-"))
        self.sent: list[str] = []            # keys, in upload order
        self.sizes: dict[str, int] = {}      # name -> bytes

    def __enter__(self) -> "BucketUpload":
        self._remove_replaced()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        if exc_type is not None:
            self._undo()
        self.prefix.refresh()

    def send(self, local: Path) -> None:
        """Upload one finished local file as ``PREFIX/NAME`` and delete the local copy."""
        key = f"{self.prefix.key}/{local.name}"
        self.sizes[local.name] = local.stat().st_size
        self.sent.append(key)     # before the upload: a failed one may still have left the object
        self.store.put_file(str(local), key)
        local.unlink()

    def expect(self, name: str) -> str:
        """The URL a work unit on another machine uploads ``name`` to; counted as sent, so a failure removes it."""
        key = f"{self.prefix.key}/{name}"
        self.sent.append(key)
        return self.store.url(key)

    def uploaded(self, name: str, size: int) -> None:
        """Record a file a work unit uploaded itself (its size goes into the result like the driver's own)."""
        self.sizes[name] = size

    def commit(self, last: Sequence[str] = (INDEX_FILE, MERGEKIT_FILE, RECIPE_FILE)) -> None:
        """Upload what scratch still holds: side files first, then ``last`` in order (the recipe at the end)."""
        rest = sorted(p.name for p in self.scratch.iterdir() if p.name not in last)
        for name in rest + [n for n in last if (self.scratch / n).exists()]:
            self.send(self.scratch / name)

    def _remove_replaced(self) -> None:
        """Delete the output ``--force`` replaces: its commit marker and index first, so it never looks finished."""
        first = [f"{self.prefix.key}/{name}" for name in _DECOMMIT_ORDER]
        ordered = [key for key in first if key in self.replaced] + [k for k in self.replaced if k not in first]
        self.store.remove(ordered)

    def _undo(self) -> None:
        """Delete what this upload sent, newest first (the index before its shards); errors here are not the story."""
        try:
            self.store.remove(list(reversed(self.sent)))
        except RemoteError:
            pass


def remove_stale_scratch(root: Path | None = None) -> list[Path]:
    """Delete the scratch folders of bucket merges killed on this host (their pid is gone); return them.

    A killed merge leaves at most one output file there; the next bucket merge removes it, as a local
    merge removes the hidden folders killed merges left beside their target.
    """
    root = Path(root or tempfile.gettempdir())
    mine = re.compile(rf"^{re.escape(SCRATCH_PREFIX)}{re.escape(socket.gethostname())}-(\d+)-")
    removed = []
    for folder in root.glob(f"{SCRATCH_PREFIX}*"):
        match = mine.match(folder.name)
        if match and folder.is_dir() and not process_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed

