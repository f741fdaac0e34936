"""PyTorch distributed checkpoints (DCP): a folder with ``.metadata`` and ``__N_M.distcp`` files.

Read in one process with ``torch.distributed.checkpoint.load(no_dist=True)``: no
process group. One tensor is loaded at a time by asking DCP for just that key. The
``.metadata`` file is a plain pickle that torch reads with ``pickle.load``; here it
is read with an unpickler that allows only DCP's own metadata classes, torch dtypes
and sizes, so a crafted ``.metadata`` cannot run code.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointReadError
from ..remote import RemotePath, as_path
from .base import DTYPE_BYTES, TensorInfo, dtype_name
from .keys import KeyMap
from .optim import SAVED_LR, as_learning_rate

if TYPE_CHECKING:
    import torch
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

METADATA_FILE = ".metadata"
MEGATRON_COMMON = "common.pt"   # Megatron-LM torch_dist: the non-sharded state (iteration, args)
# Top-level keys under which trainers save optimizer state next to the model.
OPTIMIZER_PREFIXES = ("optimizer.", "optim.", "optimizer_state.")
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                    "torch.distributed.checkpoint.planner")
_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                    ("pathlib", "PurePosixPath"), ("pathlib", "Path"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``.metadata`` legitimately needs."""

    def find_class(self, module: str, name: str) -> object:
        # No dotted names: protocol 4 resolves "os.system" through any allowed module's attributes.
        if "." not in name:
            if (module, name) in _ALLOWED_GLOBALS:
                return super().find_class(module, name)
            if module in _ALLOWED_MODULES:
                found = super().find_class(module, name)
                if isinstance(found, type) and found.__module__ == module:   # DCP's own dataclasses and enums
                    return found
            import torch
            if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_metadata(folder: Path) -> "Metadata":
    """The folder's DCP metadata, unpickled safely.

    Raises:
        CheckpointReadError: missing, truncated, or asking for a forbidden global.
    """
    from torch.distributed.checkpoint.metadata import Metadata   # late: torch.distributed costs ~0.8 s to import

    path = folder / METADATA_FILE
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(path, f"refused to load: {e} (CkptSelect never runs code from a checkpoint)") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointReadError(path, f"not readable DCP metadata, truncated or corrupt ({e or type(e).__name__})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointReadError(path, f"holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def _safe_reader(folder: Path) -> object:
    """A FileSystemReader whose metadata goes through the restricted unpickler (tensor data is
    already loaded by DCP with ``torch.load(weights_only=True)``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    remote = isinstance(folder, RemotePath)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    base = FsspecReader if remote else dcp.FileSystemReader

    class SafeReader(base):   # type: ignore[misc, valid-type]
        def read_metadata(self, *args: object, **kwargs: object) -> object:
            metadata = read_metadata(as_path(self.path) if remote else Path(self.path))
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    if not remote:
        return SafeReader(folder)
    reader = SafeReader(folder.url)
    reader.fs = _ranged_file_system()   # exact, counted ranges instead of fsspec's read-ahead (issue 22)
    return reader


def _ranged_file_system() -> object:
    """torch's fsspec file system for DCP, opening each ``.distcp`` file as our ranged, counted file (issue 22).

    torch's own opens it with fsspec's default cache, which reads ahead in large blocks.
    """
    from contextlib import contextmanager

    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem

    class RangedFileSystem(FileSystem):
        @contextmanager
        def create_stream(self, path: object, mode: str):   # type: ignore[override]
            if mode != "rb":
                raise CheckpointReadError(Path(str(path)), "remote DCP checkpoints are read-only here")
            with RemotePath(str(path)).open("rb") as stream:
                yield stream

    return RangedFileSystem()


class DCPHandle:
    """Model tensors of a DCP folder (optimizer entries split off), loaded one key at a time."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = read_metadata(folder)
        entries = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self._missing_files(folder)
        optim = {k: v for k, v in entries.items() if k.startswith(OPTIMIZER_PREFIXES) and len(v.size) > 0}
        rest = {k: v for k, v in entries.items() if not k.startswith(OPTIMIZER_PREFIXES)}
        # Trainers save {"model": ..., "optimizer": ..., "train_state": ...}: when a "model" group
        # exists it is the weights, and the other groups are training state, not parameters.
        grouped = {k: v for k, v in rest.items() if k.startswith("model.")}
        # The "model." group is DCP's flattening, not part of the model's own key names.
        self._group = "model." if grouped else ""
        model = grouped or rest
        self.keys = KeyMap(k.removeprefix(self._group) for k in model)
        self._entries = entries
        self._model = model
        self._infos = [_info(self.keys.normalize(k.removeprefix(self._group)), v) for k, v in model.items()]
        self._optim_names = {_moment_name(k): k for k in optim}
        self._optim_infos = [_info(name, entries[k]) for name, k in self._optim_names.items()]
        self._metadata = {**_megatron_common(folder), **self._scalar_metadata(rest)}
        self._lr_item = _saved_lr_item(metadata)   # read on the first metadata() call

    @staticmethod
    def _missing_files(folder: Path) -> None:
        if not any(folder.glob("*.distcp")):
            raise CheckpointReadError(folder, "DCP metadata present but no .distcp data files")

    def _scalar_metadata(self, model: dict) -> dict[str, str]:
        """Scalar tensors named step/epoch/tokens (e.g. ``train_state.step``) become metadata."""
        meta: dict[str, str] = {}
        for key, entry in model.items():
            last = key.rsplit(".", 1)[-1]
            if last in ("step", "global_step", "epoch", "tokens", "iter_num") and len(entry.size) == 0:
                value = self._load(key, entry)
                meta[last] = str(value.item())
        if "global_step" in meta and "step" not in meta:
            meta["step"] = meta["global_step"]
        return meta

    def _load(self, key: str, entry: "TensorStorageMetadata") -> torch.Tensor:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        target = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # "assuming the intent is to load in a single process"
                dcp.load(target, storage_reader=_safe_reader(self.path), no_dist=True)
        except CheckpointReadError:
            raise
        except (Exception, CheckpointException) as e:  # DCP wraps failures (truncated .distcp) in a BaseException
            raise CheckpointReadError(self.path, f"tensor {key!r} could not be read, a .distcp file is truncated "
                                                 f"or corrupt ({_last_line(e)})") from None
        return target[key]

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> torch.Tensor:
        key = self._group + self.keys.original(name)
        if key not in self._model:
            key = name   # the flattened DCP key itself
        if key not in self._model:
            raise CheckpointReadError(self.path, f"no tensor named {name!r}")
        return self._load(key, self._entries[key])

    def original_name(self, name: str) -> str:
        return self.keys.original(name)

    def metadata(self) -> dict[str, str]:
        if self._lr_item is not None:
            lr = _read_saved_lr(self.path, self._lr_item)
            if lr is not None:
                self._metadata[SAVED_LR] = repr(lr)
            self._lr_item = None
        return dict(self._metadata)

    def optimizer_state(self) -> list[TensorInfo]:
        return list(self._optim_infos)

    def read_optimizer(self, name: str) -> torch.Tensor:
        key = self._optim_names.get(name)
        if key is None:
            raise CheckpointReadError(self.path, f"no optimizer tensor named {name!r}")
        return self._load(key, self._entries[key])

    def ema_tensors(self) -> list[TensorInfo]:
        return []

    def close(self) -> None:
        pass

    def __enter__(self) -> "DCPHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _megatron_common(folder: Path) -> dict[str, str]:
    """Megatron-LM ``torch_dist``: the ``iteration`` (the step) in the folder's ``common.pt``, weights-only (issue 21).

    A ``common.pt`` that cannot be read plainly costs only that metadata: the step then comes from the
    ``iter_NNNNNNN`` folder name.
    """
    from .torch_pickle import checkpoint_metadata, safe_torch_load

    path = folder / MEGATRON_COMMON
    if not path.is_file():
        return {}
    try:
        payload = safe_torch_load(path, plain_numpy=True)
    except CheckpointReadError:
        return {}
    meta = checkpoint_metadata(payload) if isinstance(payload, dict) else {}
    return {k: meta[k] for k in ("step", "iteration", "checkpoint_version") if k in meta}


def _last_line(error: BaseException) -> str:
    """The innermost cause of a DCP failure (its message embeds a remote-style traceback)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _saved_lr_item(metadata: "Metadata") -> object | None:
    """Where the first parameter's ``lr`` of the optimizer's param groups is stored, if it was saved.

    ``get_optimizer_state_dict(flatten_optimizer_state_dict=True)`` (torchtitan, torch's own helpers)
    keeps every parameter's group settings as ``optimizer.param_groups.<param>.lr``: a small
    ``torch.save`` blob, not a tensor.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    for key, entry in metadata.state_dict_metadata.items():
        group, _, rest = key.partition(".")
        if (isinstance(entry, BytesStorageMetadata) and f"{group}." in OPTIMIZER_PREFIXES
                and rest.startswith("param_groups.") and rest.endswith(".lr")):
            return (metadata.storage_data or {}).get(MetadataIndex(key))
    return None


def _read_saved_lr(folder: Path, item: object) -> float | None:
    """The float a param-group ``lr`` blob holds (weights-only load), or None if it cannot be read plainly."""
    import torch

    relative, offset, length = (getattr(item, name, None) for name in ("relative_path", "offset", "length"))
    if getattr(item, "transform_descriptors", None) or not isinstance(relative, str) or not length:
        return None   # compressed or otherwise transformed storage: the LR is optional, skip it
    path = folder / relative
    if path.resolve().parent != folder.resolve():
        return None   # a .metadata pointing outside the checkpoint folder
    try:
        with path.open("rb") as f:
            f.seek(int(offset or 0))
            blob = io.BytesIO(f.read(int(length)))
        value = torch.load(blob, weights_only=True, map_location="cpu")
    except Exception:   # noqa: BLE001 - a damaged blob loses the LR, never the checkpoint
        return None
    return as_learning_rate(value)


# Megatron-LM's torch_dist puts the moment first: ``optimizer.state.exp_avg.decoder.layers.0....weight``.
_MOMENT_FIRST = ("exp_avg.", "exp_avg_sq.", "fp32_param.")


def _moment_name(key: str) -> str:
    """``optimizer.state.layer.weight.exp_avg`` -> ``layer.weight.exp_avg`` (the handle's optimizer naming);
    Megatron's ``optimizer.state.exp_avg.layer.weight`` -> ``layer.weight.exp_avg`` (issue 21)."""
    group, _, rest = key.partition(".")
    if not rest.startswith("state."):
        return key
    rest = rest.removeprefix("state.")
    first = next((m for m in _MOMENT_FIRST if rest.startswith(m)), None)
    return f"{rest.removeprefix(first)}.{first[:-1]}" if first else rest


def _info(name: str, entry: "TensorStorageMetadata") -> TensorInfo:
    dtype = dtype_name(entry.properties.dtype)
    numel = 1
    for dim in entry.size:
        numel *= int(dim)
    return TensorInfo(name, tuple(int(d) for d in entry.size), dtype, numel * DTYPE_BYTES.get(dtype, 4))


class DCPReader:
    """A torch.distributed.checkpoint folder."""

    name = "dcp"
    description = "PyTorch distributed checkpoint folder (.metadata + __N_M.distcp), read in one process"

    def matches(self, path: Path) -> bool:
        return path.is_dir() and (path / METADATA_FILE).is_file()

    def files(self, path: Path) -> list[Path]:
        return [path / METADATA_FILE] + sorted(path.glob("*.distcp"))

    def open(self, path: Path) -> DCPHandle:
        return DCPHandle(path)
