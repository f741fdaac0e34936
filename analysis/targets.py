"""Where CkptSelect may write a file, and how: it never destroys a file it did not write (issue 19).

The rules for ``recommend -o`` and ``export -o`` (the merge's folder rules are in
:mod:`analysis.merge_checks`):

1. Never over a checkpoint, nor into a checkpoint folder: the run's and the inputs' (``protected``),
   and any existing file a checkpoint reader claims. Not even with ``--force``.
2. Never over a folder.
3. An existing file is replaced only when CkptSelect wrote it (a recipe: ``ckpt_select_recipe``; a
   mergekit config: its first line starts with :data:`MERGEKIT_MARKER`), or when the user says ``--force``.
4. Atomically: a temporary file beside the target, fsync'd, renamed over it; a crash leaves the old
   file or the new one, never half of one.
5. Storage that refuses the write (read-only, no permission, full) is an :class:`OutputError` naming
   the path: exit 2 with one line, not a traceback.
"""

from __future__ import annotations

import errno
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import yaml

from .errors import OutputError
from .remote import RemotePath, as_path, is_remote

# The first line of every mergekit config CkptSelect writes (YAML ignores it; we recognise it).
MERGEKIT_MARKER = "# written by ckpt-select"
# The key every recipe CkptSelect writes carries (its value is the recipe version).
RECIPE_KEY = "ckpt_select_recipe"
# A recipe or config of ours is a few KB: a larger file is not ours, and is not parsed to find out.
_OURS_MAX_BYTES = 1 << 20
# Files never replaced, whatever their content: weights, shards and optimizer states are saved under these.
WEIGHT_SUFFIXES = frozenset({".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".distcp", ".pkl"})
# The errors by which storage refuses a write; any other OSError is a bug or a failing disk and surfaces.
STORAGE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT})


@contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """Turn the storage refusing a write under ``path`` into an :class:`OutputError` naming ``path``.

    Raises:
        OutputError: read-only file system, no permission, no space or quota left.
    """
    try:
        yield
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        raise OutputError(path, f"cannot write there: {e.strerror or e}") from e


def written_by_ckpt_select(path: Path) -> bool:
    """Whether ``path`` is a recipe or mergekit config CkptSelect wrote, so replacing it loses nothing of the user's."""
    try:
        if not path.is_file() or path.stat().st_size > _OURS_MAX_BYTES:
            return False
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if text.startswith(MERGEKIT_MARKER):
        return True
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(doc, dict) and RECIPE_KEY in doc


def check_file_target(path: "str | Path | RemotePath", protected: Iterable[object] = (), force: bool = False) -> "Path | RemotePath":
    """``path`` resolved, once writing a recipe or config there is known to destroy nothing (rules 1-3).

    Args:
        path: where the user asked for the file.
        protected: checkpoints (files or folders) and other files of the run that are never written over or into.
        force: the user said an existing file that CkptSelect did not write may be replaced.

    Raises:
        OutputError: the target is or lies in a checkpoint, is a folder, or exists and is not ours (without force).
    """
    if is_remote(path):
        return _check_remote_file_target(as_path(path), protected, force)
    path = Path(path).expanduser().resolve()
    for item in protected:
        if isinstance(item, RemotePath):   # a local file is never inside an object store
            continue
        item = Path(item).expanduser().resolve()
        if path == item or path.is_relative_to(item):
            what = "is" if path == item else f"lies inside {item},"
            raise OutputError(path, f"{what} a checkpoint or log of the run or an input of the recipe; CkptSelect "
                                    "never writes over or into a checkpoint, not even with --force")
    if path.is_dir():
        raise OutputError(path, "is a folder; give the name of a file to write")
    _refuse_checkpoint(path)
    if path.exists() and not force and not written_by_ckpt_select(path):
        raise OutputError(path, "exists and is not a recipe or mergekit config CkptSelect wrote; choose "
                                "another name, or pass --force to replace it")
    return path


def _check_remote_file_target(path: RemotePath, protected: Iterable[object], force: bool) -> RemotePath:
    """:func:`check_file_target` for an object: the same rules, answered from one listing of its prefix."""
    for item in protected:
        if isinstance(item, RemotePath) and (path == item or path.is_relative_to(item)):
            raise OutputError(path, "is or lies inside a checkpoint or log of the run or an input of the recipe; "
                                    "CkptSelect never writes over or into a checkpoint, not even with --force")
    if path.suffix in WEIGHT_SUFFIXES:
        raise OutputError(path, "is a checkpoint file name; CkptSelect never writes over a checkpoint")
    if path.is_dir():
        raise OutputError(path, "is a prefix holding objects; give the name of a file to write")
    if path.is_file() and not force and not written_by_ckpt_select(path):
        raise OutputError(path, "exists and is not a recipe or mergekit config CkptSelect wrote; choose "
                                "another name, or pass --force to replace it")
    return path


def _refuse_checkpoint(path: Path) -> None:
    """Rule 1 beyond ``protected``: a file a checkpoint reader claims, a weights file by its suffix (a
    shard, an optimizer state), or anything inside a checkpoint folder, wherever it is."""
    from .checkpoints import detect_layout   # late: the readers are not needed to write YAML elsewhere
    if path.exists() and (path.suffix in WEIGHT_SUFFIXES or detect_layout(path) is not None):
        raise OutputError(path, "is a checkpoint file; CkptSelect never writes over a checkpoint, "
                                "not even with --force")
    layout = detect_layout(path.parent)
    if layout is not None:
        raise OutputError(path, f"lies inside the checkpoint folder {path.parent} ({layout}); CkptSelect never "
                                "writes into a checkpoint, not even with --force")


def write_text_atomic(path: "str | Path | RemotePath", text: str, protected: Iterable[object] = (), force: bool = False) -> "Path | RemotePath":
    """Write ``text`` to ``path`` after :func:`check_file_target`, atomically (rule 4); return the path.

    The temporary file lies in the target's folder (the rename must not cross file systems) and
    carries this process's id; it is removed if anything fails before the rename.

    Raises:
        OutputError: the target is refused (see :func:`check_file_target`), or the storage refuses the write.
    """
    path = check_file_target(path, protected, force)
    if isinstance(path, RemotePath):   # one PUT: an object store shows the whole object or none of it
        path.store.write_bytes(path.key, text.encode("utf-8"))
        path.refresh()
        return path
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_durably(tmp, text.encode("utf-8"))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_folder(path.parent)
    return path


def _write_durably(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0o666 less the umask, as ``open`` would) with ``data``, fsync'd before it is closed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Persist a folder's entries, so a crash cannot lose the rename that put a file there."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host: a partial output or scratch folder named after a
    live process is another merge's work in progress, never stale (one we may not signal still counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
