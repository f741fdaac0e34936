"""A training run: its logs and checkpoints, discovered without configuration.

``open_run(path)`` walks the run folder once, lets each checkpoint reader claim the
folders and files of its layout, sniffs the remaining text files for known log formats,
and returns a :class:`Run` with tidy metrics and checkpoint references sorted by step.
An optional ``ckpt-select.yaml`` in the run folder overrides what discovery guessed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import yaml

from .checkpoints import CHECKPOINT_READERS, SKIPPED_NOTE, detect_layout, open_checkpoint
from .errors import AnalysisError, CheckpointReadError, InvalidArgument, NotACheckpoint, RunNotFound, SeveralRuns
from .paths import is_within, normalized_url, resolve_within
from .remote import RemotePath, as_path, file_look, is_remote
from .remote.outputs import incomplete_output, merge_output_prefix
from .run_groups import RunFiles, RunInfo, choose, group_by_folder, join_resumed, split_by_name, starts_over

if TYPE_CHECKING:
    import pandas as pd

    from .logs import LogTable

# pandas and the log readers load inside open_run: checkpoint_ref (all a merge needs from
# this module) must not pay ~0.4 s of imports for them (issue 6).

CONFIG_FILE = "ckpt-select.yaml"
# Metadata keys that give a checkpoint's step, most trusted first.
STEP_METADATA_KEYS = ("step", "global_step", "iteration", "iter_num")
# A merged output written by CkptSelect carries this key; it is never taken for a checkpoint.
MERGE_MARKER_KEY = "ckpt_select_recipe_sha256"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
LOG_SUFFIXES = {".jsonl", ".json", ".csv", ".log", ".txt", ".out", ".tsv", ".stdout"}
SKIP_DIRS = {"__pycache__", "node_modules", "wandb"}
MAX_DEPTH = 4
# A checkpoint that cannot be read and was modified less than this many seconds ago, or whose size
# changes between two looks SIZE_RECHECK_SECONDS apart, is a save still being written, not a corrupt file.
BEING_WRITTEN_SECONDS = 60.0
SIZE_RECHECK_SECONDS = 0.1
_NUMBER = re.compile(r"(\d+)")
_STEP_FOLDER = re.compile(r"(?:checkpoint|ckpt|step|iter|global_step|epoch)[-_]?(\d+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class CheckpointRef:
    """One checkpoint of a run: where it is, which step, which layout, how big."""

    step: int
    path: Path                  # absolute; a file or a folder depending on the layout
    layout: str                 # key of CHECKPOINT_READERS ("format" in JSON output)
    files: tuple[Path, ...]     # the files that make it up
    size_bytes: int
    step_source: str = "name"   # "metadata" | "name" | "order" | "given"

    @property
    def name(self) -> str:
        """A short display name: the path relative to nothing but its parent."""
        return self.path.name


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


@dataclass(frozen=True, slots=True, eq=False)
class Run:
    """Everything discovery found in a run folder."""

    path: Path
    name: str
    checkpoints: tuple[CheckpointRef, ...]   # sorted by step
    logs: tuple[LogTable, ...]
    metrics: pd.DataFrame                    # tidy: step, metric, value, wall_time
    fingerprint: str                         # changes when any file read changes (cache key)
    merged_outputs: tuple[Path, ...] = ()    # CkptSelect merges found inside the run
    evaluator_hint: str | None = None        # an evaluate.py shipped with the run (never run unasked)
    notes: tuple[str, ...] = field(default_factory=tuple)
    unreadable: tuple[UnreadableFile, ...] = ()   # files passed over: corrupt, unsafe, missing, being written
    # Per-metric frames and the wall clock, split out once: comparing the metric-name column
    # of a million-step run costs ~0.15 s, and a page asks for metrics dozens of times.
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def metric(self, name: str) -> pd.DataFrame:
        """Rows of one canonical metric (``step``, ``value``, ``wall_time``), sorted by step.

        A copy: callers may change it without touching the run.
        """
        from .logs.base import empty_frame, split_by_metric
        if "metrics" not in self._memo:
            self._memo["metrics"] = split_by_metric(self.metrics)
        frame = self._memo["metrics"].get(name)
        return frame.copy() if frame is not None else empty_frame()[["step", "value", "wall_time"]]

    def wall_clock(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, wall_time) of every logged row with a time stamp, one per step, sorted by step."""
        if "wall_clock" not in self._memo:
            frame = self.metrics[np.isfinite(self.metrics["wall_time"].to_numpy(float))]
            frame = frame.sort_values("step", kind="stable").drop_duplicates("step")
            self._memo["wall_clock"] = (frame["step"].to_numpy(float), frame["wall_time"].to_numpy(float))
        steps, wall = self._memo["wall_clock"]
        return steps.copy(), wall.copy()

    def checkpoint_at(self, step: int) -> CheckpointRef:
        """The checkpoint saved at ``step``."""
        for ref in self.checkpoints:
            if ref.step == step:
                return ref
        raise AnalysisError(f"{self.path}: no checkpoint at step {step} (have {[c.step for c in self.checkpoints]})")


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a non-UTF-8 file name shown as U+FFFD (issue 19).

    Python keeps such bytes as lone surrogates, which a strict UTF-8 stdout and Streamlit's
    messages cannot encode.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def open_run(path: str | Path, root: str | Path | None = None, run_name: str | None = None) -> Run:
    """Discover the logs and checkpoints of a run folder.

    A file that cannot be read (a save still being written, a corrupt or unsafe checkpoint, a dangling
    symlink) is listed in ``Run.unreadable`` with the reason instead of failing the run (issue 19).

    Args:
        path: the run folder, a single log file (a log-only view) or a single checkpoint file
            (a one-checkpoint run).
        root: the folder the app is confined to (``ui --root``; relative ``path`` is taken from it). The run
            must lie in it, and every file the run would read that resolves outside it (a symlink pointing
            out: a log, a checkpoint, a shard, ``ckpt-select.yaml``) is left out with a note (issue 19).
            None, as on the command line: no limit.
        run_name: which run to open when the folder holds several (``--run NAME``, a name
            :func:`find_runs` lists); None: the folder must hold one run (issue 21).

    Raises:
        InvalidArgument: ``path`` resolves outside ``root``.
        RunNotFound: the path does not exist, or holds no log or checkpoint that can be read.
        CheckpointReadError: a single checkpoint file that cannot be read or holds no weights.
        AnalysisError: the run's ckpt-select.yaml is malformed.
        SeveralRuns: the folder holds several runs and ``run_name`` names none (issue 21).
        InvalidArgument: ``run_name`` is not a run of the folder.
    """
    allowed = _allowed(root)
    root = _fresh(resolve_within(path, allowed))
    if not root.exists():
        raise RunNotFound(root, "no such folder")
    if root.is_file():
        return _run_from_file(root)
    config_notes: list[str] = []
    config = _read_config(root) if not _outside(root, [root / CONFIG_FILE], allowed, config_notes) else {}
    ckpt_paths, log_candidates, notes = _walk(root, config, allowed)
    notes = config_notes + notes
    groups = _grouped(root, ckpt_paths, log_candidates)
    chosen = choose(root, [_info(g) for g in groups], run_name) if len(groups) > 1 else None
    files = next((g for g in groups if chosen is not None and g.name == chosen.name), groups[0])
    name = str(config.get("name") or (root.name if len(groups) == 1 else f"{root.name}/{files.name}"))
    run = _run_from_files(root, list(files.checkpoints), list(files.logs), name, notes)
    run = _one_run(root, run, run_name if len(groups) == 1 else None)
    if not run.checkpoints and not run.logs and run.unreadable:
        raise RunNotFound(root, "nothing here could be read: " + "; ".join(u.describe() for u in run.unreadable))
    if not run.checkpoints and not run.logs:
        from .logs import LOG_READERS
        raise RunNotFound(root, "found no checkpoints and no training logs here. "
                                f"Hint: CkptSelect reads logs ({', '.join(LOG_READERS)}) and checkpoints "
                                f"({', '.join(CHECKPOINT_READERS)}); list yours in {CONFIG_FILE}.")
    return run


