"""Path policy: with a root folder set, nothing outside it is read or written.

The web app may be served to colleagues with ``--root DIR``; every path typed into
it goes through :func:`resolve_within`, which resolves ``..`` and symlinks before
checking, so neither can escape the root. Files found inside the root (a run's logs and
checkpoints, an evaluator) are checked with :func:`is_within` the same way: a symlink
inside the root that points out of it is outside. What ``--root`` confines, all of it:
docs/security.md.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidArgument


def resolve_within(path: str | Path, root: str | Path | None) -> Path:
    """``path`` made absolute (relative paths are taken from ``root``), checked to lie under ``root``.

    Raises:
        InvalidArgument: the resolved path is outside ``root``.
    """
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
    """
    root_path = Path(root).expanduser().resolve()
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):   # a symlink loop: it leads nowhere, so not inside either
        return False
    return resolved == root_path or resolved.is_relative_to(root_path)
