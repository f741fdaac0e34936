"""The entry point ``main``: runs the click group and maps errors to exit codes.

Exit codes: 0 success, 2 bad input (one line naming the file and the problem),
1 internal error (a bug: the traceback is printed).
"""

from __future__ import annotations

import logging
import traceback
import warnings
from contextlib import contextmanager
from typing import Iterator

import click

from ..errors import AnalysisError
from .group import _OPTIONS, cli


def main(argv: list[str] | None = None) -> int:
    """Entry point: map AnalysisError to exit 2 with a one-line message (and its cause with ``--verbose``).

    Library warnings are silenced for the command unless ``--verbose`` (see ``_quiet_libraries``);
    the process's warning filters and logging are as they were when this returns.
    """
    _OPTIONS["verbose"] = False
    with warnings.catch_warnings(), _logging_restored():
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    from ..remote import all_stats
    _OPTIONS["io_before"] = all_stats()   # --json reports this command's remote I/O, not the process's
    try:
        cli.main(args=argv, prog_name="ckpt-select", standalone_mode=False)
    except AnalysisError as e:
        click.echo(f"ckpt-select: error: {_one_line(str(e))}", err=True)
        if _OPTIONS["verbose"]:
            _echo_cause(e)
        return 2
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return 2
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@contextmanager
def _logging_restored() -> Iterator[None]:
    """Restores ``logging.disable``'s level on exit (``_quiet_libraries`` raises it for one command)."""
    level = logging.root.manager.disable
    try:
        yield
    finally:
        logging.disable(level)


def _one_line(message: str) -> str:
    """An error message on one line, whatever a library put in it: stderr carries one line per error."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _echo_cause(error: BaseException) -> None:
    """``--verbose``: the error's cause (or the context it was raised from) with its traceback."""
    cause = error.__cause__ or error.__context__
    if cause is not None:
        click.echo("caused by:", err=True)
        click.echo("".join(traceback.format_exception(cause)).rstrip(), err=True)
