"""Which runs a folder holds: checkpoints and logs grouped into runs, never averaged across runs (issue 21).

A folder can hold several runs: Lightning's ``lightning_logs/version_N`` (one per launch), sibling
Hugging Face output folders each with its ``checkpoint-N/`` folders, a relaunch with another seed.
Read as one run, their checkpoints mix (duplicate steps, one run's val loss given to the other's
checkpoints) and a recommendation averages across runs. The rules, in order:

1. Folder convention: every ``version_N`` folder is a run, and so is every folder below the opened
   one that holds ``checkpoint-N/`` folders; files outside them form a run of their own.
2. A resumed run stays one run: a group whose log starts past step 0, whose checkpoints all come
   after the previous group's, and whose first checkpoint lies as near the previous one's last as
   the runs' own saves lie to each other (Lightning's relaunch with ``ckpt_path=`` writes ``version_1``).
3. Inside one group: checkpoints with the same step are told apart by their name with the step left
   out (``seed1_step*`` vs ``seed2_step*``); a log that starts over at its first step is a second run.
4. Inside one run's step order: two consecutive checkpoints whose weights lie further apart than the
   neighbouring saves explain (:func:`trajectory_jumps`, on the sketches the assessment reads anyway)
   split it: the checkpoints before the jump are another run, never averaged with those after it.

This module decides from paths, steps and small weight samples; ``analysis.run`` reads the files.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .checkpoints import detect_layout, open_checkpoint
from .errors import AnalysisError, InvalidArgument, SeveralRuns

if TYPE_CHECKING:
    from .logs import LogTable

_VERSION_DIR = re.compile(r"version_\d+")
_HF_STEP_DIR = re.compile(r"checkpoint-\d+")
# Two checkpoints further apart than this many times the runs' typical save-to-save distance
# are not one trajectory: no training step explains the jump (different seeds land ~10-100x apart).
JUMP_FACTOR = 4.0
# Values sampled per checkpoint for the jump test: headers plus a few small matrices, never the model.
SAMPLE_VALUES = 4096
SAMPLE_MAX_ELEMENTS = 4_000_000


@dataclass(frozen=True, slots=True)
class RunFiles:
    """One run's files as discovery grouped them (before anything is read)."""

    name: str                       # what ``--run NAME`` takes
    path: Path                      # the run's own folder: open it to open this run alone
    checkpoints: tuple[Path, ...]
    logs: tuple[Path, ...]
    reason: str                     # how it was told apart from the others


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run of a folder, as the CLI's refusal and the app's run choice show it."""

    name: str
    path: Path
    checkpoints: tuple[Path, ...]
    steps: tuple[int, ...]          # the checkpoints' steps, sorted
    logs: tuple[Path, ...]
    reason: str

    def describe(self, base: Path | None = None) -> str:
        """One clause: name, folder, checkpoints and steps, logs."""
        steps = f"steps {self.steps[0]}-{self.steps[-1]}" if self.steps else "no steps"
        logs = ", ".join(_shown(p, base) for p in self.logs) or "no log"
        where = f"{_shown(self.path, base)}: " if self.path != base else ""
        return f"'{self.name}' ({where}{len(self.checkpoints)} checkpoints, {steps}; logs: {logs})"


def _shown(path: Path, base: Path | None) -> str:
    return str(path.relative_to(base)) if base is not None and path.is_relative_to(base) and path != base else str(path)


def group_by_folder(root: Path, checkpoints: Sequence[Path], logs: Sequence[Path]) -> list[RunFiles]:
    """Rule 1: the runs the folder layout names (one group when it names fewer than two)."""
    claimed = set(checkpoints)
    holders = {c.parent for c in checkpoints if _HF_STEP_DIR.fullmatch(c.name)}
    holders |= {c.parent.parent for c in checkpoints if _HF_STEP_DIR.fullmatch(c.parent.name)}
    keyed: dict[Path | None, tuple[list[Path], list[Path]]] = defaultdict(lambda: ([], []))
    for path in checkpoints:
        keyed[_run_folder(root, path, claimed, holders)][0].append(path)
    for path in logs:
        keyed[_run_folder(root, path, claimed, holders)][1].append(path)
    folders = sorted((k for k in keyed if k is not None), key=_natural)
    if len(folders) < 2:
        return [RunFiles(root.name, root, tuple(checkpoints), tuple(logs), "the whole folder")]
    groups = [RunFiles(f.name, f, tuple(keyed[f][0]), tuple(keyed[f][1]), _why(f)) for f in folders]
    rest_ckpts, rest_logs = keyed.get(None, ([], []))
    if rest_ckpts:   # a log alone beside several runs belongs to none of them
        groups.append(RunFiles(root.name, root, tuple(rest_ckpts), tuple(rest_logs), "files outside the runs' folders"))
    return groups


def _run_folder(root: Path, path: Path, claimed: set[Path], holders: set[Path]) -> Path | None:
    """The folder below ``root`` that makes ``path``'s run by convention, or None.

    ``claimed``: every checkpoint path; ``holders``: the folders that hold ``checkpoint-N/`` folders.
    """
    relative = path.relative_to(root).parts if path.is_relative_to(root) else ()
    for depth in range(len(relative) - 1, 0, -1):
        if _VERSION_DIR.fullmatch(relative[depth - 1]):
            return root.joinpath(*relative[:depth])
    holder = path.parent if _HF_STEP_DIR.fullmatch(path.parent.name) else path
    if _HF_STEP_DIR.fullmatch(holder.name) or holder in claimed or holder.is_file():
        holder = holder.parent
    return holder if holder != root and holder in holders else None


def _why(folder: Path) -> str:
    return "a Lightning version folder" if _VERSION_DIR.fullmatch(folder.name) else "its own checkpoint-N folders"


def _natural(path: Path) -> list:
    """version_2 before version_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def join_resumed(groups: list[RunFiles], step_of: Callable[[Path], int | None],
                 first_logged_step: Callable[[Path], int | None]) -> list[RunFiles]:
    """Rule 2: a group that continues the one before it (a resume) joins it."""
    if len(groups) < 2:
        return groups
    joined = [groups[0]]
    for group in groups[1:]:
        if _continues(joined[-1], group, step_of, first_logged_step):
            before = joined[-1]
            joined[-1] = replace(before, path=_common_parent(before.path, group.path),
                                 checkpoints=before.checkpoints + group.checkpoints, logs=before.logs + group.logs,
                                 reason=f"{before.reason}, resumed in {group.name}")
        else:
            joined.append(group)
    return joined