def find_runs(path: str | Path, root: str | Path | None = None) -> list[RunInfo]:
    """The runs a folder holds (issue 21): one for most folders, several for Lightning's ``version_N``
    folders, sibling Hugging Face output folders, or checkpoints whose steps repeat under other names.

    Cheap: names, and a small weight sample where a resume must be told from a relaunch. Each
    :class:`RunInfo` opens with ``open_run(info.path)`` when its folder is its own, else with
    ``open_run(path, run_name=info.name)``.
    """
    allowed = _allowed(root)
    folder = _fresh(resolve_within(path, allowed))
    if not folder.is_dir():
        return []
    ckpt_paths, log_candidates, _ = _walk(folder, _read_config(folder), allowed)
    runs: list[RunInfo] = []
    for group in _grouped(folder, ckpt_paths, log_candidates):
        info = _info(group)
        runs.extend(split_by_name(folder, info, [_name_step(p) for p in info.checkpoints], info.checkpoints) or [info])
    return runs


def _allowed(root: "str | Path | RemotePath | None") -> "Path | RemotePath | None":
    """``ui --root`` as a resolved folder or a normalised URL prefix (issue 22); None: no limit."""
    if root is None:
        return None
    return normalized_url(root) if is_remote(root) else Path(root).expanduser().resolve()   # type: ignore[arg-type]


