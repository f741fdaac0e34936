"""TensorBoard event files (``events.out.tfevents.*``), read with tbparse.

tbparse keeps every point (TensorBoard's EventAccumulator keeps only 10,000 per tag by
default) and reads both ``simple_value`` scalars and the newer tensor-stored ones.
Tags keep their names (``train/loss`` -> ``train_loss`` via the name table).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import LogParseError
from .base import LogTable
from .builder import TableBuilder

# Event files are binary (the sniff sample of a binary file is empty), so the writer's
# fixed file-name pattern is what identifies them; tbparse then validates the records.
_EVENT_NAME = "events.out.tfevents"


class TensorBoardReader:
    """One TensorBoard event file."""

    name = "tensorboard"
    description = "TensorBoard event file (events.out.tfevents.*), all scalars"

    def sniff(self, path: Path, head: str) -> bool:
        return _EVENT_NAME in path.name

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        # Sorted by step, all tags in one block: an event file is one run, so tags written
        # one after another must not look like restarts.
        frame = _scalars(path).sort_values(["step", "wall_time"], kind="stable")
        tags = frame["tag"].to_numpy()
        values = frame["value"].to_numpy(dtype=np.float64)
        metrics = {str(tag): (values, tags == tag) for tag in frame["tag"].unique()}
        builder.add_columns(frame["step"].to_numpy(), metrics, frame["wall_time"].to_numpy(dtype=np.float64))
        return builder.build()


def _summary(path: Path, reader: type):
    """tbparse's scalars of a local event file; a remote one (issue 22) is fetched in one request to a
    temporary copy first (tbparse opens files by name), removed once read."""
    if isinstance(path, Path):
        return reader(str(path), extra_columns={"wall_time"}).scalars
    import tempfile
    with tempfile.TemporaryDirectory(prefix="ckpt-select-tfevents-") as folder:
        local = Path(folder) / path.name
        local.write_bytes(path.read_bytes())
        return reader(str(local), extra_columns={"wall_time"}).scalars


def _scalars(path: Path):
    """tbparse's long scalar frame (step, tag, value, wall_time); errors translated."""
    try:
        from tbparse import SummaryReader
    except ImportError as e:  # pragma: no cover - tbparse is a dependency
        raise LogParseError(path, None, "reading TensorBoard files needs tbparse") from e
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    try:
        frame = _summary(path, SummaryReader)
    except Exception as e:  # tbparse/protobuf raise many types on corrupt files
        raise LogParseError(path, None, f"not a readable TensorBoard event file ({e})") from e
    if frame is None or frame.empty:
        raise LogParseError(path, None, "no scalar values in this event file")
    return frame
