"""What an executor is: something that runs plain work units and hands their results back as they finish.

A work unit is a module-level function and one picklable argument (a dataclass of strings, numbers and
tuples: paths or URLs, tensor names, weights). It opens its inputs itself, so it can run in this process,
in a Ray worker on another node, or under a later launcher (a ``torchrun`` job) unchanged; nothing here or
in the units imports Ray (only :mod:`analysis.executors.ray_cluster` does).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

U = TypeVar("U")
R = TypeVar("R")

# Told after each finished unit: units done, units in all, bytes the finished units read.
TaskProgress = Callable[[int, int, int], None]


@dataclass(frozen=True, slots=True)
class Resources:
    """What one unit needs from the machine that runs it (Ray's resource hints; the local executor ignores them).

    ``memory``: bytes Ray reserves for the unit, so a node does not take more units than it can hold;
    ``max_retries``: how often a unit whose worker died is run again (units are pure, so a rerun is safe).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None
    max_retries: int = 3


class Executor(Protocol):
    """Runs units; ``slots`` is how many run at once (the merge plans at least that many groups)."""

    name: str
    slots: int

    def map(self, fn: Callable[[U], R], units: Iterable[U], resources: Resources = Resources(),
            progress: TaskProgress | None = None) -> Iterator[R]:
        """Run ``fn(unit)`` for every unit; yield the results in the order they finish."""
        ...


def bytes_of(result: object) -> int:
    """The bytes a unit's result says it read (0 when it does not say)."""
    return int(getattr(result, "bytes_read", 0) or 0)


class Tally:
    """Counts finished units and their bytes, and tells ``progress`` after each."""

    def __init__(self, total: int, progress: TaskProgress | None) -> None:
        self.total, self.done, self.bytes_read, self._progress = total, 0, 0, progress

    def add(self, result: object) -> None:
        """One more unit finished with ``result``."""
        self.done += 1
        self.bytes_read += bytes_of(result)
        if self._progress is not None:
            self._progress(self.done, self.total, self.bytes_read)


def driver_threads() -> int:
    """torch's intra-op threads in this process: what units run with, wherever they run (see :func:`intra_op_threads`)."""
    import torch

    return torch.get_num_threads()


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run with torch's intra-op threads set to ``count``, then restore them.

    A float64 sum over a tensor splits its work by thread count, so its last bits depend on it; Ray gives
    each task ``OMP_NUM_THREADS`` = its CPUs. Units that reduce with torch (the sketch statistics, an
    evaluator) run with the driver's count, so the cluster's numbers equal the local ones exactly.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
