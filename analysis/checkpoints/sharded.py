"""Sharded checkpoints behind an index: ``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``.

The index maps each tensor to its shard. Listing reads only the shards' headers
(safetensors) and every shard is memory-mapped, so reading one tensor touches that
tensor's pages, never the rest of a multi-gigabyte shard. Every shard the index
names must exist before anything is returned: nothing is half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import CheckpointReadError
from .base import CheckpointHandle, TensorInfo
from .keys import KeyMap
from .safetensors_file import SafetensorsHandle
from .torch_pickle import TorchPickleHandle

if TYPE_CHECKING:
    import torch

INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def read_index(index_path: Path) -> tuple[dict[str, str], dict]:
    """(tensor name -> shard file name, the index's ``metadata``), validated.

    Raises:
        CheckpointReadError: unreadable JSON, no ``weight_map`` (or one whose values are not file
            names), a shard named outside the index's folder (issue 19), or a shard that is missing.
    """
    try:
        doc = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointReadError(index_path, f"index is not readable JSON ({e})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointReadError(index_path, "index has no weight_map")
    not_names = [f"{k!r}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if not_names:   # a shard is a file name; str(5) would open a file named "5" (issue 19)
        raise CheckpointReadError(index_path, f"weight_map values must be shard file names, got {', '.join(not_names[:3])}")
    _check_shard_names(index_path, weight_map.values())
    missing = sorted({s for s in weight_map.values() if not (index_path.parent / str(s)).is_file()})
    if missing:
        raise CheckpointReadError(index_path, f"index points at missing shard(s): {', '.join(missing)}")
    return {str(k): str(v) for k, v in weight_map.items()}, doc.get("metadata") or {}


def _check_shard_names(index_path: Path, shards) -> None:
    """Refuse a shard name that leaves the index's folder (``../../x``, ``/abs/x``): the format has no such meaning.

    The test is on the name, not on the resolved file: a shard that is a symlink (the Hugging Face hub
    cache links every snapshot file to ``../../blobs``) stays a file of this folder. Under ``ui --root``,
    :func:`analysis.run.open_run` also resolves every shard against the root (issue 19).

    Raises:
        CheckpointReadError: naming the index and the first such shard.
    """
    for shard in dict.fromkeys(str(s) for s in shards):
        name = Path(shard)
        if name.is_absolute() or ".." in name.parts or name.drive:
            raise CheckpointReadError(index_path, f"index names shard {shard!r} outside its own folder; "
                                                  "a weight_map names files in the index's own folder")


def _shard_opener(index_path: Path) -> Callable[[Path], CheckpointHandle]:
    if index_path.name.endswith(".safetensors.index.json"):
        return lambda p: SafetensorsHandle(p, normalize=False)
    return lambda p: TorchPickleHandle(p, normalize=False)


class ShardedHandle:
    """All shards of one checkpoint as a single lazy handle, in the index's tensor order."""

    def __init__(self, index_path: Path) -> None:
        self.path = index_path
        weight_map, index_meta = read_index(index_path)
        opener = _shard_opener(index_path)
        self._shards: dict[str, CheckpointHandle] = {}
        infos: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        for shard in dict.fromkeys(weight_map.values()):
            handle = opener(index_path.parent / shard)
            self._shards[shard] = handle
            infos.update({i.name: i for i in handle.tensors()})
            metadata.update(handle.metadata())
        absent = [n for n, s in weight_map.items() if n not in infos]
        if absent:
            raise CheckpointReadError(index_path, f"index lists tensors its shards lack: {', '.join(absent[:5])}")
        self._where = weight_map
        self.keys = KeyMap(weight_map)
        self._infos = [_renamed(infos[n], self.keys.normalize(n)) for n in weight_map]
        self._metadata = {**metadata, **{f"index.{k}": str(v) for k, v in index_meta.items()}}

    def files(self) -> list[Path]:
        return [self.path] + [self.path.parent / s for s in self._shards]

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def original_name(self, name: str) -> str:
        return self.keys.original(name)

    def read(self, name: str) -> torch.Tensor:
        original = self.keys.original(name)
        if original not in self._where:
            raise CheckpointReadError(self.path, f"no tensor named {name!r}")
        return self._shards[self._where[original]].read(original)

    def locate(self, name: str):
        """The raw location inside the shard holding ``name`` (None for pickle shards)."""
        original = self.keys.original(name)
        method = getattr(self._shards[self._where[original]], "locate", None)
        return method(original) if callable(method) else None

    def shard_sizes(self) -> list[int]:
        """Bytes of each shard file (the output mirrors the largest as its shard size)."""
        return [(self.path.parent / s).stat().st_size for s in self._shards]

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def close(self) -> None:
        for handle in self._shards.values():
            handle.close()

    def __enter__(self) -> "ShardedHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _renamed(info: TensorInfo, name: str) -> TensorInfo:
    return TensorInfo(name, info.shape, info.dtype, info.size_bytes)


def shard_files(index_path: Path) -> list[Path]:
    """The index and every shard it names (hashed for recipes)."""
    weight_map, _ = read_index(index_path)
    return [index_path] + [index_path.parent / s for s in dict.fromkeys(weight_map.values())]


class ShardedIndexReader:
    """An index file claimed directly, for runs that keep one sharded model loose in the run folder."""

    name = "sharded_index"
    description = "sharded weights behind model.safetensors.index.json or pytorch_model.bin.index.json"

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.name.endswith(INDEX_SUFFIXES)

    def files(self, path: Path) -> list[Path]:
        return shard_files(path)

    def open(self, path: Path) -> ShardedHandle:
        return ShardedHandle(path)
