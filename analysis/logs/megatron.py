"""Megatron-LM / Megatron-DeepSpeed ``pretrain_gpt.py`` stdout.

Lines read::

     iteration      101/     500 | consumed samples: 1616 | elapsed time per iteration (ms): 66699.5 |
         learning rate: 9.718E-06 | global batch size: 16 | lm loss: 7.761578E+00 | grad norm: 4.834 | ...
     validation loss at iteration 100 | lm loss value: 7.666490E+00 | lm loss PPL: 2.1E+03 |
     saving checkpoint at iteration     500 to /checkpoints/...

Every ``name: value`` field is kept; ``lm loss`` is the train loss and ``lm loss value``
on a validation line is the val loss. Megatron averages the train fields over the
``log-interval`` window. ``consumed tokens`` maps to ``tokens``.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import LogTable
from .builder import TableBuilder
from .text import NUMBER, key_values, read_text, scan_lines

_ITER = re.compile(r"iteration\s+(\d+)\s*/\s*\d+\s*\|(.*)$")
_VAL = re.compile(r"validation loss at iteration\s+(\d+)[^|]*\|(.*)$")
_SAVE = re.compile(r"saving checkpoint at iteration\s+(\d+)")
_KV = re.compile(rf"\|?\s*([^|:]+?)\s*:\s*({NUMBER})\s*(?=\||$)")
_SNIFF = re.compile(r"iteration\s+\d+\s*/\s*\d+\s*\|.*(?:lm loss|elapsed time per iteration)"
                    r"|validation loss at iteration\s+\d+.*lm loss value")
_CANDIDATE = r"iteration\s+\d+\s*/\s*\d+\s*\||validation loss at iteration|saving checkpoint at iteration"


def _parse(line: str) -> tuple[int, dict[str, float]] | None:
    """One Megatron line -> (step, metrics); None if it should have parsed and did not."""
    if (match := _ITER.search(line)) is not None:
        return int(match.group(1)), key_values(match.group(2), _KV)
    if (match := _VAL.search(line)) is not None:
        values = key_values(match.group(2), _KV)
        metrics = {("val_loss" if k == "lm loss value" else f"val/{k}"): v for k, v in values.items()}
        return (int(match.group(1)), metrics) if metrics else None
    if (match := _SAVE.search(line)) is not None:
        return int(match.group(1)), {"checkpoint_saved": 1.0}
    return None


class MegatronReader:
    """Megatron-LM / Megatron-DeepSpeed stdout (``iteration N/ M | ... | lm loss: X | ...``)."""

    name = "megatron"
    deep_sniff = True  # its line pattern is specific: safe to test on any stretch of text
    description = "Megatron-LM / Megatron-DeepSpeed stdout (iteration N/ M | lm loss: X | ...)"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF.search(head) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        scan_lines(read_text(path), _CANDIDATE, _parse, builder)
        return builder.build()