def _fresh(path: "Path | RemotePath") -> "Path | RemotePath":
    """``path``; a URL's prefix listed anew first: every later question about the run is answered from
    that ONE listing (issue 22), and a live run's new objects are seen."""
    if isinstance(path, RemotePath):
        path.relist()
    return path


def _tree(root: "Path | RemotePath") -> Iterator[tuple["Path | RemotePath", list[str], list[str]]]:
    """``os.walk`` of a local folder; for a URL the same walk answered from ONE listing of the prefix (issue 22).

    Both honour the caller pruning ``dirnames`` in place.
    """
    if isinstance(root, RemotePath):
        yield from root.walk()
        return
    for dirpath, dirnames, filenames in os.walk(root):
        yield Path(dirpath), dirnames, filenames


def _grouped(root: Path, ckpt_paths: list[Path], log_paths: list[Path]) -> list[RunFiles]:
    """Rules 1 and 2 of :mod:`analysis.run_groups`: runs by folder convention, resumes joined."""
    return join_resumed(group_by_folder(root, ckpt_paths, log_paths), _name_step, _first_logged_step)


def _name_step(path: Path) -> int:
    """A checkpoint's step from its name (no file is opened); -1 when the name has none."""
    step = _step_of(path, {})[0]
    return -1 if step is None else step


def _first_logged_step(path: Path) -> int | None:
    """The first step a log records, or None when it is not a log CkptSelect reads."""
    from .logs import read_log, sniff_format
    try:
        fmt = sniff_format(path)
        table = read_log(path, fmt) if fmt is not None else None
    except (AnalysisError, OSError):
        return None
    return table.segments[0][0] if table is not None and table.segments else None


def _info(group: RunFiles) -> RunInfo:
    """A group described from names alone (steps from the checkpoints' names)."""
    ordered = sorted(group.checkpoints, key=lambda p: (_name_step(p), p.as_posix()))
    return RunInfo(group.name, group.path, tuple(ordered), tuple(_name_step(p) for p in ordered),
                   tuple(group.logs), group.reason)


