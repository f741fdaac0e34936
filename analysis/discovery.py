"""Discovery: which files under a run folder or a URL prefix are checkpoints and logs, and which runs they form.

:func:`walk_run` walks the folder once (``os.walk``; for a URL the same walk answered from ONE listing of
the prefix, issue 22), lets each checkpoint reader claim the folders and files of its layout, honours
``ckpt-select.yaml``'s globs, and keeps the remaining text files as log candidates; with ``ui --root``
an entry resolving outside it is left out with a note before any reader sniffs it (issue 19).
:func:`group_runs` sorts the candidates into runs (:mod:`analysis.run_groups`), and :func:`fingerprint`
hashes how the files look (size, time or ETag) into a cache key. Names, layouts and ``stat`` only:
:mod:`analysis.run` reads the files found.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import yaml

from .checkpoints import CHECKPOINT_READERS, detect_layout
from .errors import AnalysisError
from .paths import is_within, normalized_url
from .remote import RemotePath, as_path, file_look, is_remote
from .run_groups import RunFiles, RunInfo, group_by_folder, join_resumed

CONFIG_FILE = "ckpt-select.yaml"
# Metadata keys that give a checkpoint's step, most trusted first.
STEP_METADATA_KEYS = ("step", "global_step", "iteration", "iter_num")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
LOG_SUFFIXES = {".jsonl", ".json", ".csv", ".log", ".txt", ".out", ".tsv", ".stdout"}
SKIP_DIRS = {"__pycache__", "node_modules", "wandb"}
MAX_DEPTH = 4
_NUMBER = re.compile(r"(\d+)")
_STEP_FOLDER = re.compile(r"(?:checkpoint|ckpt|step|iter|global_step|epoch)[-_]?(\d+)", re.IGNORECASE)


def allowed_root(root: "str | Path | RemotePath | None") -> "Path | RemotePath | None":
    """``ui --root`` as a resolved folder or a normalised URL prefix (issue 22); None: no limit."""
    if root is None:
        return None
    return normalized_url(root) if is_remote(root) else Path(root).expanduser().resolve()   # type: ignore[arg-type]


def absolute(path: "str | Path | RemotePath") -> "Path | RemotePath":
    """A local path resolved, or a URL normalised."""
    path = as_path(path)
    return normalized_url(path) if isinstance(path, RemotePath) else path.expanduser().resolve()


def fresh(path: "Path | RemotePath") -> "Path | RemotePath":
    """``path``; a URL's prefix listed anew first: every later question about the run is answered from
    that ONE listing (issue 22), and a live run's new objects are seen."""
    if isinstance(path, RemotePath):
        path.relist()
    return path


