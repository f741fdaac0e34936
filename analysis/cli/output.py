"""What the commands print besides their own lines: the progress bar, ``--json`` documents (with the
remote I/O the command did), and the notes on files of a run that could not be read."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Callable

import click

from .group import _OPTIONS

if TYPE_CHECKING:
    from ..run import Run


def _progress_bar(desc: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """A tqdm bar on stderr driven by the core's ``progress(fraction, message)`` callbacks.

    Only on a terminal, as tqdm's ``disable=None`` would decide: when stderr is a pipe or a
    file (scripts, CI) tqdm is not even imported, which saves a merge ~40 ms of start-up.
    """
    if not sys.stderr.isatty():
        return (lambda fraction, message: None), (lambda: None)
    from tqdm import tqdm
    bar = tqdm(total=1000, desc=desc, file=sys.stderr, leave=False, disable=None,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(min(max(fraction, 0.0), 1.0) * 1000)
        bar.set_postfix_str(message[-40:], refresh=True)

    return update, bar.close


def _emit(doc: dict) -> None:
    io = _io_this_command()
    if io:   # what object storage served this command: requests, bytes, retries (issue 22)
        doc = {**doc, "io": io}
    click.echo(json.dumps(doc, indent=2, allow_nan=False))


def _io_this_command() -> dict[str, dict[str, int]]:
    """The remote I/O counters of the stores used since the command started, per protocol (empty: none)."""
    from ..remote import all_stats
    before = _OPTIONS["io_before"]
    now = all_stats()
    return {protocol: {k: v - before.get(protocol, {}).get(k, 0) for k, v in counts.items()}
            for protocol, counts in now.items()}


def _note_unreadable(run: Run, err: bool = True) -> None:
    """One line per file of the run that could not be read: the command goes on without it (issue 19)."""
    from ..run import printable
    for u in run.unreadable:
        click.echo(printable(f"{'ckpt-select: note:' if err else ' '} passed over {u.describe()}"), err=err)