def _one_run(root: Path, run: Run, run_name: str | None) -> Run:
    """Rule 3 on a run read: steps that repeat, or a log that starts over, mean several runs (issue 21).

    Raises:
        SeveralRuns: they cannot be told apart, or ``run_name`` names none of them.
    """
    refs = run.checkpoints
    info = RunInfo(run.name, root, tuple(r.path for r in refs), tuple(r.step for r in refs),
                   tuple(t.path for t in run.logs), "the whole folder")
    parts = split_by_name(root, info, [r.step for r in refs], [r.path for r in refs])
    restarted = [t for t in run.logs if starts_over(t)]
    if parts is None:
        repeated = sorted({r.step for r in refs if [x.step for x in refs].count(r.step) > 1})
        raise SeveralRuns(root, [info], message=(
            f"{root}: checkpoints share steps {repeated[:5]} and their names do not tell the runs apart; "
            f"never averaged together. Put each run in a folder of its own, or list one run's files in {CONFIG_FILE}."))
    if len(parts) == 1 and not restarted:
        if run_name not in (None, run.name, root.name):
            raise InvalidArgument(f"{root}: no run named '{run_name}' here; it holds one run, '{run.name}'")
        return run
    why = "".join(f"; {t.path.name} starts over at step {t.segments[0][0]}" for t in restarted)
    chosen = next((p for p in parts if p.name == run_name), None) if len(parts) > 1 else None
    if chosen is None:
        if len(parts) == 1:
            raise SeveralRuns(root, parts, message=(
                f"{root}: holds several runs{why} (a resume restarts past step 0: this log starts again). "
                f"Never averaged together: keep each launch in a folder of its own, or list one run's files "
                f"in {CONFIG_FILE}."))
        raise SeveralRuns(root, parts, reason=f" (checkpoints whose steps repeat{why})")
    return _restricted(run, chosen, restarted)


def _restricted(run: Run, chosen: RunInfo, restarted: list) -> Run:
    """``run`` with only ``chosen``'s checkpoints; logs holding several runs are left out with a note."""
    keep = set(chosen.checkpoints)
    left_out = {id(t) for t in restarted}
    logs = tuple(t for t in run.logs if id(t) not in left_out)
    notes = run.notes + tuple(f"{t.path.name}: left out: it holds several runs (it starts over)" for t in restarted)
    return replace(run, name=f"{run.name}/{chosen.name}", checkpoints=tuple(c for c in run.checkpoints if c.path in keep),
                   logs=logs, metrics=_merge_metrics(list(logs)), notes=notes)


def checkpoint_ref(path: str | Path, step: int | None = None) -> CheckpointRef:
    """A :class:`CheckpointRef` for one checkpoint path given by the user.

    The step is ``step`` if given, else read from the checkpoint's metadata or name (0 if neither has one).

    Raises:
        CheckpointReadError: the path is missing or not a known checkpoint layout.
    """
    path = as_path(path)
    path = normalized_url(path) if isinstance(path, RemotePath) else path.expanduser().resolve()
    layout = detect_layout(path)
    if layout is None:
        reason = "not a checkpoint layout CkptSelect knows" if path.exists() else "no such file or folder"
        raise CheckpointReadError(path, reason)
    files = tuple(CHECKPOINT_READERS[layout].files(path))
    source = "given"
    if step is None:
        with open_checkpoint(path, layout) as handle:
            step, source = _step_of(path, handle.metadata())
        step = 0 if step is None else step
    return CheckpointRef(step, path, layout, files, sum(f.stat().st_size for f in files), source)


def folder_stamp(path: str | Path) -> str:
    """A cheap hash of (path, size, mtime) of every file under a run folder, without parsing.

    Caches key on it so that a run still being written (new checkpoints, longer logs)
    is re-read, while an unchanged one is not.
    """
    root = _fresh(_absolute(path))
    if root.is_file():
        return _fingerprint(root.parent, [root])
    files = []
    for current, dirnames, filenames in _tree(root):
        depth = len(current.relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS and depth < MAX_DEPTH)
        files.extend(current / f for f in filenames)
    return _fingerprint(root, files)