def _common_parent(a: Path, b: Path) -> Path:
    if not isinstance(a, Path):   # a URL (issue 22): the nearest prefix holding both
        return next(p for p in (a, *a.parents) if b == p or b.is_relative_to(p))
    parts = []
    for x, y in zip(a.parts, b.parts):
        if x != y:
            break
        parts.append(x)
    return Path(*parts)


def _continues(before: RunFiles, after: RunFiles, step_of: Callable[[Path], int | None],
               first_logged_step: Callable[[Path], int | None]) -> bool:
    """True when ``after`` resumes ``before``: starts late, saves later, and lies on the same trajectory."""
    old = _by_step(before.checkpoints, step_of)
    new = _by_step(after.checkpoints, step_of)
    if not old or not new or new[0][0] <= old[-1][0]:
        return False
    starts = [s for s in (first_logged_step(p) for p in after.logs) if s is not None]
    if starts and min(starts) == 0:
        return False
    return not weight_jump([p for _, p in old[-2:]], [p for _, p in new[:2]])


def _by_step(paths: Sequence[Path], step_of: Callable[[Path], int | None]) -> list[tuple[int, Path]]:
    numbered = [(step_of(p), p) for p in paths]
    return sorted((s, p) for s, p in numbered if s is not None)


def weight_jump(older: Sequence[Path], newer: Sequence[Path]) -> bool:
    """True when ``newer[0]`` lies further from ``older[-1]`` than saves of one run lie from each other.

    Reads a few small matrices of each checkpoint (never the model). The typical distance is the larger
    of the save-to-save distances inside ``older`` and inside ``newer``; with neither known, no verdict (False).
    """
    samples = [_sample(p) for p in (*older, *newer)]
    if any(s is None for s in samples) or len({s.shape for s in samples}) != 1:
        return len({s.shape for s in samples if s is not None}) > 1   # other shapes: another model
    old, new = samples[:len(older)], samples[len(older):]
    typical = [float(np.linalg.norm(b - a)) for part in (old, new) for a, b in zip(part, part[1:])]
    if not typical:
        return False
    return float(np.linalg.norm(new[0] - old[-1])) > JUMP_FACTOR * max(max(typical), 1e-12)


