"""DeepSpeed ZeRO checkpoints: ``global_stepN/`` folders, alone or inside an HF ``checkpoint-N/`` (issue 21).

``engine.save_checkpoint`` writes, per tag folder ``global_stepN/``, ``mp_rank_00_model_states.pt`` (the
16-bit weights under ``module``, ``global_steps``, ``param_shapes``: one ordered name -> shape mapping per
optimizer parameter group) and one ``*_optim_states.pt`` per data-parallel rank, whose
``optimizer_state_dict`` holds each group flattened into one vector and cut into equal partitions, one per
rank; a ``latest`` file beside the tags names the newest. :mod:`.deepspeed_moments` cuts Adam's moments
per parameter out of those partitions.

ZeRO-3 (``zero_pp_rank_R_mp_rank_00_model_states.pt``, parameters as empty placeholders) partitions each
parameter on its own; :mod:`.deepspeed_zero3` gathers the fp32 master (the weights) and the moments.

An optimizer shard is never a checkpoint of its own. Real shards pickle DeepSpeed objects (``LossScaler``,
``DynamicLossScaler``, ``ZeroStageEnum``, ``fragment_address``) that weights-only loading refuses; plain-data
stand-ins of ours (:data:`PLAIN_DATA`) take their fields, and no DeepSpeed code runs. Any other global skips
the optimizer part with a note and the weights are still read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointReadError, NotACheckpoint
from .base import CheckpointHandle, TensorInfo
from .deepspeed_moments import ZeroOptimizer, zero_optimizer
from .deepspeed_zero3 import Zero3Optimizer, Zero3Weights
from .hf_folder import HFFolderHandle, MARKER_FILES, SIDE_FILES, weights_file
from .keys import KeyMap
from .optim import SAVED_LR
from .sharded import shard_files
from .torch_pickle import TensorTable, checkpoint_metadata, flatten_tensors, safe_torch_load

if TYPE_CHECKING:
    import torch

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM_GLOB = "*_optim_states.pt"
LATEST_FILE = "latest"
# Metadata key carrying why a part of a checkpoint was passed over; the run lists it as a note.
SKIPPED_NOTE = "ckpt_select_skipped"
_TAG = re.compile(r"global_step(\d+)")


class LossScalerState:
    """Plain-data stand-in for DeepSpeed's ``LossScaler``, pickled in every fp16 optimizer shard: the
    unpickler only fills its fields (``cur_scale``, ``dynamic``...); no DeepSpeed code runs (issue 21)."""

    cur_scale: float = 1.0
    dynamic: bool = False


class DynamicLossScalerState(LossScalerState):
    """Plain-data stand-in for DeepSpeed's ``DynamicLossScaler`` (``scale_window``, ``min_scale``... as fields)."""

    dynamic = True


@dataclass
class FragmentAddress:
    """Plain-data stand-in for DeepSpeed's ``fragment_address`` (numel, start), pickled in every
    ``param_slice_mappings``: fields only, so a shard that needs nothing else still loads weights-only."""

    numel: int = 0
    start: int = 0


# DeepSpeed globals that are plain data, and what stands in for them. A shard that pickles any other
# DeepSpeed global skips the optimizer part with a note (issue 21).
PLAIN_DATA: tuple[tuple[type, str], ...] = (
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),   # an IntEnum: pickled as ZeroStageEnum(2)
    (LossScalerState, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DynamicLossScalerState, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
)
_RANK = re.compile(r"zero_pp_rank_(\d+)_")


def tag_folder(path: Path) -> Path | None:
    """The ``global_stepN/`` folder ``path`` is (or, for an HF ``checkpoint-N/``, holds); None if neither."""
    if (path / MODEL_STATES).is_file() or (path / ZERO3_MODEL_STATES).is_file():
        return path
    if not any((path / m).is_file() for m in MARKER_FILES) and weights_file(path) is None:
        return None   # a folder of several DeepSpeed saves is a run, not one checkpoint
    latest = path / LATEST_FILE
    named = latest.read_text(errors="replace").strip() if latest.is_file() else ""
    if named and "/" not in named and tag_folder_of(path / named):
        return path / named
    tags = sorted((p for p in path.glob("global_step*") if tag_folder_of(p)), key=_tag_number)
    return tags[-1] if tags else None


def tag_folder_of(path: Path) -> bool:
    """True if ``path`` is a DeepSpeed tag folder (it holds the model states file)."""
    return path.is_dir() and ((path / MODEL_STATES).is_file() or (path / ZERO3_MODEL_STATES).is_file())