def read_config(root: Path) -> dict:
    """The run's ``ckpt-select.yaml`` overrides, or {}."""
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        return {}
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise AnalysisError(f"{config_path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise AnalysisError(f"{config_path}: expected a mapping with keys name, logs, checkpoints, exclude")
    return config


def walk_tree(root: "Path | RemotePath") -> Iterator[tuple["Path | RemotePath", list[str], list[str]]]:
    """``os.walk`` of a local folder; for a URL the same walk answered from ONE listing of the prefix (issue 22).

    Both honour the caller pruning ``dirnames`` in place.
    """
    if isinstance(root, RemotePath):
        yield from root.walk()
        return
    for dirpath, dirnames, filenames in os.walk(root):
        yield Path(dirpath), dirnames, filenames


def walk_run(root: Path, config: dict, allowed: Path | None = None) -> tuple[list[Path], list[Path], list[str]]:
    """(checkpoint paths, log candidates, notes) under ``root``, honouring the config globs.

    With ``allowed`` (``ui --root``) an entry resolving outside it is dropped before any reader sniffs it.
    """
    excludes = [str(p) for p in config.get("exclude", [])]
    ckpt_globs = [str(p) for p in config.get("checkpoints", [])]
    log_globs = [str(p) for p in config.get("logs", [])]
    ckpts: list[Path] = []
    logs: list[Path] = []
    notes: list[str] = []
    for current, dirnames, filenames in walk_tree(root):
        depth = len(current.relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS and depth < MAX_DEPTH)
        dirnames[:] = [d for d in dirnames if not outside(root, [current / d], allowed, notes)]
        filenames = [f for f in filenames if not outside(root, [current / f], allowed, notes)]
        if current == root and detect_layout(root) == "dcp":
            ckpts.append(root)   # a DCP folder opened as the run: its files mean nothing one by one
        for d in list(dirnames):
            if detect_layout(current / d) is not None and not _excluded(root, current / d, excludes):
                ckpts.append(current / d)
                dirnames.remove(d)
                # A claimed folder can still hold a log (HF checkpoint-N/trainer_state.json).
                logs.extend(f for f in sorted((current / d).iterdir())
                            if f.is_file() and is_log_candidate(f) and not log_globs)
        for f in sorted(filenames):
            file_path = current / f
            if _excluded(root, file_path, excludes):
                continue
            if ckpt_globs and _matches(root, file_path, ckpt_globs):
                ckpts.append(file_path)
            elif log_globs and _matches(root, file_path, log_globs):
                logs.append(file_path)
            elif detect_layout(file_path) is not None and not ckpt_globs:
                ckpts.append(file_path)
            elif is_log_candidate(file_path) and not log_globs:
                logs.append(file_path)
    ckpts = [p for p in ckpts if not outside(root, _checkpoint_reads(p), allowed, notes)]
    logs = [p for p in _newest_trainer_states(logs) if not outside(root, [p], allowed, notes)]
    return ckpts, logs, notes


def _newest_trainer_states(logs: list[Path]) -> list[Path]:
    """``logs`` with, of the ``checkpoint-N/trainer_state.json`` files beside each other, only the newest (issue 21).

    The Trainer writes its whole log history into every checkpoint's trainer_state.json: the newest holds
    all the others do, and listing twenty copies of one history reads as twenty logs.
    """
    newest: dict[Path, tuple[int, Path]] = {}
    for path in logs:
        step = _trainer_state_step(path)
        if step is not None and (path.parent.parent not in newest or step > newest[path.parent.parent][0]):
            newest[path.parent.parent] = (step, path)
    kept = {path for _, path in newest.values()}
    return [p for p in logs if _trainer_state_step(p) is None or p in kept]


def _trainer_state_step(path: Path) -> int | None:
    """N of a ``checkpoint-N/trainer_state.json`` path, else None."""
    folder = re.fullmatch(r"checkpoint-(\d+)", path.parent.name)
    return int(folder.group(1)) if path.name == "trainer_state.json" and folder else None


def outside(root: Path, paths: Iterable[Path], allowed: Path | None, notes: list[str]) -> bool:
    """True, with a note naming the file, when one of ``paths`` resolves outside ``allowed`` (``ui --root``).

    Only existing paths count: a missing one reads nothing. The note does not say where the link
    points: that is the very thing a confined server must not tell.
    """
    if allowed is None:
        return False
    for path in paths:
        if (path.exists() or path.is_symlink()) and not is_within(path, allowed):
            shown = path.relative_to(root) if path.is_relative_to(root) else path.name
            notes.append(f"{shown}: left out, it resolves outside the allowed folder {allowed} (ui --root)")
            return True
    return False


def _checkpoint_reads(path: Path) -> Iterator[Path]:
    """Every file a checkpoint may read, lazily, in the order they are safe to look at.

    A folder's own entries come first (its index, config, optimizer.pt, tokenizer), so that no index
    is parsed before it is known to lie inside the root; then the reader's files (the shards an index names).
    A reader that cannot list them leaves that to :mod:`analysis.run`, which reports it.
    """
    yield path
    if path.is_dir():
        yield from sorted(path.iterdir())
    layout = detect_layout(path)
    try:
        files = list(CHECKPOINT_READERS[layout].files(path)) if layout else []
    except AnalysisError:
        return
    yield from files


def _excluded(root: Path, path: Path, patterns: list[str]) -> bool:
    return bool(patterns) and _matches(root, path, patterns)


def _matches(root: Path, path: Path, patterns: list[str]) -> bool:
    rel = path.relative_to(root).as_posix()
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(path.name, p) for p in patterns)


