"""Megatron-LM's legacy checkpoints: ``iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt`` (issue 21).

Each tensor-parallel rank ``TT`` (and pipeline stage ``PPP``) saves its own slice of the model under
``model`` (``model0``... with virtual pipeline chunks), with ``iteration`` and ``args`` beside it. The
model is stitched back lazily, one tensor per read: a column-parallel weight (QKV, fc1, the word
embeddings, the output layer; their biases too) was cut along dim 0, a row-parallel weight (the attention
output projection, fc2) along dim 1, norms and row-parallel biases are copies. Pipeline stages number their
layers from 0; stage ``p``'s layers are shifted by the layers of the stages before it. A tensor whose split
cannot be told from its name is refused with one line, never guessed. ``torch_dist`` checkpoints
(``iter_NNNNNNN/.metadata``) are DCP folders, read by :mod:`.dcp`.

Files are read with ``torch.load(weights_only=True)``; numpy arrays (the saved numpy RNG state) are
allowed as plain data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointReadError, NotACheckpoint
from .base import DTYPE_BYTES, TensorInfo, dtype_name, tensor_info
from .keys import KeyMap
from .optim import SAVED_LR, moments_by_name, saved_adam_counters, saved_learning_rate
from .torch_pickle import checkpoint_metadata, flatten_tensors, safe_torch_load

if TYPE_CHECKING:
    import torch

SHARD_FILE = "model_optim_rng.pt"
_RANK_FOLDER = re.compile(r"mp_rank_(\d+)(?:_(\d+))?")
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
# Name parts of tensor-parallel layers, Megatron-core and legacy spellings.
COLUMN_PARALLEL = ("linear_qkv", "query_key_value", "linear_q", "linear_kv", "key_value", "linear_fc1",
                   "dense_h_to_4h", "word_embeddings", "output_layer")
ROW_PARALLEL = ("linear_proj", "attention.dense", "self_attention.dense", "dense_4h_to_h", "linear_fc2")
REPLICATED = ("norm", "position_embeddings", "rotary", "_extra_state")


def rank_folders(path: Path) -> dict[tuple[int, int], Path]:
    """``{(tensor rank, pipeline stage): shard file}`` of an ``iter_*`` folder."""
    found = {}
    for folder in path.iterdir() if path.is_dir() else ():
        match = _RANK_FOLDER.fullmatch(folder.name)
        if match and (folder / SHARD_FILE).is_file():
            found[(int(match.group(1)), int(match.group(2) or 0))] = folder / SHARD_FILE
    return found


def split_dim(name: str) -> int | None:
    """The dim a tensor-parallel tensor was cut along (None: replicated); raises KeyError when unknown."""
    if any(part in name for part in COLUMN_PARALLEL):
        return 0
    if any(part in name for part in ROW_PARALLEL):
        return 1 if name.endswith("weight") else None   # a row-parallel bias is added after the all-reduce
    if any(part in name for part in REPLICATED):
        return None
    raise KeyError(name)


def _model_tensors(path: Path, payload: object) -> dict[str, "torch.Tensor"]:
    """The weights of one rank's file (``model``, or the only ``model0``)."""
    if not isinstance(payload, dict):
        raise NotACheckpoint(path, f"holds a {type(payload).__name__}, not a Megatron checkpoint dict")
    chunks = sorted(k for k in payload if isinstance(k, str) and re.fullmatch(r"model\d+", k))
    if len(chunks) > 1:
        raise CheckpointReadError(path, f"{len(chunks)} virtual-pipeline model chunks ({', '.join(chunks)}): "
                                        "CkptSelect does not stitch them; convert to torch_dist or HF first")
    key = "model" if "model" in payload else (chunks[0] if chunks else None)
    tensors = flatten_tensors(payload.get(key)) if key else {}
    if not tensors:
        raise NotACheckpoint(path, "holds no weights under 'model'")
    return tensors


def _renumber(tensors: dict, offset: int) -> dict:
    """A pipeline stage's names with its local layer numbers shifted by ``offset``."""
    if not offset:
        return tensors
    return {_LAYER.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + offset}.", n, count=1): t
            for n, t in tensors.items()}


