"""A training run: its logs and checkpoints, discovered without configuration.

``open_run(path)`` finds the run's files (:mod:`analysis.discovery`: one walk of the folder, each
checkpoint reader claiming the folders and files of its layout, the remaining text files sniffed for
known log formats), reads them, and returns a :class:`Run` with tidy metrics and checkpoint references
sorted by step; a file that cannot be read is listed (:mod:`analysis.unreadable`). An optional
``ckpt-select.yaml`` in the run folder overrides what discovery guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .checkpoints import CHECKPOINT_READERS, SKIPPED_NOTE, detect_layout, open_checkpoint
from .discovery import (CHECKPOINT_SUFFIXES, CONFIG_FILE, LOG_SUFFIXES, MAX_DEPTH, SKIP_DIRS, STEP_METADATA_KEYS,
                        absolute, allowed_root, find_run_folders, fingerprint, fresh, group_runs, name_step, outside,
                        read_config, run_info, step_of, walk_run, walk_tree)
from .errors import AnalysisError, CheckpointReadError, InvalidArgument, NotACheckpoint, RunNotFound, SeveralRuns
from .paths import normalized_url, resolve_within
from .remote import RemotePath, as_path
from .run_groups import RunInfo, choose, split_by_name, starts_over
from .unreadable import (BEING_WRITTEN_SECONDS, SIZE_RECHECK_SECONDS, UnreadableFile, problem, set_aside_merge,
                         unreadable_checkpoints)

if TYPE_CHECKING:
    import pandas as pd

    from .logs import LogTable

# pandas and the log readers load inside open_run: checkpoint_ref (all a merge needs from
# this module) must not pay ~0.4 s of imports for them (issue 6).

# A merged output written by CkptSelect carries this key; it is never taken for a checkpoint.
MERGE_MARKER_KEY = "ckpt_select_recipe_sha256"
# This module stays the public home of a run's API; the constants and helpers that moved are re-exported.
__all__ = ["BEING_WRITTEN_SECONDS", "CHECKPOINT_SUFFIXES", "CONFIG_FILE", "LOG_SUFFIXES", "MAX_DEPTH",
           "MERGE_MARKER_KEY", "SIZE_RECHECK_SECONDS", "SKIP_DIRS", "STEP_METADATA_KEYS", "CheckpointRef", "Run",
           "RunInfo", "UnreadableFile", "checkpoint_ref", "find_run_folders", "find_runs", "folder_stamp", "open_run",
           "printable"]


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
    allowed = allowed_root(root)
    root = fresh(resolve_within(path, allowed))
    if not root.exists():
        raise RunNotFound(root, "no such folder")
    if root.is_file():
        return _run_from_file(root)
    config_notes: list[str] = []
    config = read_config(root) if not outside(root, [root / CONFIG_FILE], allowed, config_notes) else {}
    ckpt_paths, log_candidates, notes = walk_run(root, config, allowed)
    notes = config_notes + notes
    groups = group_runs(root, ckpt_paths, log_candidates)
    chosen = choose(root, [run_info(g) for g in groups], run_name) if len(groups) > 1 else None
    files = next((g for g in groups if chosen is not None and g.name == chosen.name), groups[0])
    name = str(config.get("name") or (root.name if len(groups) == 1 else f"{root.name}/{files.name}"))
    run = _run_from_files(root, list(files.checkpoints), list(files.logs), name, notes)
    run = single_run(root, run, run_name if len(groups) == 1 else None)
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
    allowed = allowed_root(root)
    folder = fresh(resolve_within(path, allowed))
    if not folder.is_dir():
        return []
    ckpt_paths, log_candidates, _ = walk_run(folder, read_config(folder), allowed)
    runs: list[RunInfo] = []
    for group in group_runs(folder, ckpt_paths, log_candidates):
        info = run_info(group)
        runs.extend(split_by_name(folder, info, [name_step(p) for p in info.checkpoints], info.checkpoints) or [info])
    return runs


def single_run(root: Path, run: Run, run_name: str | None) -> Run:
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
            step, source = step_of(path, handle.metadata())
        step = 0 if step is None else step
    return CheckpointRef(step, path, layout, files, sum(f.stat().st_size for f in files), source)


def folder_stamp(path: str | Path) -> str:
    """A cheap hash of (path, size, mtime) of every file under a run folder, without parsing.

    Caches key on it so that a run still being written (new checkpoints, longer logs)
    is re-read, while an unchanged one is not.
    """
    root = fresh(absolute(path))
    if root.is_file():
        return fingerprint(root.parent, [root])
    files = []
    for current, dirnames, filenames in walk_tree(root):
        depth = len(current.relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS and depth < MAX_DEPTH)
        files.extend(current / f for f in filenames)
    return fingerprint(root, files)


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
    refs, merged = describe_checkpoints(ckpt_paths, notes, unreadable)
    return assemble_run(root, name, refs, merged, logs, _merge_metrics(logs), notes, unreadable)


def assemble_run(root: Path, name: str, refs: list[CheckpointRef], merged: list[Path], logs: list[LogTable],
              metrics: pd.DataFrame, notes: list[str], unreadable: list[UnreadableFile]) -> Run:
    """The :class:`Run` of what was read, with the fingerprint of every file it read (``open_run`` and the follower)."""
    # Unreadable files count too: the cache must reload once a save in progress is complete.
    used = [p for ref in refs for p in ref.files] + [t.path for t in logs] + [u.path for u in unreadable]
    if (root / CONFIG_FILE).is_file():
        used.append(root / CONFIG_FILE)
    hint = root / "evaluate.py"
    return Run(
        path=root, name=name, checkpoints=tuple(refs), logs=tuple(logs), metrics=metrics,
        fingerprint=fingerprint(root, used), merged_outputs=tuple(merged),
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
            unreadable.append(UnreadableFile(path, problem(path, e), "log"))
            continue
        if table is None:
            continue
        notes.append(log_note(path, table, len(table.metric_names())))
        if table.rows:
            tables.append(table)
    return tables


def log_note(path: Path, table: LogTable, metric_count: int) -> str:
    """The run's note on one log it read: what it was read as, or that it holds no rows yet (then it is left out)."""
    if table.rows == 0:
        return f"{path.name}: recognised as {table.format} but holds no metric rows"
    return (f"{path.name}: read as {table.format}: {table.rows} rows, {metric_count} metrics, "
            f"{table.skipped_lines} lines skipped, {table.restarts} restarts")


def describe_checkpoints(paths: list[Path], notes: list[str],
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
            failed.append((path, problem(path, e)))
            continue
        if MERGE_MARKER_KEY in meta:
            set_aside_merge(path, merged, unreadable, checked)
            continue
        if SKIPPED_NOTE in meta:   # a part passed over (a DeepSpeed optimizer shard's pickle), never the run (issue 21)
            notes.append(f"{path.name}: {meta[SKIPPED_NOTE]}")
        step, source = step_of(path, meta)
        if step is None:
            unnumbered.append((path, layout, files, size))
        else:
            refs.append(CheckpointRef(step, path, layout, files, size, source))
    start = max((r.step for r in refs), default=-1) + 1
    for offset, (path, layout, files, size) in enumerate(unnumbered):
        notes.append(f"{path.name}: no step in its metadata or name; placed after the numbered ones")
        refs.append(CheckpointRef(start + offset, path, layout, files, size, "order"))
    refs.sort(key=lambda r: (r.step, r.path.as_posix()))
    unreadable.extend(unreadable_checkpoints(failed))
    return refs, merged


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
