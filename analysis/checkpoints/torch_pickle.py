"""torch.save checkpoints: plain state dicts, nanoGPT ``ckpt.pt``, Lightning ``.ckpt``, timm/fairseq.

Every layout here is "a pickle whose state dict lives under some key", so one reader
serves them all. Safety first: files are opened only with
``torch.load(weights_only=True)``, memory-mapped where the zip format allows, so
listing tensors reads the pickle's structure, not its data. A file that needs any
global beyond tensors and plain containers is refused, naming the global; it is
never retried unsafely.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import CheckpointReadError, NotACheckpoint
from ..remote import RemotePath
from .base import TensorInfo, is_tensor, tensor_info
from .keys import KeyMap
from .optim import SAVED_LR, moments_by_name, saved_adam_counters, saved_learning_rate
from .torch_writer import read_merge_metadata

if TYPE_CHECKING:
    import torch

    from .torch_remote import RemoteTorchFile

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar"}
# Files that sit beside weights but are not a model (HF Trainer, Lightning).
OPTIMIZER_SHARD_SUFFIX = "_optim_states.pt"   # DeepSpeed's zero_pp_rank_R_mp_rank_00_optim_states.pt
NOT_A_MODEL = {"optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth", "scaler.pt"}
# Where the model weights live in a checkpoint dict, most specific first.
WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema", "ema_model")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_states", "optim")
STEP_KEYS = ("step", "global_step", "iter_num", "iteration", "num_updates", "steps", "global_steps")
TOKEN_KEYS = ("tokens", "tokens_seen", "num_input_tokens_seen", "consumed_tokens", "num_tokens")
BEST_KEYS = ("best_val_loss", "best_metric", "best_model_score", "best_loss", "best_acc", "best_score", "metric")
# Enough of a file's head to see torch's zip entry name or legacy magic number (protocol 4+ frames it).
TORCH_HEAD_BYTES = 64
# torch.save's legacy format pickles this number (0x1950a86a20f9469cfc6c, a LONG1 of 10 bytes) first.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# How torch's weights-only unpickler names the global it refused, most specific first.
_GLOBAL_PATTERNS = (re.compile(r"GLOBAL ([\w.]+)"), re.compile(r"Unsupported class ([\w.]+)"),
                    re.compile(r"global ([\w.]+)"))


def _data_only_globals() -> list:
    """Globals that build plain data and nothing else, which real checkpoints carry next to the
    weights: numpy scalars (``best_val_loss = np.float64(...)``), fairseq's ``argparse.Namespace``
    args. Allowed per call (never added to torch's process-wide allowlist)."""
    import argparse

    import numpy as np
    from numpy._core.multiarray import scalar
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n[0].isupper()
              and any(k in n for k in ("Float", "Int", "Bool", "UInt"))]
    return [argparse.Namespace, scalar, np.dtype, *dtypes]