def _layer_count(tensors: dict) -> int:
    return len({m.group(2) for n in tensors for m in [_LAYER.search(n)] if m})


def _add_pieces(pieces: dict[str, list], ranks: list[dict]) -> None:
    """Each name's tensor-parallel pieces of one stage, where an earlier stage did not hold the name."""
    for name in ranks[0]:
        if name not in pieces:
            pieces[name] = [r.get(name) for r in ranks]


def _stitch(pieces: list, dim: int | None) -> "torch.Tensor":
    import torch
    return pieces[0] if dim is None else torch.cat(pieces, dim=dim)


def _stitched_info(path: Path, stored: str, name: str, pieces: list, dim: int | None) -> TensorInfo:
    """The info of ``pieces`` joined along ``dim`` (None: a copy on every rank), shown as ``name``."""
    shape = list(pieces[0].shape)
    if dim is not None:
        if dim >= len(shape):
            raise CheckpointReadError(path, f"cannot stitch {stored!r}: it has no dim {dim} to join along")
        shape[dim] = sum(int(p.shape[dim]) for p in pieces)
    dtype = dtype_name(pieces[0].dtype)
    numel = 1
    for d in shape:
        numel *= d
    return TensorInfo(name, tuple(shape), dtype, numel * DTYPE_BYTES.get(dtype, 4))


def _inner_optimizer(payload: dict) -> dict | None:
    """The torch optimizer state dict of a legacy save: ``optimizer`` itself (fp32), or under its ``optimizer``
    (Float16OptimizerWithFloat16Params: beside ``fp32_from_fp16_params``); a one-optimizer chain's only entry."""
    optimizer = payload.get("optimizer")
    if isinstance(optimizer, list) and len(optimizer) == 1:
        optimizer = optimizer[0]
    if isinstance(optimizer, dict) and "state" not in optimizer:
        optimizer = optimizer.get("optimizer")
    return optimizer if isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict) else None


