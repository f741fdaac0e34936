"""URL patterns (``s3://b/run/step_*.safetensors``) expanded against one listing of their prefix.

A shell expands ``*`` in local paths before CkptSelect sees them, but not in a URL: object stores
have no folders to glob. A pattern's last part is matched against the names of one listing of
its parent prefix (the same cached listing the readers use), never a request per candidate.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..errors import InvalidArgument
from .path import RemotePath
from .urls import is_url

_GLOB = re.compile(r"[*?\[]")


def expand_url_globs(patterns: Sequence[str]) -> list[str]:
    """Each URL with ``*``/``?``/``[...]`` in its last part replaced by the matching objects' and folders'
    URLs in natural order (``step_9`` before ``step_10``: oldest first); other arguments unchanged.

    Raises:
        InvalidArgument: a pattern matches nothing (named), or has a wildcard before its last part.
    """
    found: list[str] = []
    for text in patterns:
        if not (is_url(text) and _GLOB.search(text)):
            found.append(text)
            continue
        parent, _, name = text.rstrip("/").rpartition("/")
        if _GLOB.search(parent.split("://", 1)[-1]):
            raise InvalidArgument(f"{text}: a wildcard may stand only in the last part of a URL")
        matches = sorted((str(p) for p in RemotePath(parent).glob(name)), key=natural_key)
        if not matches:
            raise InvalidArgument(f"{text}: matches no object")
        found.extend(matches)
    return found


def natural_key(text: str) -> list[object]:
    """Sort key that orders the numbers in names by value (``step_9`` < ``step_10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
