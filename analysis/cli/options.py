"""Option types and command decorators shared by the commands: paths or URLs, lazily loaded choices,
``--executor``/``--ray-address``, and the error wording of a run opened from one file."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import click

from ..errors import AnalysisError
from .group import STORAGE_OPTIONS_HELP, apply_storage_options


class _LazyChoice(click.Choice):
    """A ``click.Choice`` whose choices come from a module loaded only when they are needed."""

    def __init__(self, module: str, name: str, *, sort: bool = False) -> None:
        self._source, self._sort, self._loaded = (module, name), sort, None
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        if self._loaded is None:
            import importlib
            module, name = self._source
            values = getattr(importlib.import_module(module, __package__), name)
            self._loaded = tuple(sorted(values) if self._sort else values)
        return self._loaded


class _PathOrURL(click.ParamType):
    """A local path, as ``click.Path(path_type=Path)`` gives it, or a URL kept as text (``s3://b/run``, issue 22).

    ``click.Path`` would make ``s3://b/run`` the local path ``s3:/b/run``; a ``file://`` URL is its path.
    """

    name = "path"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        from ..remote import is_url, local_part
        if isinstance(value, Path) or value is None:
            return value
        text = str(value)
        return text if is_url(text) else Path(local_part(text))


PATH_OR_URL = _PathOrURL()


def _executor_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--executor local|ray`` and ``--ray-address`` (issue 22), handed to the command as ``executor``."""
    @functools.wraps(command)
    def wrapper(executor: str, ray_address: str, **kwargs: object) -> None:
        from ..executors import make_executor
        command(executor=None if executor == "local" else make_executor(executor, ray_address), **kwargs)
    wrapper = click.option("--ray-address", default="auto", show_default=True, metavar="ADDRESS",
                           help="--executor ray: the cluster (auto: the one `ray start` runs here; local: start one "
                                "in this process; HOST:PORT).")(wrapper)
    return click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                        help="Where the heavy work runs: this process, or tasks on a Ray cluster "
                             "(pip install ckpt-select[ray]; docs/cluster.md).")(wrapper)


def _naming_a_file_run(command: Callable[..., None]) -> Callable[..., None]:
    """A command on a run opened from one checkpoint file names that file in its errors (issue 19):
    the run's folder, which the core's messages name, is the file's parent."""
    @functools.wraps(command)
    def wrapper(**kwargs: object) -> None:
        path = kwargs["run_path"]
        try:
            command(**kwargs)
        except AnalysisError as e:
            if isinstance(path, Path) and path.is_file() and path.name not in str(e):
                raise AnalysisError(f"{path}: {str(e).removeprefix(f'{path.resolve().parent}: ')}") from e
            raise
    return wrapper


def _storage_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--storage-options JSON`` on the command itself, as well as before it (``ckpt-select --storage-options``)."""
    @functools.wraps(command)
    def wrapper(storage_options: str | None = None, **kwargs: object) -> None:
        apply_storage_options(storage_options)
        command(**kwargs)
    return click.option("--storage-options", "storage_options", metavar="JSON", help=STORAGE_OPTIONS_HELP)(wrapper)
