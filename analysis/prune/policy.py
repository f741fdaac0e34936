"""The keep policy of ``prune``: which checkpoints a user wants kept, as one short string.

``--keep window+2,newest:3,every:1000,optimizer`` reads left to right, most important first; each
term says what a kept checkpoint is for. The storage planner's policies (``last``, ``every``,
``budget`` in :mod:`analysis.storage`) count what a policy would keep; these terms pick real files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidArgument

# term -> (default count, what it keeps): the one table the parser, the help and docs/prune.md follow.
TERMS: dict[str, tuple[int, str]] = {
    "window": (0, "the recommended averaging window, plus N checkpoints on each side (window+N)"),
    "newest": (1, "the newest K checkpoints (newest:K; last:K is the same)"),
    "every": (0, "milestones: each checkpoint whose step is a multiple of M (every:M)"),
    "optimizer": (1, "the newest K checkpoints that hold optimizer state, to resume (optimizer[:K])"),
}
ALIASES = {"last": "newest", "milestones": "every", "optim": "optimizer"}
POLICY_SYNTAX = "window[+N], newest:K, every:M, optimizer[:K], comma-separated, most important first"
_TERM = re.compile(r"^(?P<name>[a-z]+)(?:(?P<sep>[+:])(?P<n>\d+))?$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]i?)?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}


@dataclass(frozen=True, slots=True)
class KeepTerm:
    """One term of a keep policy: ``kind`` (a key of TERMS) and its number."""

    kind: str
    n: int

    @property
    def label(self) -> str:
        """The term as the user writes it: ``window+2``, ``newest:3``, ``every:1000``, ``optimizer``."""
        if self.kind == "window":
            return "window" + (f"+{self.n}" if self.n else "")
        if self.kind == "optimizer" and self.n == 1:
            return "optimizer"
        return f"{self.kind}:{self.n}"


@dataclass(frozen=True, slots=True)
class PrunePolicy:
    """What to keep: the terms in the user's order (their priority under a budget), and the budget."""

    terms: tuple[KeepTerm, ...]
    budget_bytes: int | None = None

    @property
    def text(self) -> str:
        return ",".join(t.label for t in self.terms)

    def has(self, kind: str) -> bool:
        """True when a term of ``kind`` is in the policy (e.g. only ``window`` needs a recommendation)."""
        return any(t.kind == kind for t in self.terms)


def parse_policy(keep: str | list[str] | tuple[str, ...], budget: str | int | None = None) -> PrunePolicy:
    """``"window+2,newest:3"`` (or several such strings) and ``"2TB"`` -> a :class:`PrunePolicy`.

    Raises:
        InvalidArgument: an unknown term, a missing or zero number, a repeated term, no term, a bad budget.
    """
    texts = [keep] if isinstance(keep, str) else list(keep)
    parts = [p.strip().lower() for text in texts for p in text.split(",") if p.strip()]
    if not parts:
        raise InvalidArgument(f"--keep needs a policy: {POLICY_SYNTAX}")
    terms = [_term(p) for p in parts]
    kinds = [t.kind for t in terms]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise InvalidArgument(f"--keep {','.join(parts)}: {', '.join(repeated)} given twice")
    return PrunePolicy(tuple(terms), parse_bytes(budget) if budget is not None else None)


def _term(text: str) -> KeepTerm:
    """One term; its number defaults per TERMS, ``every`` must have one."""
    match = _TERM.match(text)
    name = ALIASES.get(match.group("name"), match.group("name")) if match else None
    if match is None or name not in TERMS:
        raise InvalidArgument(f"--keep: unknown term {text!r}; terms: {POLICY_SYNTAX}")
    sep, number = match.group("sep"), match.group("n")
    if (sep == "+") != (name == "window" and number is not None):
        raise InvalidArgument(f"--keep: {text!r}: write window+N, newest:K, every:M or optimizer:K")
    n = int(number) if number is not None else TERMS[name][0]
    if n < 1 and name != "window":
        raise InvalidArgument(f"--keep: {text!r} needs a positive number ({TERMS[name][1]})")
    return KeepTerm(name, n)


def parse_bytes(text: str | int) -> int:
    """``"2TB"``, ``"500GB"``, ``"1.5TiB"``, ``10**12`` -> bytes (decimal units, as disks and bills count).

    Raises:
        InvalidArgument: not a size, or not positive.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise InvalidArgument(f"--budget {text!r} is not a size like 2TB, 500GB or 1.5TiB")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if size <= 0:
        raise InvalidArgument(f"--budget {text!r} must be positive")
    return size
