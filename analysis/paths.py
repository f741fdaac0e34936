"""Path policy: with a root folder set, nothing outside it is read or written.

The web app may be served to colleagues with ``--root DIR``; every path typed into
it goes through :func:`resolve_within`, which resolves ``..`` and symlinks before
checking, so neither can escape the root. Files found inside the root (a run's logs and
checkpoints, an evaluator) are checked with :func:`is_within` the same way: a symlink
inside the root that points out of it is outside. What ``--root`` confines, all of it:
docs/security.md.

A root or a path may also be a URL (``s3://bucket/prefix``, issue 22): object stores have no
symlinks, so there ``..`` is normalised and a path lies within a root when it has the same
protocol and bucket and the root's key prefix as whole path components (``s3://b/run`` holds
``s3://b/run/x``, never ``s3://b/run2``).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from .errors import InvalidArgument
from .remote import RemotePath, is_remote


def resolve_within(path: "str | Path | RemotePath", root: "str | Path | RemotePath | None") -> "Path | RemotePath":
    """``path`` made absolute (relative paths are taken from ``root``), checked to lie under ``root``.

    Raises:
        InvalidArgument: the resolved path is outside ``root``.
    """
    if is_remote(path) or is_remote(root):
        return _url_within(path, root)
    candidate = Path(path).expanduser()
    if root is None:
        return candidate.resolve()
    root_path = Path(root).expanduser().resolve()
    resolved = (candidate if candidate.is_absolute() else root_path / candidate).resolve()
    if resolved != root_path and not resolved.is_relative_to(root_path):
        raise InvalidArgument(f"{path}: outside the allowed folder {root_path} (the app was started with --root)")
    return resolved


def is_within(path: str | Path, root: str | Path) -> bool:
    """True when ``path``, with ``..`` and every symlink resolved, is ``root`` or lies below it.

    A lexical test would let ``root/link -> /etc`` through: only the resolved path says where a read lands.
    A URL has no links: it is normalised and compared by whole key components (see the module's docstring).
    """
    if is_remote(path) or is_remote(root):
        return _url_inside(path, root)
    root_path = Path(root).expanduser().resolve()
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):   # a symlink loop: it leads nowhere, so not inside either
        return False
    return resolved == root_path or resolved.is_relative_to(root_path)


def normalized_url(path: "str | RemotePath") -> RemotePath:
    """A URL with its ``..`` and ``.`` parts and doubled slashes folded away (an object key never resolves them)."""
    remote = path if isinstance(path, RemotePath) else RemotePath(str(path))
    lead = "/" if remote.key.startswith("/") else ""   # memory:// keys start with one; s3 keys never do
    key = lead + posixpath.normpath("/" + remote.key).lstrip("/")
    return RemotePath(remote.url, store=remote.store, key=key)


def _url_inside(path: object, root: object) -> bool:
    """True when ``path`` and ``root`` are URLs of one store and ``path``'s key is ``root``'s or lies below it."""
    if not (is_remote(path) and is_remote(root)):
        return False   # a local file is never inside a bucket, nor an object inside a folder
    candidate, base = normalized_url(path), normalized_url(root)   # type: ignore[arg-type]
    if candidate.store is not base.store:
        return False
    return candidate.key == base.key or candidate.key.startswith(base.key + "/")


def _url_within(path: object, root: object) -> RemotePath:
    """:func:`resolve_within` for URLs: a relative ``path`` is taken from a URL ``root``.

    Raises:
        InvalidArgument: ``path`` is outside ``root`` (another protocol or bucket, a sibling prefix, a local path).
    """
    if is_remote(path):
        candidate = normalized_url(path)   # type: ignore[arg-type]
    elif is_remote(root) and not Path(str(path)).is_absolute():
        base = normalized_url(root)   # type: ignore[arg-type]
        candidate = normalized_url(RemotePath(base.url, store=base.store, key=f"{base.key}/{path}"))
    else:
        raise InvalidArgument(f"{path}: outside the allowed prefix {root} (the app was started with --root)")
    if root is not None and not _url_inside(candidate, root):
        raise InvalidArgument(f"{path}: outside the allowed prefix {root} (the app was started with --root)")
    return candidate
