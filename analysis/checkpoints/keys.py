"""Key-prefix normalisation, so checkpoints of one run compare and merge.

The same model is saved under different names depending on how it was wrapped:
``module.`` (DDP), ``_orig_mod.`` (torch.compile), ``model.`` (Lightning's module
attribute). A prefix is stripped only when *every* key carries it, so two
checkpoints of one run normalise to the same names whatever wrapper saved them,
and the original name stays recoverable for writing merges in the input's layout.
"""

from __future__ import annotations

from typing import Iterable

# Wrapper prefixes, stripped repeatedly while every key starts with one of them.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "model.")


def common_wrapper_prefix(names: Iterable[str]) -> str:
    """The longest chain of wrapper prefixes shared by all ``names`` ("" if none).

    A prefix is not stripped if that would turn any key into the empty string.
    """
    names = list(names)
    prefix = ""
    while names:
        for candidate in WRAPPER_PREFIXES:
            if all(n.startswith(candidate) and len(n) > len(candidate) for n in names):
                prefix += candidate
                names = [n[len(candidate):] for n in names]
                break
        else:
            break
    return prefix


class KeyMap:
    """Normalised name <-> original name for one checkpoint's tensors."""

    def __init__(self, originals: Iterable[str]) -> None:
        originals = list(originals)
        self.prefix = common_wrapper_prefix(originals)
        cut = len(self.prefix)
        self._to_original = {name[cut:]: name for name in originals}

    def normalize(self, original: str) -> str:
        """The name shown in ``tensors()`` for an original key."""
        return original[len(self.prefix):] if original.startswith(self.prefix) else original

    def original(self, name: str) -> str:
        """The key as stored in the file; accepts a normalised or an original name."""
        if name in self._to_original:
            return self._to_original[name]
        return name


def original_name(handle: object, name: str) -> str:
    """The stored name of ``name`` in ``handle`` (handles without a key map keep names as they are)."""
    lookup = getattr(handle, "original_name", None)
    return lookup(name) if callable(lookup) else name