def _tag_number(path: Path) -> int:
    match = _TAG.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def optimizer_shards(tag: Path) -> list[Path]:
    """The tag's optimizer shards in rank order (``zero_pp_rank_10`` after ``zero_pp_rank_9``)."""
    def rank(p: Path) -> int:
        match = _RANK.search(p.name)
        return int(match.group(1)) if match else 0
    return sorted(tag.glob(OPTIM_GLOB), key=lambda p: (rank(p), p.name))


def _rank_states(tag: Path, states: dict, world: int) -> list[dict]:
    """Every rank's ZeRO-3 model states where frozen parameters need their pieces; else rank 0's alone."""
    if not states.get("frozen_param_shapes"):
        return [states]
    out = [states]
    for rank in range(1, world):
        path = tag / ZERO3_MODEL_STATES.replace("rank_0_", f"rank_{rank}_", 1)
        loaded = safe_torch_load(path) if path.is_file() else None
        if not isinstance(loaded, dict):
            raise CheckpointReadError(path, "missing or not DeepSpeed model states: the frozen parameters' pieces "
                                            "of this rank are needed")
        out.append(loaded)
    return out


# Weights held as named tensors (the 16-bit module, ZeRO-3's gathered master) rather than an HF handle.
_TABLES = (TensorTable, Zero3Weights)


class DeepSpeedHandle:
    """Weights of one DeepSpeed tag (or of the HF folder holding it), its step, and its Adam moments."""

    def __init__(self, path: Path) -> None:
        self.path = path
        tag = tag_folder(path)
        if tag is None:
            raise CheckpointReadError(path, f"no DeepSpeed global_stepN/ folder with {MODEL_STATES}")
        self.tag = tag
        hf = weights_file(path) is not None
        zero3 = not (tag / MODEL_STATES).is_file()
        states_file = tag / (ZERO3_MODEL_STATES if zero3 else MODEL_STATES)
        states = safe_torch_load(states_file)
        if not isinstance(states, dict):
            raise NotACheckpoint(states_file, f"holds a {type(states).__name__}, not DeepSpeed model states")
        self._metadata = _ds_metadata(tag, states)
        self._optimizer: ZeroOptimizer | Zero3Optimizer | None = None
        if hf:
            self._weights: CheckpointHandle | TensorTable | Zero3Weights = HFFolderHandle(path)
            self._metadata.update(self._weights.metadata())
        elif zero3:
            self._weights = self._open_zero3(tag, states)
            return
        else:
            self._weights = _module_table(states_file, states)
        self._optimizer = self._open_optimizer(tag, states)

    def _open_zero3(self, tag: Path, states: dict) -> Zero3Weights:
        """ZeRO-3 without HF weights: the fp32 master in the optimizer shards is the weights (and the moments)."""
        shards = optimizer_shards(tag)
        if not shards:
            raise CheckpointReadError(tag, f"ZeRO-3 checkpoint without its {OPTIM_GLOB} files: the weights are "
                                           "partitioned over them")
        try:
            payloads = [safe_torch_load(shard, plain_data=PLAIN_DATA) for shard in shards]
        except CheckpointReadError as e:   # the weights live in the shards: no skipping here
            raise CheckpointReadError(e.path, f"{_first_sentence(e.reason)} Hint: DeepSpeed's zero_to_fp32.py "
                                              "writes these ZeRO-3 weights as a plain state dict") from None
        weights = Zero3Weights(tag, shards, payloads, _rank_states(tag, states, len(shards)))
        try:
            self._optimizer = Zero3Optimizer(payloads, weights.layout, weights.keys)
            self._note_optimizer(self._optimizer)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            self._skip(f"optimizer moments skipped, the weights are read: {tag.name}: {e}")
        return weights

    def _open_optimizer(self, tag: Path, states: dict) -> ZeroOptimizer | Zero3Optimizer | None:
        """The moments, or None with a note in the metadata saying why they were skipped."""
        shards = optimizer_shards(tag)
        shapes = states.get("param_shapes")
        if not shards or not isinstance(shapes, list):
            return None
        try:
            payloads = [safe_torch_load(shard, plain_data=PLAIN_DATA) for shard in shards]
            keys = KeyMap(str(n) for group in shapes for n in group)
            optimizer = zero_optimizer(payloads, shapes, keys)
        except CheckpointReadError as e:
            self._skip(f"optimizer state skipped, the weights are read: {e.path.name}: {_first_sentence(e.reason)}")
            return None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            self._skip(f"optimizer state skipped, the weights are read: {tag.name}: {e}")
            return None
        self._note_optimizer(optimizer)
        return optimizer

    def _note_optimizer(self, optimizer: ZeroOptimizer | Zero3Optimizer) -> None:
        """The saved learning rate and Adam's step count and β2 (for the bias correction) in the metadata."""
        if optimizer.lr is not None:
            self._metadata[SAVED_LR] = repr(optimizer.lr)
        self._metadata.update(optimizer.counters)

    def _skip(self, note: str) -> None:
        self._metadata[SKIPPED_NOTE] = note

    def tensors(self) -> list[TensorInfo]:
        return list(self._weights.tensors() if not isinstance(self._weights, _TABLES) else self._weights.infos)

    def read(self, name: str) -> "torch.Tensor":
        return self._weights.read(name)

    def original_name(self, name: str) -> str:
        if isinstance(self._weights, _TABLES):
            return self._weights.keys.original(name)
        return self._weights.original_name(name)  # type: ignore[union-attr]

    def locate(self, name: str):
        """Raw location of a weight (HF safetensors weights only; None otherwise)."""
        method = getattr(self._weights, "locate", None)
        return method(name) if callable(method) else None

    @property
    def weights(self) -> object:
        """The handle of the weight file(s) the merge mirrors (HF weights), else this handle."""
        return getattr(self._weights, "weights", self)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def optimizer_state(self) -> list[TensorInfo]:
        return list(self._optimizer.infos) if self._optimizer else []

    def read_optimizer(self, name: str) -> "torch.Tensor":
        try:
            if self._optimizer is None:
                raise KeyError(name)
            return self._optimizer.read(name)
        except KeyError:
            raise CheckpointReadError(self.tag, f"no optimizer tensor named {name!r}") from None

    def ema_tensors(self) -> list[TensorInfo]:
        return []

    def close(self) -> None:
        if not isinstance(self._weights, _TABLES):
            self._weights.close()
        self._optimizer = None

    def __enter__(self) -> "DeepSpeedHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _module_table(path: Path, states: dict) -> TensorTable:
    """The 16-bit weights DeepSpeed keeps under ``module``."""
    module = states.get("module")
    tensors = flatten_tensors(module) if isinstance(module, dict) else {}
    if not tensors:
        raise NotACheckpoint(path, "holds no weights under 'module'")
    if all(t.numel() == 0 for t in tensors.values()):
        raise CheckpointReadError(path, "ZeRO-3 placeholders only: the weights are partitioned over the optimizer "
                                        "shards; run DeepSpeed's zero_to_fp32.py first")
    return TensorTable(path, tensors)


