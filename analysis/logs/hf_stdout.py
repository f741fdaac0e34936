"""Hugging Face Trainer / ms-swift stdout: the printed log dicts.

Lines read (tqdm fragments around them are ignored)::

    {'loss': 1.921, 'grad_norm': 32.75, 'learning_rate': 4e-08, 'epoch': 0.01}
    {'loss': '1.921', ..., 'global_step/max_steps': '1/2353', ...}        (ms-swift: quoted)
    {'eval_loss': 1.80, 'eval_runtime': 12.3, 'epoch': 0.5}
    {'train_runtime': '4426', 'train_loss': 1.2, ...}                     (end-of-run summary)

Plain Trainer dicts carry no step: the step is then the count of training dicts seen
(a logging-event index, noted in ``notes``); eval dicts take the step of the last
training dict. ``loss`` is the mean over the logging window. The summary dict's keys
are kept under ``summary/`` so its run-mean ``train_loss`` is not taken for a point.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import LogTable
from .builder import TableBuilder
from .text import NUMBER, parse_number, read_text, scan_lines

# A log dict opens with one of the Trainer's log keys; config dicts printed at start-up don't.
_OPEN = r"\{'(?:loss|eval_\w+|train_runtime|learning_rate|grad_norm|train_loss)':"
_DICT = re.compile(_OPEN + r"[^{}]*\}")
_KV = re.compile(rf"'([^']+)':\s*(?:'({NUMBER}|\d+/\d+)'|({NUMBER}))\s*(?=[,}}])")
_SNIFF = re.compile(r"\{'(?:loss|eval_loss|train_runtime)':\s*'?[-\d.]")


class _Parser:
    """Assigns steps to dicts that lack one."""

    def __init__(self, builder: TableBuilder) -> None:
        self.builder, self.step, self.events = builder, 0, 0

    def __call__(self, line: str) -> tuple[int, dict[str, float]] | None:
        dicts = _DICT.findall(line)
        if not dicts:
            return None
        raw = {key: quoted or bare for key, quoted, bare in _KV.findall(dicts[-1])}
        values: dict[str, float] = {}
        for key, value in raw.items():
            if key == "global_step/max_steps":
                self.step = int(value.split("/")[0])
            elif (number := parse_number(value)) is not None:
                values[key] = number
        if "train_runtime" in values:
            return self.step, {f"summary/{k}": v for k, v in values.items()}
        if not any(k.startswith("eval_") for k in values) and "global_step/max_steps" not in raw:
            self.events += 1
            self.step = int(values.pop("step", self.events))
            if "step" not in raw:
                self.builder.note("hf_stdout: the log dicts carry no step; steps are logging-event counts")
        return self.step, values


class HfStdoutReader:
    """Printed Trainer/ms-swift log dicts in a captured stdout."""

    name = "hf_stdout"
    deep_sniff = True  # its line pattern is specific: safe to test on any stretch of text
    description = "Hugging Face Trainer / ms-swift stdout ({'loss': ..., 'learning_rate': ...} dicts)"

    def sniff(self, path: Path, head: str) -> bool:
        # Two dicts, not one: a README or a manifest may quote a single example.
        return len(_SNIFF.findall(head, 0, len(head))[:2]) == 2

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        scan_lines(read_text(path), _OPEN, _Parser(builder), builder)
        builder.note("loss is the mean over each logging window (Trainer logging_steps)")
        return builder.build()
