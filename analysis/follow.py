"""Follow a run while it trains: each refresh reads only what was written since the last one (issue 23).

``RunFollower(path).refresh()`` returns a :class:`RunUpdate`: the run as it is now (a :class:`Run`, as
``open_run`` would read it), the log rows and checkpoints that are new, and the checkpoints still being
written. Logs are read from where the last read stopped (:mod:`analysis.logs.follow`); a checkpoint
whose files did not change keeps the reference read before (its health is memoised in
:mod:`analysis.signals.health` and its sketch cached on disk), so a refresh costs what the new data
costs. A checkpoint still being written (its header or index incomplete, its size or modification time
changing) is listed as being written and joins when complete; it never blocks the run.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .discovery import CONFIG_FILE, allowed_root, group_runs, outside, read_config, run_info, walk_run
from .errors import AnalysisError, RunNotFound
from .logs.builder import MetricPart
from .logs.follow import LogFollower
from .paths import resolve_within
from .remote import RemotePath, is_remote
from .run import CheckpointRef, Run, assemble_run, describe_checkpoints, log_note, single_run, open_run
from .run_groups import choose
from .unreadable import UnreadableFile, problem

if TYPE_CHECKING:
    from .selection import RecommendConfig

# A run that changed nothing for this long is taken as finished: the app stops following it.
IDLE_SECONDS = 30 * 60


@dataclass(frozen=True)
class RunUpdate:
    """What one :meth:`RunFollower.refresh` found."""

    run: Run
    new_rows: int                                   # log records added since the last refresh
    new_checkpoints: tuple[CheckpointRef, ...]      # checkpoints that joined since the last refresh
    being_written: tuple[UnreadableFile, ...]       # checkpoints (or logs) not complete yet
    changed: bool                                   # anything differs from the last refresh

    @property
    def last_step(self) -> int | None:
        """The newest step the run has logged or saved a checkpoint at."""
        steps = [c.step for c in self.run.checkpoints]
        if len(self.run.metrics):
            steps.append(int(self.run.metrics["step"].max()))
        return max(steps) if steps else None


@dataclass
class _Checkpoint:
    """What describing one checkpoint path gave, and the look (file sizes and times) it was read at."""

    look: tuple
    refs: list[CheckpointRef]
    merged: list[Path]
    notes: list[str]
    unreadable: list[UnreadableFile]


@dataclass
class RunFollower:
    """A run folder read again cheaply as it grows. Thread-safe: one refresh at a time."""

    path: Path
    root: Path | None = None        # the app's ``--root``: files resolving outside it are left out
    _logs: dict[Path, LogFollower] = field(default_factory=dict, init=False)
    _not_logs: dict[Path, tuple[int, int]] = field(default_factory=dict, init=False)
    _checkpoints: dict[Path, _Checkpoint] = field(default_factory=dict, init=False)
    _last: RunUpdate | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.root = allowed_root(self.root)
        self.path = resolve_within(self.path, self.root)

    def refresh(self) -> RunUpdate:
        """The run as it is now, reading only what changed since the last refresh.

        Raises:
            RunNotFound: the folder is gone or holds nothing readable (as ``open_run``).
            AnalysisError: its ckpt-select.yaml is malformed.
        """
        with self._lock:
            run = self._read()
            update = self._compare(run)
            self._last = update
            return update

    def _read(self) -> Run:
        """The :class:`Run`, from the followers' tables and the checkpoints described so far."""
        if isinstance(self.path, RemotePath):   # a bucket has no cheap "what changed": one listing, read anew (issue 22)
            return open_run(self.path, self.root)   # (unchanged checkpoints' sketches come from the cache, keyed by ETag)
        if not self.path.exists():
            raise RunNotFound(self.path, "no such folder")
        if self.path.is_file():   # a single file: small, read whole (as open_run does)
            return open_run(self.path, self.root)
        notes: list[str] = []
        config = {} if outside(self.path, [self.path / CONFIG_FILE], self.root, notes) else read_config(self.path)
        ckpt_paths, log_paths, walk_notes = walk_run(self.path, config, self.root)
        groups = group_runs(self.path, ckpt_paths, log_paths)
        if len(groups) > 1:   # several runs: refused as open_run refuses them, never followed as one (issue 21)
            choose(self.path, [run_info(g) for g in groups], None)
        notes += walk_notes
        unreadable: list[UnreadableFile] = []
        tables, parts = self._read_logs(log_paths, notes, unreadable)
        refs, merged = self._describe(ckpt_paths, notes, unreadable)
        run = _run_from_parts(self.path, str(config.get("name") or self.path.name), refs, merged, tables, parts,
                            notes, unreadable)
        return single_run(self.path, run, None)

    def _read_logs(self, paths: list[Path], notes: list[str], unreadable: list[UnreadableFile]):
        """(tables, per-metric rows of each) of the logs among ``paths``; a new file is sniffed once per change."""
        from .logs import sniff_format
        tables, parts = [], []
        self._logs = {p: f for p, f in self._logs.items() if p in paths}
        for path in paths:
            try:
                follower = self._logs.get(path)
                if follower is None:
                    look = _look(path)
                    if self._not_logs.get(path) == look:
                        continue
                    fmt = sniff_format(path)
                    if fmt is None:
                        self._not_logs[path] = look
                        continue
                    follower = self._logs[path] = LogFollower(path, fmt)
                table = follower.read()
            except (AnalysisError, OSError) as e:
                self._logs.pop(path, None)
                unreadable.append(UnreadableFile(path, problem(path, e), "log"))
                continue
            names = follower.metric_parts()
            notes.append(log_note(path, table, len(names)))
            if table.rows:
                tables.append(table)
                parts.append(names)
        return tables, parts

    def _describe(self, paths: list[Path], notes: list[str],
                  unreadable: list[UnreadableFile]) -> tuple[list[CheckpointRef], list[Path]]:
        """References of the checkpoints, describing again only those whose files changed (or were incomplete)."""
        known = {}
        for path in paths:
            look = _checkpoint_look(path)
            entry = self._checkpoints.get(path)
            if entry is None or entry.look != look or any(u.being_written for u in entry.unreadable):
                entry_notes, entry_unreadable = [], []
                refs, merged = describe_checkpoints([path], entry_notes, entry_unreadable)
                entry = _Checkpoint(look, refs, merged, entry_notes, entry_unreadable)
            known[path] = entry
        self._checkpoints = known
        entries = list(known.values())
        if any(r.step_source == "order" for e in entries for r in e.refs):   # numbered after the others: all again
            return describe_checkpoints(paths, notes, unreadable)
        for entry in entries:
            notes.extend(entry.notes)
            unreadable.extend(entry.unreadable)
        refs = sorted((r for e in entries for r in e.refs), key=lambda r: (r.step, r.path.as_posix()))
        return refs, [m for e in entries for m in e.merged]

    def _compare(self, run: Run) -> RunUpdate:
        """The update: what is new in ``run`` compared with the last refresh."""
        last = self._last.run if self._last is not None else None
        old_refs = {(r.path, r.size_bytes) for r in last.checkpoints} if last is not None else set()
        rows = sum(t.rows for t in run.logs) - (sum(t.rows for t in last.logs) if last is not None else 0)
        new = tuple(r for r in run.checkpoints if (r.path, r.size_bytes) not in old_refs)
        writing = tuple(u for u in run.unreadable if u.being_written)
        changed = last is None or last.fingerprint != run.fingerprint
        return RunUpdate(run, max(rows, 0), new, writing, changed)


