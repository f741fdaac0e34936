"""Key and shape agreement between checkpoints of one run, from headers only.

A run whose checkpoints disagree (a layer added mid-run, a different wrapper prefix
that normalisation could not undo, a resized vocabulary) cannot be averaged; the user
needs to see exactly which keys and shapes differ, not a stack trace.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import TensorInfo


@dataclass(frozen=True, slots=True)
class LayoutDiff:
    """How one checkpoint's tensors differ from a reference checkpoint's."""

    missing: tuple[str, ...]                                        # in the reference, not here
    extra: tuple[str, ...]                                          # here, not in the reference
    reshaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]   # (name, shape here, reference shape)
    retyped: tuple[tuple[str, str, str], ...] = ()                  # (name, dtype here, reference dtype)

    @property
    def same(self) -> bool:
        """True when names and shapes agree (dtype changes do not stop an average)."""
        return not (self.missing or self.extra or self.reshaped)

    def describe(self, limit: int = 5) -> str | None:
        """One sentence naming the differences (the first ``limit`` of each kind), or None."""
        parts = []
        for label, items in (("missing", self.missing), ("extra", self.extra),
                             ("shape differs", [f"{n} {a} vs {b}" for n, a, b in self.reshaped]),
                             ("dtype differs", [f"{n} {a} vs {b}" for n, a, b in self.retyped])):
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{len(items)} {label}: {', '.join(list(items)[:limit])}{more}")
        return "; ".join(parts) or None


def compare_layouts(reference: list[TensorInfo], other: list[TensorInfo]) -> LayoutDiff:
    """Differences of ``other`` against ``reference`` (both as listed by ``handle.tensors()``)."""
    ref = {i.name: i for i in reference}
    got = {i.name: i for i in other}
    common = [n for n in ref if n in got]
    return LayoutDiff(
        missing=tuple(n for n in ref if n not in got),
        extra=tuple(n for n in got if n not in ref),
        reshaped=tuple((n, got[n].shape, ref[n].shape) for n in common if got[n].shape != ref[n].shape),
        retyped=tuple((n, got[n].dtype, ref[n].dtype) for n in common if got[n].dtype != ref[n].dtype),
    )
