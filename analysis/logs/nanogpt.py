"""nanoGPT ``train.py`` stdout (karpathy/nanoGPT) and its close derivatives.

Lines read::

    iter 250: loss 1.4611, time 83129.50ms, mfu 0.61%
    step 250: train loss 1.4073, val loss 1.6254
    saving checkpoint to out-shakespeare-char
    [train] iter 10: loss 8.8782 9905 ms/iter          (bracketed derivative)
    [eval] iter 500: train 3.7095 val 3.6459 lr 3.00e-04

The eval line's ``train loss`` is an estimate over ``eval_iters`` batches, not the
iteration's loss, so it is kept apart as ``train_loss_eval``. ``saving checkpoint``
marks the step of the eval line above it (metric ``checkpoint_saved`` = 1). The iteration
``time`` includes the eval and the save that ran before it: that is what
:mod:`analysis.signals.timing` separates.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import LogTable
from .builder import TableBuilder
from .text import PLAIN_NUMBER, LineRule, read_text, scan_rules

N = PLAIN_NUMBER
RULES = [
    LineRule(rf"^iter (?P<step>\d+): loss (?P<train_loss>{N}), time (?P<step_time_ms>{N}) ?ms(?:, mfu (?P<mfu>{N})%)?",
             literal="iter "),
    LineRule(rf"^step (?P<step>\d+): train loss (?P<train_loss_eval>{N}), val loss (?P<val_loss>{N})"
             r"(?P<checkpoint_saved>\n(?:[^\n]*\n)??saving checkpoint)?",
             literal="step ", flags=("checkpoint_saved",)),
    LineRule(rf"^\[train\] iter (?P<step>\d+): loss (?P<train_loss>{N}) (?P<step_time_ms>{N}) ms/iter",
             literal="[train] iter "),
    LineRule(rf"^\[eval\] iter (?P<step>\d+): train (?P<train_loss_eval>{N}) val (?P<val_loss>{N})(?: lr (?P<lr>{N}))?",
             literal="[eval] iter "),
]
_SNIFF = re.compile(r"^(?:\[train\] )?iter \d+: loss \S+,? |^step \d+: train loss \S+, val loss", re.M)


class NanoGPTReader:
    """nanoGPT stdout: ``iter N: loss X, time Yms, mfu Z%`` and eval ``step N:`` lines."""

    name = "nanogpt"
    deep_sniff = True  # its line pattern is specific: safe to test on any stretch of text
    description = "nanoGPT train.py stdout (iter/step lines, saving checkpoint)"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF.search(head) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        scan_rules(read_text(path), RULES, builder)
        return builder.build()
