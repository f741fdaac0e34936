"""The Ray executor: each unit a Ray task with resource hints, results streamed back with ``ray.wait``.

The only module of CkptSelect that imports Ray (``pip install ckpt-select[ray]``). A unit is shipped by
reference (module and function name), so every node needs ckpt-select installed, as it needs Ray; the
unit opens its inputs by path or URL itself, so the inputs must be on storage every node reaches (a shared
file system or object storage). A task whose worker dies (killed, out of memory, node lost) is run again
up to ``Resources.max_retries`` times; an error our code raises (bad input) is not retried, it is the answer.

Storage options (``--storage-options``: an endpoint, a profile) are per process, so each task carries the
driver's and its worker applies them before the unit runs; credentials are better left to the nodes'
environment (``AWS_*``, instance roles), which the workers read as the driver does. Each task returns,
beside its result, the object-storage requests, bytes and retries its unit made, which the driver adds to
its own counters: ``--json``'s ``io`` covers the cluster, not only the driver.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, TypeVar

import ray
from ray.exceptions import RayError, RayTaskError

from ..errors import ExecutorError
from ..remote.urls import add_stats, all_stats, current_storage_options, set_storage_options, stats_since
from .base import Resources, TaskProgress, Tally

U = TypeVar("U")
R = TypeVar("R")


class RayExecutor:
    """Runs units as tasks on the Ray cluster at ``address`` (``auto``: a running cluster on this machine;
    ``local``: start one in this process; else ``HOST:PORT`` or ``ray://HOST:PORT``)."""

    name = "ray"

    def __init__(self, address: str = "auto") -> None:
        self.address = address
        connect(address)
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote: dict[Resources, object] = {}

    def map(self, fn: Callable[[U], R], units: Iterable[U], resources: Resources = Resources(),
            progress: TaskProgress | None = None) -> Iterator[R]:
        """Submit every unit as a task, then yield each result as its task finishes.

        Raises:
            AnalysisError: what a unit raised (the same one line as a local run).
            ExecutorError: a unit was lost more often than its retries allow.
        """
        task = self._task(resources)
        options = current_storage_options()
        pending = {task.remote(fn, unit, options): unit for unit in units}  # type: ignore[attr-defined]
        tally = Tally(len(pending), progress)
        try:
            while pending:
                ray.wait(list(pending), num_returns=1)   # one finished; then take every one finished by now
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                for ref in ready:
                    pending.pop(ref)
                    result, io = _get(ref, fn, resources)
                    add_stats(io)
                    tally.add(result)
                    yield result
        finally:
            for ref in pending:   # a failure or an abandoned generator: stop what still runs
                ray.cancel(ref, force=True)

    def _task(self, resources: Resources) -> object:
        """:func:`run_unit` as a Ray remote function with ``resources`` (made once per resources)."""
        if resources not in self._remote:
            options = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
                       "max_retries": resources.max_retries, "retry_exceptions": False}
            if resources.memory:
                options["memory"] = int(resources.memory)
            self._remote[resources] = ray.remote(run_unit).options(**options)
        return self._remote[resources]


# The storage options this worker process runs with (set_storage_options resets the stores: only on a change).
_APPLIED: dict = {}


def run_unit(fn: Callable[[U], R], unit: U, storage_options: dict) -> tuple[R, dict[str, dict[str, int]]]:
    """On a worker: apply the driver's storage options, then run the unit (``fn`` travels by reference).

    Returns the unit's result and the object-storage I/O it did (a worker runs one task at a time).
    """
    global _APPLIED
    if storage_options != _APPLIED:
        set_storage_options(storage_options)
        _APPLIED = storage_options
    before = all_stats()
    return fn(unit), stats_since(before)


def connect(address: str) -> None:
    """Join the cluster at ``address`` once per process (a process already joined keeps its cluster).

    Raises:
        ExecutorError: no cluster answers there (one line naming the address).
    """
    if ray.is_initialized():
        return
    local = address == "local"
    try:
        ray.init(address=None if local else address, include_dashboard=False if local else None,
                 logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ExecutorError(f"--ray-address {address}: no Ray cluster answers there ({_first_line(e)}); start one "
                            "with `ray start --head`, or give --ray-address HOST:PORT") from None


def _get(ref: object, fn: Callable, resources: Resources) -> object:
    """The task's result; our own errors come back as themselves, a lost task as one ExecutorError line."""
    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = e.cause
        if isinstance(cause, BaseException):
            raise cause from None
        raise ExecutorError(f"{fn.__name__} failed on the cluster: {_first_line(e)}") from None
    except RayError as e:
        raise ExecutorError(f"{fn.__name__} was lost on the cluster {resources.max_retries + 1} times "
                            f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(error: BaseException) -> str:
    """An error's first non-empty line (Ray's messages run to many)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


__all__ = ["RayExecutor", "connect"]
