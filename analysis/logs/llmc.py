"""llm.c ``main.log``: ``s:N trl:X lr:... norm:...`` (train) and ``s:N tel:X`` (val).

Older logs carry only ``trl``; newer ones add ``lr`` and ``norm``; some hold ``tel``
only. ``trl``/``tel``/``norm`` map to train_loss/val_loss/grad_norm via the name table.
Evaluation lines print before the train line of the same step.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import LogTable
from .builder import TableBuilder
from .text import PLAIN_NUMBER, LineRule, read_text, scan_rules

N = PLAIN_NUMBER
RULES = [
    LineRule(rf"^s:(?P<step>\d+) (?:trl:(?P<trl>{N})(?: lr:(?P<lr>{N}))?(?: norm:(?P<norm>{N}))?"
             rf"|tel:(?P<tel>{N})|eval:(?P<hellaswag>{N}))", literal="s:"),
]
_SNIFF = re.compile(r"^s:\d+ t[er]l:\S+", re.M)


class LlmcReader:
    """llm.c main.log."""

    name = "llmc"
    deep_sniff = True  # its line pattern is specific: safe to test on any stretch of text
    description = "llm.c main.log (s:N trl:X lr:.. norm:.. / s:N tel:X)"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF.search(head) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        scan_rules(read_text(path), RULES, builder)
        return builder.build()
