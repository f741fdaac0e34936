"""Where the heavy jobs run: in this process (``local``, the default) or as tasks on a Ray cluster (``ray``).

The sketch pass, the evaluator search and the merge plan their work as plain units (functions over
paths or URLs and tensor groups, in the core modules) and hand them to an executor; an executor only
runs units. Ray is an optional extra: only :mod:`.ray_cluster` imports it, and only when asked for.
"""

from __future__ import annotations

from .base import Executor, Resources, TaskProgress, Tally, bytes_of, driver_threads, intra_op_threads
from .local import LocalExecutor

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install ckpt-select[ray]"


def make_executor(name: str = "local", address: str = "auto") -> Executor:
    """The executor called ``name``; for ``ray``, connected to the cluster at ``address`` (``auto``: the local one).

    Raises:
        InvalidArgument: an unknown name, or ``ray`` without Ray installed (one line: how to install it).
        ExecutorError: the Ray cluster at ``address`` cannot be reached.
    """
    from ..errors import InvalidArgument

    if name == "local":
        return LocalExecutor()
    if name != "ray":
        raise InvalidArgument(f"--executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    try:
        from .ray_cluster import RayExecutor
    except ImportError:
        raise InvalidArgument(RAY_MISSING) from None
    return RayExecutor(address)


__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RAY_MISSING", "Resources", "TaskProgress", "Tally", "bytes_of",
           "driver_threads", "intra_op_threads", "make_executor"]