def find_run_folders(root: str | Path, max_depth: int = 3, limit: int = 200) -> list[Path]:
    """Folders under ``root`` that look like runs: they hold a checkpoint or a log file directly.

    Cheap (names only, nothing is parsed): it feeds the app's run picker.
    """
    base = _fresh(_absolute(root))
    found: list[Path] = []
    for current, dirnames, filenames in _tree(base):
        depth = len(current.relative_to(base).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS and depth < max_depth)
        has_ckpt = any(f.endswith((".safetensors", ".pt", ".pth", ".ckpt", ".bin")) for f in filenames)
        has_log = any(_log_candidate(Path(f)) and not f.endswith(".json") for f in filenames)
        if has_ckpt or has_log or any(_STEP_FOLDER.fullmatch(d) for d in dirnames):
            found.append(current)
            dirnames[:] = []  # a run's own subfolders are not separate runs
        if len(found) >= limit:
            break
    return found


def _absolute(path: "str | Path | RemotePath") -> "Path | RemotePath":
    """A local path resolved, or a URL normalised."""
    path = as_path(path)
    return normalized_url(path) if isinstance(path, RemotePath) else path.expanduser().resolve()


def _read_config(root: Path) -> dict:
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


def _walk(root: Path, config: dict, allowed: Path | None = None) -> tuple[list[Path], list[Path], list[str]]:
    """(checkpoint paths, log candidates, notes) under ``root``, honouring the config globs.

    With ``allowed`` (``ui --root``) an entry resolving outside it is dropped before any reader sniffs it.
    """
    excludes = [str(p) for p in config.get("exclude", [])]
    ckpt_globs = [str(p) for p in config.get("checkpoints", [])]
    log_globs = [str(p) for p in config.get("logs", [])]
    ckpts: list[Path] = []
    logs: list[Path] = []
    notes: list[str] = []
    for current, dirnames, filenames in _tree(root):
        depth = len(current.relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS and depth < MAX_DEPTH)
        dirnames[:] = [d for d in dirnames if not _outside(root, [current / d], allowed, notes)]
        filenames = [f for f in filenames if not _outside(root, [current / f], allowed, notes)]
        if current == root and detect_layout(root) == "dcp":
            ckpts.append(root)   # a DCP folder opened as the run: its files mean nothing one by one
        for d in list(dirnames):
            if detect_layout(current / d) is not None and not _excluded(root, current / d, excludes):
                ckpts.append(current / d)
                dirnames.remove(d)
                # A claimed folder can still hold a log (HF checkpoint-N/trainer_state.json).
                logs.extend(f for f in sorted((current / d).iterdir())
                            if f.is_file() and _log_candidate(f) and not log_globs)
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
            elif _log_candidate(file_path) and not log_globs:
                logs.append(file_path)
    ckpts = [p for p in ckpts if not _outside(root, _checkpoint_reads(p), allowed, notes)]
    logs = [p for p in _newest_trainer_states(logs) if not _outside(root, [p], allowed, notes)]
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


def _outside(root: Path, paths: Iterable[Path], allowed: Path | None, notes: list[str]) -> bool:
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
    A reader that cannot list them leaves that to :func:`_describe_checkpoints`, which reports it.
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


def _log_candidate(path: Path) -> bool:
    return path.suffix.lower() in LOG_SUFFIXES or "events.out.tfevents" in path.name


