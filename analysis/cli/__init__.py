"""Command line: parse, call the core, print. ``python -m analysis --help``.

Exit codes: 0 success, 2 bad input (one line naming the file and the problem),
1 internal error (a bug: the traceback is printed).

One module per group of commands, each registering on the one click group (:mod:`.group`):
:mod:`.run_commands` (analyze, watch, recommend, stop, logs), :mod:`.merge_commands` (merge, export),
:mod:`.storage_commands` (storage, prune), :mod:`.app_command` (ui); shared option types in
:mod:`.options`, printing helpers in :mod:`.output`, and :func:`main` in :mod:`.entry_point`.

At load the command modules import only click, the errors and the storage and scaling defaults; the rest
of the core is imported inside the command that needs it: a merge must not pay for pandas,
scikit-learn and SciPy (about 1 s), which only the analysis commands use (issue 6).
"""

from . import app_command, merge_commands, run_commands, storage_commands  # noqa: F401  (register the commands)
from .entry_point import main
from .group import cli

__all__ = ["cli", "main"]
