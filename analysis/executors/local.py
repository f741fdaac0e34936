"""The default executor: units run in this process, one after another (or on threads, for I/O-bound units).

One at a time is right for the CPU-bound units (the merge's adder, the sketch's hashing) on the one
machine the CLI runs on; ``threads`` > 1 suits units that mostly wait on storage (remote reads).
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Iterable, Iterator, TypeVar

from .base import Resources, TaskProgress, Tally

U = TypeVar("U")
R = TypeVar("R")


class LocalExecutor:
    """Runs units in this process; results come back as they finish (in order with one thread)."""

    name = "local"

    def __init__(self, threads: int = 1) -> None:
        self.threads = max(1, threads)
        self.slots = self.threads

    def map(self, fn: Callable[[U], R], units: Iterable[U], resources: Resources = Resources(),
            progress: TaskProgress | None = None) -> Iterator[R]:
        """Run ``fn`` over ``units`` here; ``resources`` are ignored (this machine is what there is)."""
        todo = list(units)
        tally = Tally(len(todo), progress)
        if self.threads == 1:
            for unit in todo:
                result = fn(unit)
                tally.add(result)
                yield result
            return
        yield from self._threaded(fn, todo, tally)

    def _threaded(self, fn: Callable[[U], R], todo: list[U], tally: Tally) -> Iterator[R]:
        """The units on a thread pool; a failure cancels the units not started yet and is raised."""
        with ThreadPoolExecutor(self.threads, thread_name_prefix="ckpt-select-unit") as pool:
            pending = {pool.submit(fn, unit) for unit in todo}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        result = future.result()
                        tally.add(result)
                        yield result
            finally:
                for future in pending:
                    future.cancel()
