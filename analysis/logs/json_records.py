"""A JSON array of metric records: ``[{"step": 0, "train/loss": 9.2, ...}, ...]``.

Some training loops dump their history as one JSON list instead of JSON Lines; each
element is read exactly like a JSONL line (nested dicts flattened with ``/``).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LogParseError
from .base import LogTable
from .builder import TableBuilder
from .csv_jsonl import add_json_record
from .names import find_step_key
from .text import read_json

_SNIFF = re.compile(r'\A\s*\[\s*\{\s*"')


class JsonRecordsReader:
    """A JSON list of ``{step, metric: value}`` objects."""

    name = "json_records"
    description = "JSON array of metric records ([{\"step\": N, \"loss\": X}, ...])"

    def sniff(self, path: Path, head: str) -> bool:
        return _SNIFF.match(head) is not None and find_step_key(re.findall(r'"([^"]+)"\s*:', head)) is not None

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        records = read_json(path)
        if not isinstance(records, list):
            raise LogParseError(path, None, "expected a JSON array of records")
        for record in records:
            add_json_record(record, builder)
        return builder.build()