def is_log_candidate(path: Path) -> bool:
    """Whether a file's name says it may be a log (its content is sniffed later, by the log readers)."""
    return path.suffix.lower() in LOG_SUFFIXES or "events.out.tfevents" in path.name


def find_run_folders(root: str | Path, max_depth: int = 3, limit: int = 200) -> list[Path]:
    """Folders under ``root`` that look like runs: they hold a checkpoint or a log file directly.

    Cheap (names only, nothing is parsed): it feeds the app's run picker.
    """
    base = fresh(absolute(root))
    found: list[Path] = []
    for current, dirnames, filenames in walk_tree(base):
        depth = len(current.relative_to(base).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS and depth < max_depth)
        has_ckpt = any(f.endswith((".safetensors", ".pt", ".pth", ".ckpt", ".bin")) for f in filenames)
        has_log = any(is_log_candidate(Path(f)) and not f.endswith(".json") for f in filenames)
        if has_ckpt or has_log or any(_STEP_FOLDER.fullmatch(d) for d in dirnames):
            found.append(current)
            dirnames[:] = []  # a run's own subfolders are not separate runs
        if len(found) >= limit:
            break
    return found


def step_of(path: Path, meta: dict[str, str]) -> tuple[int | None, str]:
    """A checkpoint's step from its metadata, else the last number in its name or folder name."""
    for key in STEP_METADATA_KEYS:
        value = meta.get(key)
        if value is not None and str(value).strip().lstrip("-").isdigit():
            return int(value), "metadata"
    own = path.stem if path.is_file() else path.name
    numbers = _NUMBER.findall(own)
    if numbers:
        return int(numbers[-1]), "name"
    # A generic file name (model.safetensors) inside a step folder (checkpoint-1200/).
    folder = _STEP_FOLDER.fullmatch(path.parent.name)
    if folder:
        return int(folder.group(1)), "name"
    return None, "order"


def name_step(path: Path) -> int:
    """A checkpoint's step from its name (no file is opened); -1 when the name has none."""
    step = step_of(path, {})[0]
    return -1 if step is None else step


def group_runs(root: Path, ckpt_paths: list[Path], log_paths: list[Path]) -> list[RunFiles]:
    """Rules 1 and 2 of :mod:`analysis.run_groups`: runs by folder convention, resumes joined."""
    return join_resumed(group_by_folder(root, ckpt_paths, log_paths), name_step, _first_logged_step)


def _first_logged_step(path: Path) -> int | None:
    """The first step a log records, or None when it is not a log CkptSelect reads."""
    from .logs import read_log, sniff_format
    try:
        fmt = sniff_format(path)
        table = read_log(path, fmt) if fmt is not None else None
    except (AnalysisError, OSError):
        return None
    return table.segments[0][0] if table is not None and table.segments else None


def run_info(group: RunFiles) -> RunInfo:
    """A group described from names alone (steps from the checkpoints' names)."""
    ordered = sorted(group.checkpoints, key=lambda p: (name_step(p), p.as_posix()))
    return RunInfo(group.name, group.path, tuple(ordered), tuple(name_step(p) for p in ordered),
                   tuple(group.logs), group.reason)


def fingerprint(root: Path, files: list[Path]) -> str:
    """A short hash of (path, size, mtime) of every file read: the cache key of the run.

    Names are hashed as the file system's bytes (a name that is not UTF-8 holds lone surrogates in
    ``str``), and a file that cannot be looked at (a dangling symlink) counts as "missing" (issue 19).
    An object in a bucket counts by its size and ETag instead of a time (issue 22).
    """
    digest = hashlib.sha1()
    for f in sorted(set(files)):
        try:
            if isinstance(f, RemotePath):
                _, size, version = file_look(f)
                look = f"|{size}|{version}\n"
            else:
                stat = f.stat()
                look = f"|{stat.st_size}|{stat.st_mtime_ns}\n"
        except (OSError, AnalysisError):
            look = "|missing\n"
        digest.update(os.fsencode(f.relative_to(root) if f.is_relative_to(root) else f) + look.encode())
    return digest.hexdigest()[:16]