def _run_from_file(path: Path) -> Run:
    """One file: a checkpoint (one a reader claims, or named like one) as a one-checkpoint run, else a log.

    Raises:
        CheckpointReadError: a checkpoint file that cannot be read, or that holds no model weights.
    """
    if detect_layout(path) is None and path.suffix not in CHECKPOINT_SUFFIXES:
        return _run_from_files(path.parent, [], [path], path.stem, notes=[])
    run = _run_from_files(path.parent, [path], [], path.stem, notes=[])
    if run.unreadable:
        raise CheckpointReadError(path, f"{run.unreadable[0].status}: {run.unreadable[0].reason}")
    if run.merged_outputs:   # a merge CkptSelect wrote, asked for by name: it is the checkpoint to analyze
        return replace(run, checkpoints=(checkpoint_ref(path),), merged_outputs=())
    if not run.checkpoints:
        _read_checkpoint_header(path)   # passed over as no checkpoint: raises NotACheckpoint saying what it holds
    return run


def _run_from_files(root: Path, ckpt_paths: list[Path], log_paths: list[Path], name: str,
                    notes: list[str]) -> Run:
    """Read the logs, describe the checkpoints, and assemble the :class:`Run`."""
    notes = list(notes)
    unreadable: list[UnreadableFile] = []
    logs = _read_logs(log_paths, notes, unreadable)
    refs, merged = _describe_checkpoints(ckpt_paths, notes, unreadable)
    return _assemble(root, name, refs, merged, logs, _merge_metrics(logs), notes, unreadable)


def _assemble(root: Path, name: str, refs: list[CheckpointRef], merged: list[Path], logs: list[LogTable],
              metrics: pd.DataFrame, notes: list[str], unreadable: list[UnreadableFile]) -> Run:
    """The :class:`Run` of what was read, with the fingerprint of every file it read (``open_run`` and the follower)."""
    # Unreadable files count too: the cache must reload once a save in progress is complete.
    used = [p for ref in refs for p in ref.files] + [t.path for t in logs] + [u.path for u in unreadable]
    if (root / CONFIG_FILE).is_file():
        used.append(root / CONFIG_FILE)
    hint = root / "evaluate.py"
    return Run(
        path=root, name=name, checkpoints=tuple(refs), logs=tuple(logs), metrics=metrics,
        fingerprint=_fingerprint(root, used), merged_outputs=tuple(merged),
        # Never a remote one: an evaluator is code, imported from a local file only.
        evaluator_hint=f"{hint}:evaluate" if isinstance(hint, Path) and hint.is_file() else None, notes=tuple(notes),
        unreadable=tuple(unreadable),
    )


def _read_logs(paths: list[Path], notes: list[str], unreadable: list[UnreadableFile]) -> list[LogTable]:
    """Every path a log reader recognises, read; others are passed over with a note.

    A file that cannot be read at all (a dangling symlink, a symlink loop, no permission) goes to
    ``unreadable`` with the reason: one bad file must not sink the run (issue 19).
    """
    from .logs import read_log, sniff_format
    tables = []
    for path in paths:
        try:
            fmt = sniff_format(path)
            table = read_log(path, fmt) if fmt is not None else None
        except (AnalysisError, OSError) as e:
            unreadable.append(UnreadableFile(path, _problem(path, e), "log"))
            continue
        if table is None:
            continue
        notes.append(_log_note(path, table, len(table.metric_names())))
        if table.rows:
            tables.append(table)
    return tables


def _log_note(path: Path, table: LogTable, metric_count: int) -> str:
    """The run's note on one log it read: what it was read as, or that it holds no rows yet (then it is left out)."""
    if table.rows == 0:
        return f"{path.name}: recognised as {table.format} but holds no metric rows"
    return (f"{path.name}: read as {table.format}: {table.rows} rows, {metric_count} metrics, "
            f"{table.skipped_lines} lines skipped, {table.restarts} restarts")