def _numpy_array_globals() -> list:
    """What a pickled numpy array needs (Megatron saves ``np.random.get_state()``): plain data, no code."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray]


def safe_torch_load(path: Path, plain_numpy: bool = False, plain_data: Sequence[tuple[type, str]] = (),
                    remote: "RemoteTorchFile | None" = None) -> object:
    """``torch.load(weights_only=True)``, memory-mapped when the file's format allows.

    A remote file (a ``RemotePath``) is fetched whole when small; given ``remote`` (a
    :class:`~.torch_remote.RemoteTorchFile` of ``path``) a large one is loaded lazily, its tensors
    on the meta device until ``remote.fetch`` reads each by its range (issue 22).

    ``plain_numpy`` also allows numpy arrays (for layouts that pickle an RNG state beside the weights);
    ``plain_data`` maps a library's global name to a plain-data class of ours that stands in for it (the
    library's code never runs, only our class, which holds fields and nothing else).

    Raises:
        CheckpointReadError: the file is truncated, not a torch file, or needs a global
            that weights-only loading forbids (the message names it).
    """
    import torch   # late: reading safetensors inputs never needs torch (its import is ~1.3 s)

    try:
        allowed = _data_only_globals() + (_numpy_array_globals() if plain_numpy else []) + list(plain_data)
        with torch.serialization.safe_globals(allowed):
            if isinstance(path, RemotePath):
                from .torch_remote import RemoteTorchFile
                return (remote or RemoteTorchFile(path)).load(lazy=remote is not None)
            try:
                return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
                # Legacy (pre-1.6) files cannot be mapped; still weights-only.
                return torch.load(path, weights_only=True, mmap=False, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(path, _refusal(str(e))) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointReadError(path, f"not a readable torch file, truncated or corrupt ({first})") from None


def _refusal(message: str) -> str:
    """The user-facing reason a weights-only load was refused."""
    matches = (p.search(message) for p in _GLOBAL_PATTERNS)
    wanted = next((m.group(1) for m in matches if m), None)
    what = f"the global {wanted}" if wanted else "code beyond tensors and plain containers"
    return (f"refused to load: the pickle needs {what}, which weights-only loading forbids "
            "(a checkpoint can run code when unpickled; CkptSelect never does that). "
            "Hint: re-save the weights with safetensors or a plain state_dict.")


def flatten_tensors(tree: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested dict, with dotted names (nested state dicts, e.g. fairseq ``model``)."""
    out: dict[str, torch.Tensor] = {}
    if is_tensor(tree):
        out[prefix.rstrip(".")] = tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            if is_tensor(value) or isinstance(value, dict):
                out.update(flatten_tensors(value, f"{prefix}{key}."))
    return out


def _is_state_dict(value: object) -> bool:
    """A non-empty mapping whose values are all tensors (possibly nested)."""
    return isinstance(value, dict) and bool(value) and all(
        is_tensor(v) or _is_state_dict(v) for v in value.values())


def split_payload(payload: object, path: Path) -> tuple[dict, dict, object, dict[str, str]]:
    """(weights, EMA weights, optimizer state or None, metadata) of a loaded checkpoint."""
    if _is_state_dict(payload):
        return flatten_tensors(payload), {}, None, {}
    if not isinstance(payload, dict):
        raise NotACheckpoint(path, f"holds a {type(payload).__name__}, not a state dict or a checkpoint dict")
    weights_key = next((k for k in WEIGHT_KEYS if _is_state_dict(payload.get(k))), None)
    if weights_key is None:
        keys = ", ".join(sorted(map(str, payload))[:12])
        raise NotACheckpoint(path, f"holds no state dict (looked under {', '.join(WEIGHT_KEYS)}; keys: {keys})")
    ema_key = next((k for k in EMA_KEYS if _is_state_dict(payload.get(k))), None)
    ema = flatten_tensors(payload[ema_key]) if ema_key else _callback_ema(payload.get("callbacks"))
    optimizer = next((payload[k] for k in OPTIMIZER_KEYS if payload.get(k) is not None), None)
    if isinstance(optimizer, list):   # Lightning: one state dict per optimizer
        optimizer = optimizer[0] if optimizer else None
    meta = checkpoint_metadata(payload)
    lr = saved_learning_rate(optimizer)
    if lr is not None:
        meta[SAVED_LR] = repr(lr)
    meta.update(saved_adam_counters(optimizer))
    return flatten_tensors(payload[weights_key]), ema, optimizer, meta


def _callback_ema(callbacks: object) -> dict[str, torch.Tensor]:
    """EMA weights kept by a Lightning callback (its state dict holds a tensor mapping under an *ema* key)."""
    if not isinstance(callbacks, dict):
        return {}
    for name, state in callbacks.items():
        if not isinstance(state, dict):
            continue
        for key, value in state.items():
            if ("ema" in str(key).lower() or "ema" in str(name).lower()) and _is_state_dict(value):
                return flatten_tensors(value)
    return {}


