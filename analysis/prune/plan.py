"""Which checkpoints a prune keeps and which it deletes, each with its reasons, before anything moves.

Kept, whatever the policy: the newest checkpoint (training resumes from it), a checkpoint modified in
the last minute or being written, one a recipe in the run names, one that lies outside the run folder,
a checkpoint folder holding a merged output or a recipe, and every file that could not be read. Then
the policy's terms, in the order written; under a byte budget that order is the priority, and a
checkpoint that does not fit is deleted with the term it was wanted for named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoints import open_checkpoint, optimizer_state
from ..errors import AnalysisError, InvalidArgument
from ..paths import is_within
from ..storage import human_bytes
from .guards import disk_bytes, move_units, recently_changed, recipe_references, stamp
from .policy import KeepTerm, PrunePolicy

if TYPE_CHECKING:
    from ..run import CheckpointRef, Run
    from ..selection import Recommendation


@dataclass(frozen=True, slots=True)
class PruneItem:
    """One checkpoint of the run and its fate: kept (with what it is for) or deleted (and why)."""

    path: Path                       # the checkpoint: a file, an index file or a folder
    step: int | None
    status: str                      # "checkpoint" | "being written" | "unreadable"
    moves: tuple[Path, ...]          # what a prune moves to the trash (empty for files it never touches)
    size_bytes: int                  # bytes on disk of everything under ``moves`` (or of the file)
    keep: bool
    reasons: tuple[str, ...]
    stamp: tuple = ()                # (file, size, mtime) at plan time: a changed checkpoint is not moved


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """A prune, planned on the run's real files: nothing has moved yet."""

    run_path: Path
    policy: PrunePolicy
    items: tuple[PruneItem, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def kept(self) -> tuple[PruneItem, ...]:
        return tuple(i for i in self.items if i.keep)

    @property
    def deleted(self) -> tuple[PruneItem, ...]:
        return tuple(i for i in self.items if not i.keep)

    @property
    def bytes_now(self) -> int:
        """Bytes of the run's checkpoints (and files being written) today."""
        return sum(i.size_bytes for i in self.items)

    @property
    def bytes_freed(self) -> int:
        return sum(i.size_bytes for i in self.deleted)

    @property
    def bytes_after(self) -> int:
        return self.bytes_now - self.bytes_freed

    def summary(self) -> str:
        """One line: how many kept and deleted, the bytes before, after and freed."""
        return (f"keep {len(self.kept)} of {len(self.items)} checkpoints ({human_bytes(self.bytes_after)}), "
                f"delete {len(self.deleted)}, freeing {human_bytes(self.bytes_freed)} of {human_bytes(self.bytes_now)}")


# A wish to keep one checkpoint: (term position in the policy, rank within the term, reason).
_Want = tuple[int, int, str]


def plan_prune(run: Run, policy: PrunePolicy, recommendation: Recommendation | None = None, *,
               root: Path | None = None) -> PrunePlan:
    """Plan a prune of ``run`` under ``policy``: every checkpoint kept or deleted, with its reasons.

    Args:
        run: the open run (its checkpoints, unreadable files and merged outputs).
        policy: from :func:`analysis.prune.parse_policy`.
        recommendation: the run's current recommendation; needed by the ``window`` term.
        root: the app's ``--root``: a recipe beside the run is read only within it (None: no limit).

    Raises:
        InvalidArgument: a ``window`` term without a recommendation.
        AnalysisError: a file in the run that says it is a recipe cannot be parsed.
    """
    if policy.has("window") and recommendation is None:
        raise InvalidArgument("--keep window needs the run's recommendation")
    refs = list(run.checkpoints)
    units = [move_units(ref) for ref in refs]
    sizes = [disk_bytes(u) for u in units]
    notes: list[str] = []
    musts = _safety_reasons(run, refs, units, recipe_references(run.path, root))
    wants = _policy_wants(refs, policy, recommendation, notes)
    keep, dropped = _fit(musts, wants, sizes, policy.budget_bytes, notes)
    items = [_item(ref, u, size, i in keep, musts.get(i, []) + keep.get(i, []) or dropped.get(i, []), policy)
             for i, (ref, u, size) in enumerate(zip(refs, units, sizes))]
    items += _untouched(run)
    return PrunePlan(run.path, policy, tuple(items), tuple(notes))


def _item(ref: CheckpointRef, units: tuple[Path, ...], size: int, keep: bool, reasons: list[str],
          policy: PrunePolicy) -> PruneItem:
    if not reasons:
        reasons = [f"not needed by --keep {policy.text}"]
    return PruneItem(ref.path, ref.step, "checkpoint", units, size, keep, tuple(reasons), stamp(units))


def _untouched(run: Run) -> list[PruneItem]:
    """Checkpoints the run could not read: never moved (a save in progress, or a file to look at by hand)."""
    why = {True: "being written: never touched until it is complete",
           False: "unreadable: prune moves only checkpoints it can read"}
    return [PruneItem(u.path, u.step, u.status, (), disk_bytes((u.path,)), True, (why[u.being_written],))
            for u in run.unreadable if u.kind == "checkpoint"]


def _safety_reasons(run: Run, refs: list[CheckpointRef], units: list[tuple[Path, ...]],
                    recipes: dict[Path, list[Path]]) -> dict[int, list[str]]:
    """Index -> why a checkpoint is never deleted, whatever the policy and the budget."""
    musts: dict[int, list[str]] = {}
    for i, (ref, unit) in enumerate(zip(refs, units)):
        reasons = [reason for reason in (
            "newest checkpoint: never deleted (training resumes from it)" if i == len(refs) - 1 else None,
            recently_changed(unit),
            _named_by(run.path, ref, unit, recipes),
            None if all(is_within(u, run.path) for u in unit) else
            "resolves outside the run folder: prune moves only the run's own files",
            _holds_others(run, ref, recipes),
        ) if reason]
        if reasons:
            musts[i] = reasons
    return musts


def _named_by(root: Path, ref: CheckpointRef, unit: tuple[Path, ...], recipes: dict[Path, list[Path]]) -> str | None:
    """"named by recipe X" when a recipe in the run names this checkpoint (its path or one of its files)."""
    names = {p.resolve() for p in (ref.path, *ref.files, *unit)}
    found = sorted({r for p in names for r in recipes.get(p, [])})
    if not found:
        return None
    shown = ", ".join(str(r.relative_to(root)) if r.is_relative_to(root) else str(r) for r in found)
    return f"named by the recipe {shown}: never deleted while a recipe needs it"


def _holds_others(run: Run, ref: CheckpointRef, recipes: dict[Path, list[Path]]) -> str | None:
    """A checkpoint folder that holds a merged output or a recipe: moving it would move them too."""
    if not ref.path.is_dir():
        return None
    inside = [p for p in (*run.merged_outputs, *(r for rs in recipes.values() for r in rs)) if p.is_relative_to(ref.path)]
    return f"its folder holds {inside[0].name}, which prune never moves" if inside else None


def _policy_wants(refs: list[CheckpointRef], policy: PrunePolicy, rec: Recommendation | None,
                  notes: list[str]) -> dict[int, list[_Want]]:
    """Index -> the policy terms that want it kept, with their position, rank and reason."""
    wants: dict[int, list[_Want]] = {}
    for order, term in enumerate(policy.terms):
        picks = {"window": _window, "newest": _newest, "every": _every, "optimizer": _optimizer}[term.kind]
        for rank, (i, reason) in enumerate(picks(refs, term, rec, notes)):
            wants.setdefault(i, []).append((order, rank, f"{term.label}: {reason}"))
    return wants


def _window(refs: list[CheckpointRef], term: KeepTerm, rec: Recommendation, notes: list[str]) -> list[tuple[int, str]]:
    """The recommended checkpoints (heaviest first), the rest of their span, then the margin, nearest first."""
    index = {ref.path: i for i, ref in enumerate(refs)}
    taken = [(index[c.path], w) for c, w in zip(rec.checkpoints, rec.weights) if c.path in index]
    if len(taken) < len(rec.checkpoints):
        notes.append("the recommendation names checkpoints the run no longer has: open the run again")
    if not taken:
        notes.append("the recommendation averages no checkpoint: the window term keeps nothing")
        return []
    picks = [(i, f"averaged by the recommendation (weight {w:.3f})") for i, w in sorted(taken, key=lambda t: -t[1])]
    lo, hi = min(i for i, _ in taken), max(i for i, _ in taken)
    chosen = {i for i, _ in taken}
    picks += [(i, f"inside the recommended window (steps {refs[lo].step}-{refs[hi].step})")
              for i in range(hi, lo - 1, -1) if i not in chosen]
    for k in range(1, term.n + 1):
        picks += [(i, f"margin {k} of {term.n} around the recommended window") for i in (lo - k, hi + k)
                  if 0 <= i < len(refs)]
    return picks


def _newest(refs: list[CheckpointRef], term: KeepTerm, rec: object, notes: list[str]) -> list[tuple[int, str]]:
    count = min(term.n, len(refs))
    return [(len(refs) - 1 - k, f"one of the newest {term.n}") for k in range(count)]


def _every(refs: list[CheckpointRef], term: KeepTerm, rec: object, notes: list[str]) -> list[tuple[int, str]]:
    picks = [(i, f"milestone, step {ref.step} is a multiple of {term.n}")
             for i, ref in reversed(list(enumerate(refs))) if ref.step % term.n == 0]
    if not picks:
        notes.append(f"every:{term.n}: no checkpoint's step is a multiple of {term.n}")
    return picks


def _optimizer(refs: list[CheckpointRef], term: KeepTerm, rec: object, notes: list[str]) -> list[tuple[int, str]]:
    """The newest ``n`` checkpoints holding optimizer state (headers only; newest first, stops when found)."""
    picks = []
    for i in range(len(refs) - 1, -1, -1):
        if len(picks) == term.n:
            break
        if _holds_optimizer(refs[i]):
            which = "the newest" if term.n == 1 else f"one of the {term.n} newest"
            picks.append((i, f"{which} with optimizer state, to resume training"))
    if not picks:
        notes.append("optimizer: no checkpoint of the run holds optimizer state")
    return picks


def _holds_optimizer(ref: CheckpointRef) -> bool:
    try:
        with open_checkpoint(ref.path, ref.layout) as handle:
            return bool(optimizer_state(handle))
    except AnalysisError:
        return False


def _fit(musts: dict[int, list[str]], wants: dict[int, list[_Want]], sizes: list[int], budget: int | None,
         notes: list[str]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(kept index -> policy reasons, deleted index -> why) : every wish, or under a budget the first that fit.

    Wishes are granted in the policy's order (term position, then rank within the term); the
    never-deleted checkpoints are paid for first.
    """
    keep: dict[int, list[str]] = {i: [] for i in musts}
    if budget is None:
        keep.update({i: [r for _, _, r in sorted(ws)] for i, ws in wants.items()})
        return keep, {}
    used = sum(sizes[i] for i in musts)
    if used > budget:
        notes.append(f"the checkpoints never deleted already take {human_bytes(used)}, over the "
                     f"{human_bytes(budget)} budget")
    dropped: dict[int, list[str]] = {}
    for order, rank, i, reason in sorted((o, r, i, why) for i, ws in wants.items() for o, r, why in ws):
        if i in keep:
            keep[i].append(reason)
        elif used + sizes[i] <= budget:
            keep[i], used = [reason], used + sizes[i]
            dropped.pop(i, None)
        else:
            dropped.setdefault(i, []).append(f"{reason}, but over the {human_bytes(budget)} budget")
    return keep, dropped