@dataclass
class Watcher:
    """The recommendation of a followed run, reported each time it changes (``ckpt-select watch``)."""

    follower: RunFollower
    config: RecommendConfig | None = None   # default: the recommend command's defaults
    last_step: int | None = None     # the newest step seen by the last poll
    _shown: tuple | None = field(default=None, init=False)
    _spikes: set = field(default_factory=set, init=False)

    def poll(self) -> dict | None:
        """Refresh the run; the event (a JSON-ready dict) if the recommendation changed or a spike is new, else None.

        A run without a checkpoint or log yet, or too few checkpoints to recommend from, gives None.
        """
        from .selection import RecommendConfig, recommend
        from .signals import assess_run
        try:
            update = self.follower.refresh()
        except RunNotFound:
            return None   # nothing written yet
        self.last_step = update.last_step
        if not update.changed and self._shown is not None:
            return None
        signals = assess_run(update.run)
        try:
            rec = recommend(signals, self.config or RecommendConfig())
        except AnalysisError:
            return None
        return self._event(update, signals, rec)

    def _event(self, update: RunUpdate, signals, rec) -> dict | None:
        """The event for ``rec``, or None when it repeats the last one shown and no spike is new."""
        new_spikes = [s for s in signals.spikes if (s.metric, s.start_step) not in self._spikes]
        self._spikes |= {(s.metric, s.start_step) for s in signals.spikes}
        shown = (tuple(r.step for r in rec.checkpoints), tuple(round(w, 6) for w in rec.weights))
        if shown == self._shown and not new_spikes:
            return None
        self._shown = shown
        measured = rec.last_score - rec.score if rec.score is not None and rec.last_score is not None else None
        return {
            "step": update.last_step, "method": rec.method, "summary": rec.summary,
            "checkpoints": [{"step": r.step, "path": str(r.path), "weight": w} for r, w in zip(rec.checkpoints, rec.weights)],
            "predicted_gain_nats": _finite(rec.predicted_gain), "measured_gain_nats": _finite(measured),
            "new_spikes": [{"metric": s.metric, "start_step": s.start_step, "end_step": s.end_step,
                            "ratio": _finite(s.ratio), "describe": s.describe()} for s in new_spikes],
            "being_written": [str(u.path) for u in update.being_written],
        }


