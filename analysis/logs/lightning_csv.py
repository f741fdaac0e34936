"""PyTorch Lightning ``CSVLogger`` ``metrics.csv``.

The header is the union of every key ever logged and rows are sparse: a training row
and a validation row fill different cells. ``self.log(..., on_step=True, on_epoch=True)``
writes ``*_step`` and ``*_epoch`` twins; ``train_loss_step`` (or a plain ``loss``) is
the train loss, ``*_epoch`` twins keep their own names (epoch means are not points of
the per-step curve). Parsing is shared with the generic CSV reader; only the sniffing
(a ``step`` column plus ``epoch`` or ``_step``/``_epoch`` twins) is Lightning's.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .base import LogTable
from .csv_jsonl import read_csv_records


class LightningCsvReader:
    """Lightning CSVLogger metrics.csv (sparse rows, ``_step``/``_epoch`` suffixes)."""

    name = "lightning_csv"
    description = "PyTorch Lightning CSVLogger metrics.csv (sparse rows, *_step/*_epoch)"

    def sniff(self, path: Path, head: str) -> bool:
        first = head.split("\n", 1)[0].strip()
        if not first or first.startswith("{"):
            return False
        try:
            header = [h.strip() for h in next(csv.reader([first]))]
        except (csv.Error, StopIteration):
            return False
        if "step" not in header:
            return False
        twins = any(h.endswith("_step") for h in header) and any(h.endswith("_epoch") for h in header)
        return twins or ("epoch" in header and path.name == "metrics.csv") or header[:1] == ["epoch"]

    def read(self, path: Path) -> LogTable:
        return read_csv_records(path, self.name)
