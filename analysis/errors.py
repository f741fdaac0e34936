"""Typed errors. ``str(e)`` is shown to the user as-is: what failed, where, what to do.

The CLI maps every :class:`AnalysisError` to exit code 2 with a one-line message;
anything else is a bug and exits 1 with a traceback.
"""

from __future__ import annotations

from pathlib import Path


class AnalysisError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class RunNotFound(AnalysisError):
    """The run path does not exist or holds nothing CkptSelect can read."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


class LogParseError(AnalysisError):
    """A log file could not be read at all (a bad line is skipped, not raised)."""

    def __init__(self, path: Path, line_no: int | None, reason: str) -> None:
        where = f"{path}, line {line_no}" if line_no else str(path)
        super().__init__(f"Could not read {where}: {reason}")
        self.path, self.line_no, self.reason = path, line_no, reason


class UnknownLogFormat(AnalysisError):
    """No registered log reader recognised the file."""

    def __init__(self, path: Path, tried: list[str]) -> None:
        super().__init__(
            f"{path}: not a log format CkptSelect knows (tried: {', '.join(tried)}). "
            "Hint: pass --format NAME, or add the file to ckpt-select.yaml."
        )
        self.path, self.tried = path, tried


class CheckpointReadError(AnalysisError):
    """A checkpoint file is unreadable, truncated, unsafe or of an unknown layout."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"Could not read checkpoint {path}: {reason}")
        self.path, self.reason = path, reason


class NotACheckpoint(CheckpointReadError):
    """A file read safely and completely that holds no model weights (a saved tensor, a dataset, a tokenizer).

    Run discovery passes such a file over with a note instead of failing the whole run: a stray
    ``data.pt`` next to the checkpoints is not bad input. Asked for directly, it is still an error.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, reason)
        self.reason = reason


class CheckpointMismatch(AnalysisError):
    """Checkpoints that should share keys and shapes do not (names every difference)."""


class NotEnoughCheckpoints(AnalysisError):
    """An operation needs more checkpoints than the run or selection holds."""


class MergeError(AnalysisError):
    """A merge cannot start or complete (target exists, disk full, bad weights)."""


class OutputError(AnalysisError):
    """CkptSelect will not or cannot write where it was asked (issue 19).

    Either the target holds something it did not write (a checkpoint, another run's files, a
    file that is not one of its recipes) or the storage refuses the write (read-only, no
    permission, full). The message names the path and the problem on one line.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


class RecipeError(AnalysisError):
    """A recipe file is malformed or does not match the checkpoints it names."""

    def __init__(self, path: Path | None, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path


class EvaluatorError(AnalysisError):
    """The user's evaluator could not be loaded or did not return a finite number."""


class InvalidArgument(AnalysisError):
    """A parameter given on the command line or in the UI is out of range."""


class ModelConfigError(AnalysisError):
    """A config.json lacks a field the parameter count needs, or is not a config at all."""

    def __init__(self, path: Path | None, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path


class FitError(AnalysisError):
    """The loss curve has too few usable points, or the power law does not fit it."""


class SeveralRuns(AnalysisError):
    """A folder holds several runs: analysing them as one would average across runs (issue 21).

    Names each run found (name, folder, checkpoints, steps, logs) and how to pick one.
    """

    def __init__(self, path: Path, runs: list, reason: str = "", message: str | None = None) -> None:
        if message is None:
            listed = "; ".join(r.describe(path) for r in runs)
            example = next((r for r in runs[1:] if r.path != path), None) or runs[-1]
            by_path = f"give its folder (e.g. {example.path}) or " if example.path != path else ""
            message = (f"{path}: holds {len(runs)} runs{reason}: {listed}. They are never averaged together: "
                       f"pick one: {by_path}--run NAME (e.g. --run '{example.name}').")
        super().__init__(message)
        self.path, self.runs = path, runs

class RemoteError(AnalysisError):
    """Object storage refused or failed a request for good: missing, forbidden, truncated, or out of retries."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


class ExecutorError(AnalysisError):
    """The cluster could not be reached, or a work unit failed on it after its retries (issue 22)."""