def checkpoint_metadata(payload: dict) -> dict[str, str]:
    """Training metadata as strings: every scalar at the top level and in ``model_args``/``config``,
    plus the canonical ``step``, ``epoch``, ``tokens``, ``best_metric`` (and ``best_metric_name``)."""
    meta: dict[str, str] = {}
    for key, value in payload.items():
        if _scalar(value) is not None:
            meta[str(key)] = _scalar(value)
    for group in ("model_args", "config", "hyper_parameters", "args"):
        values = vars(payload[group]) if hasattr(payload.get(group), "__dict__") else payload.get(group)
        if isinstance(values, dict):
            for key, value in values.items():
                if _scalar(value) is not None:
                    meta[f"{group}.{key}"] = _scalar(value)
    history = payload.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):   # fairseq
        if _scalar(history[-1].get("num_updates")) is not None:
            meta.setdefault("num_updates", _scalar(history[-1]["num_updates"]))
    _canonical(meta, "step", STEP_KEYS)
    _canonical(meta, "epoch", ("epoch", "epochs"))
    _canonical(meta, "tokens", TOKEN_KEYS)
    best = next((k for k in BEST_KEYS if k in meta), None) or _checkpoint_callback_best(payload, meta)
    if best is not None and "best_metric" not in meta:
        meta["best_metric"], meta["best_metric_name"] = meta[best], best
    return meta


def _checkpoint_callback_best(payload: dict, meta: dict[str, str]) -> str | None:
    """Lightning's ModelCheckpoint keeps ``best_model_score`` (and ``monitor``) in its callback state."""
    for name, state in (payload.get("callbacks") or {}).items() if isinstance(payload.get("callbacks"), dict) else ():
        if isinstance(state, dict) and _scalar(state.get("best_model_score")) is not None:
            meta["best_model_score"] = _scalar(state["best_model_score"])
            if isinstance(state.get("monitor"), str):
                meta["monitor"] = state["monitor"]
            return "best_model_score"
    return None


def _canonical(meta: dict[str, str], key: str, aliases: tuple[str, ...]) -> None:
    if key not in meta:
        found = next((a for a in aliases if a in meta), None)
        if found is not None:
            meta[key] = meta[found]


def _scalar(value: object) -> str | None:
    """A plain scalar (or a one-element tensor) as a string; None for anything else."""
    if isinstance(value, (bool, int, float, str)):
        return str(value) if not isinstance(value, str) or len(value) < 200 else None   # long strings are not metadata
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return str(value.item())
    if is_tensor(value) and value.numel() == 1:  # type: ignore[attr-defined]
        item = value.item()
        return str(int(item)) if float(item).is_integer() and not value.is_floating_point() else str(item)
    return None