def _finite(value: float | None) -> float | None:
    """``value`` if a finite number, else None (JSON has no NaN)."""
    return float(value) if value is not None and np.isfinite(value) else None


def describe_event(event: dict) -> str:
    """One line for a watch event: the step, the chosen checkpoints and weights, the gain, new spikes."""
    chosen = ", ".join(f"{c['step']} x{c['weight']:.3f}" for c in event["checkpoints"])
    gain = event["measured_gain_nats"] if event["measured_gain_nats"] is not None else event["predicted_gain_nats"]
    kind = "measured" if event["measured_gain_nats"] is not None else "predicted"
    line = f"step {event['step']}: average {chosen} ({event['method']})"
    line += f"; {kind} gain {gain:.4f} nats" if gain is not None else ""
    line += "".join(f"; new {s['describe']}" for s in event["new_spikes"])
    return line + (f"; being written: {len(event['being_written'])}" if event["being_written"] else "")


def idle_seconds(path: str | Path) -> float:
    """Seconds since any file of the run folder was modified (stat only): a run idle past IDLE_SECONDS is finished."""
    import time
    if is_remote(path):   # an object's LastModified, from one listing of the prefix (issue 22)
        objects = RemotePath(str(path)).relist()
        return max(time.time() - max((_modified(v) for v in objects.values()), default=0.0), 0.0)
    root = Path(path).expanduser().resolve()
    newest = root.stat().st_mtime if root.exists() else 0.0
    for dirpath, dirnames, filenames in os.walk(root) if root.is_dir() else ():
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue
    return max(time.time() - newest, 0.0)


def _modified(entry: dict) -> float:
    """An object listing entry's modification time, in seconds since the epoch."""
    value = entry.get("LastModified") or entry.get("mtime") or entry.get("created") or 0
    return float(value.timestamp()) if hasattr(value, "timestamp") else float(value)


def log_rows(run: Run) -> int:
    """Log records the run holds, over all its logs."""
    return sum(t.rows for t in run.logs)


def _run_from_parts(root: Path, name: str, refs: list[CheckpointRef], merged: list[Path], tables: list,
                  parts: list[dict[str, MetricPart]], notes: list[str], unreadable: list[UnreadableFile]) -> Run:
    """The :class:`Run`, its metrics merged per metric (as ``open_run`` merges them, without pandas' sort)."""
    if not refs and not tables:
        raise RunNotFound(root, "found no checkpoints and no training logs here (yet)"
                          + ("; " + "; ".join(u.describe() for u in unreadable) if unreadable else ""))
    merged_parts = _merge_parts(parts)
    from .logs.builder import tidy_frame
    run = assemble_run(root, name, refs, merged, tables, tidy_frame(merged_parts), notes, unreadable)
    run._memo["metrics"] = _metric_frames(merged_parts)   # what Run.metric would split out of the frame
    return run


def _merge_parts(parts: list[dict[str, MetricPart]]) -> dict[str, MetricPart]:
    """Every log's rows per metric, names sorted, steps sorted; the first log wins a (step, metric) two give."""
    merged = {}
    for name in sorted({n for p in parts for n in p}):
        chunks = [p[name] for p in parts if name in p]
        steps, values, walls = (c[0] if len(chunks) == 1 else np.concatenate(c) for c in zip(*chunks))
        if len(chunks) > 1:
            _, order = np.unique(steps, return_index=True)   # sorted steps, first occurrence of each
        elif len(steps) > 1 and not np.all(steps[1:] > steps[:-1]):
            order = np.argsort(steps, kind="stable")
        else:
            order = None
        merged[name] = (steps, values, walls) if order is None else (steps[order], values[order], walls[order])
    return merged


def _metric_frames(parts: dict[str, MetricPart]) -> dict:
    """``{name: DataFrame(step, value, wall_time)}`` as ``split_by_metric`` gives for the merged frame."""
    import pandas as pd
    return {name: pd.DataFrame({"step": s, "value": v, "wall_time": w}, copy=False) for name, (s, v, w) in parts.items()}


def _look(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _checkpoint_look(path: Path) -> tuple:
    """(name, size, mtime_ns) of a checkpoint file, or of every file directly in a checkpoint folder."""
    try:
        if not path.is_dir():
            return (_look(path),)
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file()))
    except OSError:
        return ("missing",)


__all__ = ["IDLE_SECONDS", "RunFollower", "RunUpdate", "Watcher", "describe_event", "idle_seconds", "log_rows"]
