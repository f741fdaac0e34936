"""fairseq-train stdout, old (<= 0.8, ``| epoch 001: 450 / 1891 loss=...``) and hydra era.

Lines read (the step is ``num_updates``)::

    epoch 006:  62% 1062/1720 [05:37<03:21, loss=4.528, ..., num_updates=8000, lr=0.0001, gnorm=1.702, ...]
    | epoch 001:    450 / 1891 loss=11.521, nll_loss=10.881, ..., num_updates=445, lr=8.9e-05, gnorm=1.543, ...
    ... | valid | epoch 006 | valid on 'valid' subset | loss 5.329 | ppl 40.21 | num_updates 8553 | best_loss 5.329
    | epoch 001 | valid on 'valid' subset | valid_loss 8.11425 | valid_ppl 118.06 | num_updates 600
    ... | train | epoch 006 | loss 4.578 | ... | num_updates 8553 | lr 0.0001 | gnorm 1.738 | wall 3370

Progress values are running means over the epoch so far (fairseq's meters); epoch
summaries are kept apart under ``train_epoch/``. tqdm refreshes repeat a step: the
last one wins.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import LogTable
from .builder import TableBuilder
from .text import NUMBER, parse_number, read_text, scan_lines, strip_ansi

_PROGRESS_KV = re.compile(rf"\b(\w+)=({NUMBER})%?")
_PIPE_KV = re.compile(rf"\|\s*(\w+)\s+({NUMBER})%?\s*(?=\||$)")
_FRAME = re.compile(r"epoch \d+:[^\[|]*?(?:\[[^\]]*?)?((?:\w+=[^,\]\s]+,?\s*)*num_updates=\d+[^\]\n|]*)")
_SNIFF = re.compile(r"epoch \d+:.*\bnum_updates=\d+|\| epoch \d+ \|.*\bnum_updates \d+")
_CANDIDATE = r"num_updates[= ]\d+"


def _parse(line: str) -> tuple[int, dict[str, float]] | None:
    line = strip_ansi(line)
    if "valid on" in line:
        values = _pipe(line)
        metrics = {("val_loss" if k in ("loss", "valid_loss") else f"valid/{k.removeprefix('valid_')}"): v
                   for k, v in values.items() if k != "num_updates"}
        return _with_step(values, metrics)
    frames = _FRAME.findall(line)
    if frames:
        values = {k: n for k, v in _PROGRESS_KV.findall(frames[-1]) if (n := parse_number(v)) is not None}
        return _with_step(values, {k: v for k, v in values.items() if k != "num_updates"})
    values = _pipe(line)
    return _with_step(values, {f"train_epoch/{k}": v for k, v in values.items() if k != "num_updates"})


def _pipe(line: str) -> dict[str, float]:
    return {k: n for k, v in _PIPE_KV.findall(line) if (n := parse_number(v)) is not None}


def _with_step(values: dict[str, float], metrics: dict[str, float]) -> tuple[int, dict[str, float]] | None:
    if "num_updates" not in values:
        return None
    return int(values["num_updates"]), metrics


class FairseqReader:
    """fairseq-train stdout (progress, valid and epoch-summary lines)."""

    name = "fairseq"
    deep_sniff = True  # its line pattern is specific: safe to test on any stretch of text
    description = "fairseq-train stdout (loss=..., num_updates=...; valid on 'valid' subset)"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF.search(strip_ansi(head)) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        scan_lines(read_text(path), _CANDIDATE, _parse, builder)
        return builder.build()
