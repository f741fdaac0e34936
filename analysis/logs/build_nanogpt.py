"""karpathy/build-nanogpt ``train_gpt2.py``: its stdout and its ``log/log.txt``.

stdout::

    step  1234 | loss: 3.456789 | lr 5.9e-04 | norm: 0.3145 | dt: 790.43ms | tok/sec: 663298.21
    validation loss: 3.2034                       (belongs to the next ``step`` line)
    HellaSwag accuracy: 2492/10042=0.2482

log.txt::

    19072 train 3.123456
    19250 val 3.1425
    19250 hella 0.3100

The stdout eval lines carry no step: they are printed at the top of the step they
precede, so they are attached to the following ``step`` line.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import LogTable
from .builder import TableBuilder
from .text import NUMBER, PLAIN_NUMBER, LineRule, key_values, parse_number, read_text, scan_rules

N = PLAIN_NUMBER
_STDOUT_LINE = re.compile(
    rf"^(?:step +(?P<step>\d+) \| (?P<rest>.*)|validation loss: (?P<val>{NUMBER})"
    rf"|HellaSwag accuracy: \d+/\d+=(?P<hella>{NUMBER}))\s*$",
    re.M,
)
_STDOUT_KV = re.compile(rf"(loss|lr|norm|dt|tok/sec):? ({NUMBER})")
_STDOUT_NAMES = {"loss": "train_loss", "lr": "lr", "norm": "grad_norm", "dt": "step_time_ms", "tok/sec": "tokens_per_sec"}
# Every line of log.txt is a record: the literal "" makes every non-blank line count.
LOGTXT_RULES = [
    LineRule(rf"^(?:step )?(?P<step>\d+) (?:train(?:_loss)? (?P<train_loss>{N})|val(?:_loss)? (?P<val_loss>{N})"
             rf"|hella (?P<hellaswag>{N}))[ \t]*\r?$", literal=""),
]
_SNIFF_STDOUT = re.compile(r"^step +\d+ \| loss: \S+ \| lr", re.M)
_SNIFF_LOGTXT = re.compile(r"\A(?:\s*(?:step )?\d+ (?:train|val|hella|train_loss|val_loss) \S+\s*\n){2}")


class BuildNanoGPTReader:
    """build-nanogpt stdout (``step N | loss: X | lr ... | norm ... | dt ...ms | tok/sec ...``)."""

    name = "build_nanogpt"
    deep_sniff = True  # its line pattern is specific: safe to test on any stretch of text
    description = "build-nanogpt train_gpt2.py stdout (step | loss | lr | norm | dt | tok/sec)"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF_STDOUT.search(head) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        pending: dict[str, float] = {}
        for match in _STDOUT_LINE.finditer(read_text(path)):
            if match["val"] is not None or match["hella"] is not None:
                name, token = ("val_loss", match["val"]) if match["val"] is not None else ("hellaswag", match["hella"])
                if (value := parse_number(token)) is None:
                    builder.skip()
                else:
                    pending[name] = value
            else:
                metrics = {_STDOUT_NAMES[k]: v for k, v in key_values(match["rest"], _STDOUT_KV).items()}
                if "train_loss" not in metrics:
                    builder.skip()
                    continue
                # Eval lines print at the top of the step they precede: they belong to it.
                builder.add(int(match["step"]), {**pending, **metrics})
                pending = {}
        return builder.build()


class BuildNanoGPTLogTxtReader:
    """build-nanogpt ``log.txt``: ``<step> train|val|hella <value>`` (also ``step N train_loss X``)."""

    name = "build_nanogpt_logtxt"
    description = "build-nanogpt log/log.txt (<step> train|val|hella <value>)"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF_LOGTXT.match(head) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        scan_rules(read_text(path), LOGTXT_RULES, builder)
        return builder.build()