def rank_moments(payload: object, tensors: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """One rank's Adam moments by parameter name (``"{param}.exp_avg"``...); {} where none are saved.

    The state is keyed by index, in Megatron's param-group order: decayed parameters (2-D weights) first,
    then biases and 1-D ones, each in the module's order (``_get_param_groups``); :func:`moments_by_name`
    takes the first such order the moments' shapes agree with. The distributed optimizer keeps its state in
    ``distrib_optim.pt`` files, not read here.
    """
    inner = _inner_optimizer(payload) if isinstance(payload, dict) else None
    if inner is None:
        return {}
    params = [tensor_info(n, t) for n, t in tensors.items() if t.is_floating_point()]
    moments = moments_by_name(inner, params)
    return {k: v for k, v in moments.items() if k.rpartition(".")[0] in tensors}


def _optimizer_metadata(payload: object) -> dict[str, str]:
    """The saved LR and Adam's step count and β2 (for the iterate noise's bias correction)."""
    inner = _inner_optimizer(payload) if isinstance(payload, dict) else None
    if inner is None:
        return {}
    lr = saved_learning_rate(inner)
    return {**({SAVED_LR: repr(lr)} if lr is not None else {}), **saved_adam_counters(inner)}


class MegatronHandle:
    """Every rank's file memory-mapped; a tensor is stitched from its slices when read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        shards = rank_folders(path)
        if not shards:
            raise CheckpointReadError(path, f"no mp_rank_*/{SHARD_FILE} files")
        tp = 1 + max(t for t, _ in shards)
        pp = 1 + max(p for _, p in shards)
        missing = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") for t in range(tp) for p in range(pp)
                   if (t, p) not in shards]
        if missing:
            raise CheckpointReadError(path, f"cannot stitch the tensor/pipeline-parallel shards: {', '.join(missing)} "
                                            "missing")
        payloads = {rank: safe_torch_load(f, plain_numpy=True) for rank, f in shards.items()}
        self._pieces: dict[str, list] = {}
        self._moment_pieces: dict[str, list] = {}
        offset = 0
        for stage in range(pp):
            raw = [_model_tensors(shards[(t, stage)], payloads[(t, stage)]) for t in range(tp)]
            ranks = [_renumber(r, offset) for r in raw]
            moments = [_renumber(rank_moments(payloads[(t, stage)], r), offset) for t, r in enumerate(raw)]
            offset += _layer_count(ranks[0])
            _add_pieces(self._pieces, ranks)   # the last stage's copy of tied embeddings: the first stage's wins
            _add_pieces(self._moment_pieces, moments)
        self._dims = {name: self._dim(name, pieces) for name, pieces in self._pieces.items()}
        self.keys = KeyMap(self._pieces)
        self._infos = [self._info(n) for n in self._pieces]
        self._moment_infos = self._moment_table()
        self._metadata = checkpoint_metadata({k: v for k, v in payloads[(0, 0)].items() if not k.startswith("model")})
        self._metadata.update(_optimizer_metadata(payloads[(0, 0)]))

    def _dim(self, name: str, pieces: list) -> int | None:
        if any(p is None for p in pieces):
            raise CheckpointReadError(self.path, f"cannot stitch {name!r}: not every tensor-parallel rank holds it")
        if len(pieces) == 1:
            return None
        try:
            return split_dim(name)
        except KeyError:
            raise CheckpointReadError(self.path, f"cannot stitch {name!r}: how it is split over {len(pieces)} "
                                                 "tensor-parallel ranks is not known from its name") from None

    def _info(self, name: str) -> TensorInfo:
        return _stitched_info(self.path, name, self.keys.normalize(name), self._pieces[name], self._dims[name])

    def _moment_table(self) -> dict[str, tuple[str, TensorInfo]]:
        """Normalised moment name -> (stored name, info), for the moments of parameters stitched like them."""
        table = {}
        for stored, pieces in self._moment_pieces.items():
            param, _, moment = stored.rpartition(".")
            if param not in self._dims or any(p is None for p in pieces) or len(pieces) != len(self._pieces[param]):
                continue
            name = f"{self.keys.normalize(param)}.{moment}"
            try:
                table[name] = (stored, _stitched_info(self.path, stored, name, pieces, self._dims[param]))
            except CheckpointReadError:
                continue   # a moment not shaped like its parameter: left out, the weights are still read
        return table

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> "torch.Tensor":
        original = self.keys.original(name)
        if original not in self._pieces:
            raise CheckpointReadError(self.path, f"no tensor named {name!r}")
        return _stitch(self._pieces[original], self._dims[original])

    def optimizer_state(self) -> list[TensorInfo]:
        """Adam's moments of the legacy (non-distributed) optimizer, named ``"{param}.{moment}"``, stitched."""
        return [info for _, info in self._moment_infos.values()]

    def read_optimizer(self, name: str) -> "torch.Tensor":
        if name not in self._moment_infos:
            raise CheckpointReadError(self.path, f"no optimizer tensor named {name!r}")
        stored = self._moment_infos[name][0]
        return _stitch(self._moment_pieces[stored], self._dims[stored.rpartition(".")[0]])

    def ema_tensors(self) -> list[TensorInfo]:
        return []

    def original_name(self, name: str) -> str:
        return self.keys.original(name)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def close(self) -> None:
        self._pieces, self._moment_pieces = {}, {}

    def __enter__(self) -> "MegatronHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MegatronReader:
    """A Megatron-LM legacy ``iter_NNNNNNN/`` folder of ``mp_rank_*/model_optim_rng.pt`` files."""

    name = "megatron"
    description = ("Megatron-LM legacy iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt, tensor- and "
                   "pipeline-parallel shards stitched lazily (torch_dist iter_ folders are read by dcp)")

    def matches(self, path: Path) -> bool:
        try:
            return path.is_dir() and bool(rank_folders(path))
        except OSError:
            return False

    def files(self, path: Path) -> list[Path]:
        return [f for _, f in sorted(rank_folders(path).items())]

    def open(self, path: Path) -> MegatronHandle:
        return MegatronHandle(path)