def _ds_metadata(tag: Path, states: dict) -> dict[str, str]:
    """Scalars of the model states, with ``step`` from ``global_steps`` (else the tag's number)."""
    meta = checkpoint_metadata({k: v for k, v in states.items() if k not in ("module", "param_shapes")})
    steps = meta.get("global_steps")
    number = _tag_number(tag)
    if steps is not None and steps.isdigit():
        meta["step"] = steps
    elif number >= 0:
        meta["step"] = str(number)
    meta["deepspeed_tag"] = tag.name
    return meta


def _first_sentence(text: str) -> str:
    """A refusal's reason without the re-save hint, which points at the wrong remedy for an optimizer shard."""
    return text.split(" Hint:", 1)[0]


class DeepSpeedReader:
    """A DeepSpeed ``global_stepN/`` tag folder, or an HF ``checkpoint-N/`` folder holding one."""

    name = "deepspeed"
    description = ("DeepSpeed ZeRO 1/2/3 checkpoint: global_stepN/ (mp_rank_00_model_states.pt weights under 'module'; "
                   "ZeRO-3: the fp32 master gathered from the shards; "
                   "*_optim_states.pt Adam moments), alone or in an HF checkpoint-N/ with model.safetensors")

    def matches(self, path: Path) -> bool:
        try:
            return path.is_dir() and tag_folder(path) is not None
        except OSError:
            return False

    def files(self, path: Path) -> list[Path]:
        source = weights_file(path)
        if source is not None:   # HF weights: hashed like hf_folder's; the DeepSpeed states are training state
            weights = shard_files(source) if source.name.endswith(".index.json") else [source]
            return weights + [path / f for f in SIDE_FILES if (path / f).is_file()]
        tag = tag_folder(path)
        if tag is None:
            return []
        if (tag / MODEL_STATES).is_file():
            return [tag / MODEL_STATES]
        return [tag / ZERO3_MODEL_STATES, *optimizer_shards(tag)]   # ZeRO-3: the weights are in the shards

    def open(self, path: Path) -> DeepSpeedHandle:
        return DeepSpeedHandle(path)


__all__ = ["DeepSpeedHandle", "DeepSpeedReader", "SKIPPED_NOTE"]