def _describe_checkpoints(paths: list[Path], notes: list[str],
                          unreadable: list[UnreadableFile]) -> tuple[list[CheckpointRef], list[Path]]:
    """A :class:`CheckpointRef` per checkpoint (headers only), sorted by step; merges set aside.

    A checkpoint that cannot be read goes to ``unreadable`` with the reason, marked "being written"
    when it is a save in progress (issue 19).
    """
    refs: list[CheckpointRef] = []
    merged: list[Path] = []
    unnumbered: list[tuple[Path, str, tuple[Path, ...], int]] = []
    failed: list[tuple[Path, str]] = []
    checked: dict[RemotePath, str | None] = {}
    for path in paths:
        try:
            layout, files, size, meta = _read_checkpoint_header(path)
        except NotACheckpoint as e:   # a saved tensor or dataset beside the checkpoints: not the run's
            notes.append(f"{path.name}: passed over, not a checkpoint: it {e.reason}")
            continue
        except (CheckpointReadError, OSError) as e:
            failed.append((path, _problem(path, e)))
            continue
        if MERGE_MARKER_KEY in meta:
            _set_aside_merge(path, merged, unreadable, checked)
            continue
        if SKIPPED_NOTE in meta:   # a part passed over (a DeepSpeed optimizer shard's pickle), never the run (issue 21)
            notes.append(f"{path.name}: {meta[SKIPPED_NOTE]}")
        step, source = _step_of(path, meta)
        if step is None:
            unnumbered.append((path, layout, files, size))
        else:
            refs.append(CheckpointRef(step, path, layout, files, size, source))
    start = max((r.step for r in refs), default=-1) + 1
    for offset, (path, layout, files, size) in enumerate(unnumbered):
        notes.append(f"{path.name}: no step in its metadata or name; placed after the numbered ones")
        refs.append(CheckpointRef(start + offset, path, layout, files, size, "order"))
    refs.sort(key=lambda r: (r.step, r.path.as_posix()))
    unreadable.extend(_unreadable_checkpoints(failed))
    return refs, merged


def _set_aside_merge(path: Path, merged: list[Path], unreadable: list[UnreadableFile],
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


def _read_checkpoint_header(path: Path) -> tuple[str, tuple[Path, ...], int, dict[str, str]]:
    """(layout, files, total bytes, metadata) of one checkpoint, from its headers alone.

    Raises:
        CheckpointReadError: no reader claims it, or it cannot be read (NotACheckpoint: it holds no weights).
        OSError: one of its files vanished or cannot be looked at.
    """
    layout = detect_layout(path)
    if layout is None:
        raise CheckpointReadError(path, "not a checkpoint layout CkptSelect knows")
    files = tuple(CHECKPOINT_READERS[layout].files(path))
    size = sum(f.stat().st_size for f in files)
    with open_checkpoint(path, layout) as handle:
        return layout, files, size, handle.metadata()


def _problem(path: Path, error: Exception) -> str:
    """Why a file could not be read, without the path the message already names elsewhere."""
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or str(error)
    if isinstance(path, Path) and path.is_symlink():
        reason = f"{reason} (a symlink to {os.readlink(path)})"
    return reason


def _unreadable_checkpoints(failed: list[tuple[Path, str]]) -> list[UnreadableFile]:
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
    return [UnreadableFile(path, reason, "checkpoint", _step_of(path, {})[0], fresh or grows)
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


def _step_of(path: Path, meta: dict[str, str]) -> tuple[int | None, str]:
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


def _merge_metrics(logs: list[LogTable]) -> pd.DataFrame:
    """One tidy frame from all logs; where two logs give the same (step, metric) the first wins."""
    import pandas as pd

    from .logs.base import empty_frame
    frames = [t.frame for t in logs if len(t.frame)]
    if not frames:
        return empty_frame()
    merged = pd.concat(frames, ignore_index=True)
    merged = merged.drop_duplicates(subset=["step", "metric"], keep="first")
    return merged.sort_values(["metric", "step"], kind="stable").reset_index(drop=True)


def _fingerprint(root: Path, files: list[Path]) -> str:
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
