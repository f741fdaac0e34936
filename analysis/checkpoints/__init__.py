"""Checkpoint readers, one layout per module, behind one lazy interface.

``CHECKPOINT_READERS`` is ordered: folder layouts come before file layouts so that a
folder that is one checkpoint (e.g. a sharded HF model) is claimed whole before its
files are looked at.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointReadError
from ..remote import RemotePath, as_path
from .base import (CheckpointHandle, CheckpointReader, TensorInfo, TrainingStateAccess, dtype_name, ema_tensors,
                   optimizer_state)
from .dcp import DCPReader
from .deepspeed import SKIPPED_NOTE, DeepSpeedReader
from .hf_folder import HFFolderReader
from .keys import original_name
from .megatron import MegatronReader
from .safetensors_file import SafetensorsFileReader
from .sharded import ShardedIndexReader
from .torch_pickle import TorchPickleReader

# Folder layouts first (a folder is claimed whole before its files are looked at), then files.
CHECKPOINT_READERS: dict[str, CheckpointReader] = {r.name: r for r in (
    DeepSpeedReader(), MegatronReader(), HFFolderReader(), DCPReader(), ShardedIndexReader(), SafetensorsFileReader(), TorchPickleReader(),
)}


def detect_layout(path: "Path | RemotePath") -> str | None:
    """The name of the reader that claims ``path`` (a local path or a ``RemotePath``), or None."""
    for name, reader in CHECKPOINT_READERS.items():
        if reader.matches(path):
            return name
    return None


def open_checkpoint(path: "str | Path | RemotePath", layout: str | None = None) -> CheckpointHandle:
    """Open a checkpoint lazily: a local path, or a URL (``s3://...``) read by exact byte ranges.

    Raises:
        CheckpointReadError: missing path, unknown layout, or an unreadable file.
    """
    path = as_path(path)
    if not path.exists():
        raise CheckpointReadError(path, "no such file or folder")
    name = layout or detect_layout(path)
    if name is None:
        known = ", ".join(CHECKPOINT_READERS)
        raise CheckpointReadError(path, f"not a checkpoint layout CkptSelect knows (known: {known})")
    return CHECKPOINT_READERS[name].open(path)


__all__ = [
    "CHECKPOINT_READERS",
    "SKIPPED_NOTE",
    "CheckpointHandle",
    "CheckpointReader",
    "TensorInfo",
    "TrainingStateAccess",
    "detect_layout",
    "dtype_name",
    "ema_tensors",
    "open_checkpoint",
    "optimizer_state",
    "original_name",
]