class TensorTable:
    """Named tensors already mapped into memory, shown under normalised names."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], normalize: bool = True,
                 fetch: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> None:
        self.path = path
        self._tensors = tensors
        self._fetch = fetch   # reads a meta tensor of a large remote file (issue 22)
        self.keys = KeyMap(tensors if normalize else ())
        self.infos = [tensor_info(self.keys.normalize(n), t) for n, t in tensors.items()]

    def read(self, name: str) -> torch.Tensor:
        try:
            tensor = self._tensors[self.keys.original(name)]
        except KeyError:
            raise CheckpointReadError(self.path, f"no tensor named {name!r}") from None
        return self._fetch(tensor) if self._fetch is not None and tensor.is_meta else tensor


class TorchPickleHandle:
    """A loaded (memory-mapped) torch checkpoint: weights, EMA weights, optimizer moments."""

    def __init__(self, path: Path, normalize: bool = True) -> None:
        self.path = path
        remote = _remote_file(path)
        weights, ema, optimizer, self._metadata = split_payload(safe_torch_load(path, remote=remote), path)
        # A CkptSelect merge written as torch (issue 21); a remote file's records come from the bytes fetched.
        self._metadata.update(read_merge_metadata(remote.source() if remote else path))   # type: ignore[arg-type]
        fetch = remote.fetch if remote is not None and remote.lazy else None
        self._weights = TensorTable(path, weights, normalize, fetch)
        self._ema = TensorTable(path, ema, fetch=fetch)
        params = [i for i in self._weights.infos if i.is_floating]
        self._optimizer = TensorTable(path, moments_by_name(optimizer, params) if optimizer else {}, normalize=False,
                                      fetch=fetch)

    def tensors(self) -> list[TensorInfo]:
        return list(self._weights.infos)

    def read(self, name: str) -> torch.Tensor:
        return self._weights.read(name)

    def original_name(self, name: str) -> str:
        return self._weights.keys.original(name)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def optimizer_state(self) -> list[TensorInfo]:
        return list(self._optimizer.infos)

    def read_optimizer(self, name: str) -> torch.Tensor:
        return self._optimizer.read(name)

    def ema_tensors(self) -> list[TensorInfo]:
        return list(self._ema.infos)

    def read_ema(self, name: str) -> torch.Tensor:
        return self._ema.read(name)

    def close(self) -> None:
        self._weights = self._ema = self._optimizer = TensorTable(self.path, {})

    def __enter__(self) -> "TorchPickleHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remote_file(path: Path) -> "RemoteTorchFile | None":
    """A lazy reader for a remote torch file (None for a local one, which is memory-mapped instead)."""
    from .torch_remote import RemoteTorchFile

    return RemoteTorchFile(path) if isinstance(path, RemotePath) else None


class TorchPickleReader:
    """``torch.save`` files: .pt/.pth/.bin state dicts, nanoGPT, Lightning, timm, fairseq."""

    name = "torch_pickle"
    description = ("torch.save checkpoint (.pt/.pth/.bin/.ckpt): plain state dict, nanoGPT ckpt.pt, "
                   "Lightning .ckpt, timm/fairseq; weights_only=True, memory-mapped")

    def matches(self, path: Path) -> bool:
        if not path.is_file() or path.suffix not in PICKLE_SUFFIXES or path.name in NOT_A_MODEL:
            return False
        if path.name.startswith("rng_state") or path.name.endswith(OPTIMIZER_SHARD_SUFFIX):
            return False   # a DeepSpeed optimizer shard is never a checkpoint, even outside its tag folder (issue 21)
        if "-of-" in path.name and _sharded_sibling(path):
            return False
        try:
            if isinstance(path, RemotePath):   # 64 bytes, not the ranged file's first 100 KB (issue 22)
                size = path.stat().st_size
                head = path.read_range(0, min(TORCH_HEAD_BYTES, size)) if size else b""
            else:
                with path.open("rb") as handle:
                    head = handle.read(TORCH_HEAD_BYTES)
        except OSError:   # unreadable: claimed, so that opening it names the problem
            return True
        return is_torch_file_head(head)

    def files(self, path: Path) -> list[Path]:
        return [path]

    def open(self, path: Path) -> TorchPickleHandle:
        return TorchPickleHandle(path)


def is_torch_file_head(head: bytes) -> bool:
    """True if a file's first bytes are those ``torch.save`` writes (issue 19).

    A zip (torch >= 1.6) whose first entry is the pickle ``<name>/data.pkl``, or a legacy pickle stream
    that opens with torch's magic number. A token file or dataset that merely starts with byte 0x80
    (the pickle opcode PROTO) is not taken for a checkpoint. A head cut short inside the zip header
    (a save just begun, an empty file) is still claimed, so that the run lists it as being written.
    """
    if len(head) < 4:   # empty or a few bytes: a save that has just begun
        return b"PK\x03\x04".startswith(head) or head[:1] == b"\x80"
    if head.startswith(b"PK\x03\x04"):
        if len(head) < 30:
            return True
        name_len = int.from_bytes(head[26:28], "little")
        name = head[30:30 + name_len]
        return len(name) < name_len or name.endswith(b"data.pkl")
    return head[:1] == b"\x80" and _LEGACY_MAGIC in head


def _sharded_sibling(path: Path) -> bool:
    """True if ``path`` is a shard listed by an index beside it (the index is the checkpoint)."""
    return any(path.parent.glob("*.index.json"))