def _sample(path: Path) -> np.ndarray | None:
    """A fixed sample of a checkpoint's values: the smallest matrices, strided; None when unreadable."""
    layout = detect_layout(path)
    if layout is None:
        return None
    try:
        with open_checkpoint(path, layout) as handle:
            infos = sorted((t for t in handle.tensors() if t.is_floating and len(t.shape) >= 2),
                           key=lambda t: (t.numel, t.name))
            chosen, total = [], 0
            for info in infos:
                if total + info.numel > SAMPLE_MAX_ELEMENTS and chosen:
                    break
                chosen.append(info)
                total += info.numel
            values = [handle.read(t.name).float().flatten().numpy() for t in chosen[:4]]
    except (AnalysisError, OSError):
        return None
    if not values:
        return None
    flat = np.concatenate(values)
    return flat[:: max(1, len(flat) // SAMPLE_VALUES)][:SAMPLE_VALUES].astype(np.float64)


def choose(root: Path, runs: list[RunInfo], name: str | None) -> RunInfo:
    """The run to open: the only one, or the one named; several and none named: :class:`SeveralRuns`."""
    if name is not None:
        for run in runs:
            if run.name == name:
                return run
        raise InvalidArgument(f"{root}: no run named '{name}' here; runs: {', '.join(repr(r.name) for r in runs)}")
    if len(runs) > 1:
        raise SeveralRuns(root, runs)
    return runs[0]


def split_by_name(root: Path, base: RunInfo, steps: Sequence[int], paths: Sequence[Path]) -> list[RunInfo] | None:
    """Rule 3 for checkpoints: runs told apart by name when steps repeat; None when they cannot be.

    Returns [base] when no step repeats.
    """
    if len(set(steps)) == len(steps):
        return [base]
    by_template: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for step, path in zip(steps, paths):
        by_template[_template(root, path, step)].append((step, path))
    if len(by_template) < 2 or any(len({s for s, _ in v}) != len(v) for v in by_template.values()):
        return None
    return [RunInfo(template, root, tuple(p for _, p in sorted(v)), tuple(sorted(s for s, _ in v)), (),
                    "checkpoints named alike, with steps that repeat in the other runs")
            for template, v in sorted(by_template.items())]


def _template(root: Path, path: Path, step: int) -> str:
    """The checkpoint's path below ``root`` with its step (and Lightning's epoch) left out."""
    text = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    text = re.sub(r"epoch=\d+", "epoch=*", text)
    head, found, tail = text.rpartition(str(step))
    return f"{head}*{tail}" if found else text


def starts_over(table: LogTable) -> bool:
    """Rule 3 for logs: a segment after the first begins at or before the log's first step.

    A resume restarts at its last checkpoint (past the start) and is one run; a log that starts
    over from its first step again holds another launch.
    """
    segments = table.segments
    return len(segments) > 1 and any(first <= segments[0][0] for first, _ in segments[1:])


# Rule 4 (issue 21): a weight-space jump inside one run's step order, no training step explains: a relaunch into
# the same folder with a new init. Two conditions, both measured (benchmarks/trajectory_jumps.py, docs/field-runs.md):
# 1. the save-to-save distance is over TRAJECTORY_JUMP_FACTOR times what its neighbours' distances explain
#    (scaled up to its step gap): on six real runs the largest ratio of a genuine interval is 1.57 (early
#    training), a fresh init at step 501 stands at 29;
# 2. the two checkpoints are unrelated: cos(θ_before, θ_after) under NEW_INIT_COSINE. Consecutive saves of one
#    run lie at 0.93 or more on the same runs; the fresh init at 0.02. A weight spike (one layer's update 20x, an
#    outlier weight) can pass 1 but keeps the weights it hit (cosine near 1): a layer flag (issue 25), not a run.
TRAJECTORY_JUMP_FACTOR = 4.0
NEW_INIT_COSINE = 0.6


@dataclass(frozen=True, slots=True)
class TrajectoryJump:
    """Two checkpoints consecutive by step whose weights lie further apart than training moves them."""

    before_step: int
    after_step: int
    distance: float     # |θ_after − θ_before|
    explained: float    # the most its neighbouring save-to-save distances explain over this step gap
    cosine: float | None = None   # cos(θ_before, θ_after)

    @property
    def ratio(self) -> float:
        return self.distance / self.explained

    def describe(self) -> str:
        """Why the checkpoints up to ``before_step`` are another run: one clause for reasons."""
        cosine = f", cosine {self.cosine:.2f}" if self.cosine is not None else ""
        return (f"it belongs to another run: the weights jump {self.ratio:.1f}x further from step {self.before_step} "
                f"to step {self.after_step} than the neighbouring saves move (|Δθ| {self.distance:.4g} against "
                f"{self.explained:.4g}{cosine}), which no training step explains (a relaunch into the same folder "
                f"with a new init?); never averaged with the checkpoints from step {self.after_step} on")


def trajectory_jumps(steps: Sequence[int], distances: Sequence[float | None],
                     cosines: Sequence[float | None] | None = None, factor: float = TRAJECTORY_JUMP_FACTOR,
                     max_cosine: float = NEW_INIT_COSINE) -> list[TrajectoryJump]:
    """Rule 4: the intervals whose distance exceeds ``factor`` x what their neighbours explain, between
    checkpoints whose cosine is under ``max_cosine`` (unknown cosines: the distance decides alone).

    Args:
        steps: the checkpoints' steps, sorted; distances: ``distances[i]`` is |θ_(i+1) − θ_i| (None: unknown,
            e.g. the tensors differ); cosines: ``cosines[i]`` is cos(θ_i, θ_(i+1)).

    Each interval is judged against the one before and the one after it: a neighbour's distance, scaled
    up by the ratio of the step gaps where this interval is longer (distance grows at most linearly with
    steps), is what training explains; the larger neighbour counts. An interval with no known neighbour
    (two checkpoints) gets no verdict.
    """
    jumps = []
    for i, distance in enumerate(distances):
        explained = [_scaled(distances[j], steps, i, j) for j in (i - 1, i + 1) if 0 <= j < len(distances)]
        explained = [e for e in explained if e is not None]
        cosine = cosines[i] if cosines is not None else None
        if distance is None or not explained or (cosine is not None and cosine >= max_cosine):
            continue
        typical = max(max(explained), 1e-12)
        if distance > factor * typical:
            jumps.append(TrajectoryJump(steps[i], steps[i + 1], float(distance), float(typical), cosine))
    return jumps


def _scaled(distance: float | None, steps: Sequence[int], i: int, j: int) -> float | None:
    """Neighbour ``j``'s distance scaled to interval ``i``'s step gap (never scaled down)."""
    if distance is None:
        return None
    gap_i, gap_j = steps[i + 1] - steps[i], steps[j + 1] - steps[j]
    return distance * max(1.0, gap_i / gap_j) if gap_j > 0 else distance
