"""DeepSpeed ZeRO-3 tags: fp32 master weights and Adam moments gathered from the ranks' partitions (issue 21).

ZeRO-3 partitions every parameter on its own. With ``world`` data-parallel ranks, rank ``r`` holds
elements ``[r * p, (r + 1) * p)`` of the flattened parameter, ``p = ceil(numel / world)``, the last
rank's piece padded with zeros to ``p``. A rank's pieces lie one after another, in ``param_shapes``
order, in its ``fp32_flat_groups`` (one flat tensor per sub-group; read as one vector, concatenated).
The inner optimizer's ``exp_avg``/``exp_avg_sq`` (one flat tensor per sub-group, in its
``param_groups`` order) have the same layout. This is the layout DeepSpeed's ``zero_to_fp32.py``
reverses for stage 3 (its ``zero3_partitioned_param_info`` and ``GatheredTensor``).

ZeRO-3's model states files hold empty placeholders for the parameters (their buffers are real), so
the fp32 master is the weights. Each read gathers one parameter from the world's memory-mapped
partitions: memory is bounded by a parameter, not the model. Frozen parameters are kept whole-cut
per rank in each rank's model states file (``frozen_param_fragments``) and are gathered the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import CheckpointReadError
from .base import DTYPE_BYTES, TensorInfo, dtype_name, is_tensor
from .keys import KeyMap
from .optim import saved_adam_counters, saved_learning_rate

if TYPE_CHECKING:
    import torch

FP32_FLAT_GROUPS = "fp32_flat_groups"


def cut(pieces: Sequence["torch.Tensor"], offset: int, numel: int) -> "torch.Tensor":
    """Elements ``[offset, offset + numel)`` of ``pieces`` read as one vector, copying only those."""
    import torch
    out, start = [], 0
    for piece in pieces:
        end = start + piece.numel()
        lo, hi = max(offset, start), min(offset + numel, end)
        if lo < hi:
            out.append(piece[lo - start:hi - start])
        start = end
    if sum(p.numel() for p in out) != numel:
        raise ValueError(f"elements {offset}-{offset + numel} lie past the end ({start}) of the flat vector")
    return out[0].clone() if len(out) == 1 else torch.cat(out)


def partition_size(numel: int, world: int) -> int:
    """Elements each rank holds of a parameter of ``numel`` elements (the last rank's padded)."""
    return -(-numel // world)


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one parameter's piece lies in every rank's flat vector."""

    offset: int
    part: int
    dims: tuple[int, ...]


class Zero3Layout:
    """Each parameter's slot, from ``param_shapes`` (the order DeepSpeed flattened them in)."""

    def __init__(self, param_shapes: list[dict], world: int) -> None:
        if world < 1:
            raise ValueError(f"partition count {world}")
        self.world = world
        self.slots: dict[str, Slot] = {}
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                dims = tuple(int(d) for d in shape)
                part = partition_size(_numel(dims), world)
                self.slots[str(name)] = Slot(offset, part, dims)
                offset += part
        self.per_rank = offset   # each rank's elements, padding included

    def check(self, what: str, ranks: Sequence[Sequence["torch.Tensor"]]) -> None:
        """As zero_to_fp32 checks: every rank holds exactly the parameters' pieces."""
        if len(ranks) != self.world:
            raise ValueError(f"the partition count is {self.world} but {len(ranks)} optimizer shards were found "
                             "(a shard was not saved or an older save was overwritten)")
        for rank, flats in enumerate(ranks):
            have = sum(int(t.numel()) for t in flats)
            if have != self.per_rank:
                raise ValueError(f"rank {rank}'s {what} holds {have} elements but the parameters' "
                                 f"partitions need {self.per_rank}")

    def gather(self, ranks: Sequence[Sequence["torch.Tensor"]], name: str) -> "torch.Tensor":
        """Parameter ``name`` (an original name) whole: its piece from every rank, padding cut."""
        import torch
        slot = self.slots[name]
        pieces = [cut(flats, slot.offset, slot.part) for flats in ranks]
        return torch.cat(pieces)[:_numel(slot.dims)].reshape(slot.dims)


def _flat_groups(path: Path, payload: object) -> list["torch.Tensor"]:
    """One rank's fp32 master partitions (one flat tensor per sub-group)."""
    state = payload.get("optimizer_state_dict") if isinstance(payload, dict) else None
    flats = state.get(FP32_FLAT_GROUPS) if isinstance(state, dict) else None
    if not isinstance(flats, (list, tuple)) or not flats or not all(is_tensor(t) and t.dim() == 1 for t in flats):
        raise CheckpointReadError(path, f"a ZeRO-3 optimizer shard without {FP32_FLAT_GROUPS} (the weights live there)")
    return list(flats)


def world_size(state: dict) -> int:
    """Data-parallel ranks the parameters were cut over (a list: one count per group)."""
    count = state.get("partition_count", 1)
    return int(max(count)) if isinstance(count, (list, tuple)) else int(count)


class Zero3Weights:
    """The fp32 master of a ZeRO-3 tag, with the model states' buffers, frozen and shared parameters.

    Args:
        shards: the optimizer shard files, in rank order; payloads: what each holds (weights-only loaded).
        states: every rank's model states (rank order): param_shapes, buffers, frozen fragments.

    Raises:
        CheckpointReadError: the shards do not hold the layout (the message says how).
    """

    def __init__(self, tag: Path, shards: Sequence[Path], payloads: Sequence[object], states: Sequence[dict]) -> None:
        self.path = tag
        self._ranks = [_flat_groups(s, p) for s, p in zip(shards, payloads)]
        first = payloads[0]["optimizer_state_dict"]   # type: ignore[index]
        try:
            self.layout = Zero3Layout(states[0].get("param_shapes") or [], world_size(first))
            self.layout.check("fp32 master", self._ranks)
        except ValueError as e:
            raise CheckpointReadError(tag, f"ZeRO-3 partitions do not fit the parameters: {e}") from None
        self._extra = _buffers(states[0]) | _frozen(tag, states)
        shared = states[0].get("shared_params") or {}
        self._alias = {str(k): str(v) for k, v in shared.items() if str(v) in self.layout.slots or v in self._extra}
        names = [*self.layout.slots, *self._extra, *self._alias]
        self.keys = KeyMap(names)
        self.infos = [self._info(n) for n in names]

    def _info(self, original: str) -> TensorInfo:
        source = self._alias.get(original, original)
        name = self.keys.normalize(original)
        if source in self.layout.slots:
            dims = self.layout.slots[source].dims
            return TensorInfo(name, dims, "float32", 4 * _numel(dims))
        shape, dtype = self._extra[source][0], self._extra[source][1]
        return TensorInfo(name, shape, dtype, _numel(shape) * DTYPE_BYTES.get(dtype, 4))

    def read(self, name: str) -> "torch.Tensor":
        original = self.keys.original(name)
        source = self._alias.get(original, original)
        if source in self.layout.slots:
            return self.layout.gather(self._ranks, source)
        if source in self._extra:
            return self._extra[source][2]()
        raise CheckpointReadError(self.path, f"no tensor named {name!r}")


def _buffers(states: dict) -> dict[str, tuple]:
    """Buffers (real tensors in ZeRO-3's model states): name -> (shape, dtype, reader)."""
    module = states.get("module") if isinstance(states.get("module"), dict) else {}
    names = set(states.get("buffer_names") or [])
    return {str(n): (tuple(t.shape), dtype_name(t.dtype), lambda t=t: t)
            for n, t in module.items() if n in names and is_tensor(t)}


def _frozen(tag: Path, states: Sequence[dict]) -> dict[str, tuple]:
    """Frozen parameters: each rank's fragment in its model states file, concatenated, padding cut."""
    import torch
    shapes = states[0].get("frozen_param_shapes") or {}
    out: dict[str, tuple] = {}
    for name, shape in shapes.items():
        frags = [(s.get("frozen_param_fragments") or {}).get(name) for s in states]
        if not all(is_tensor(f) for f in frags):
            raise CheckpointReadError(tag, f"frozen parameter {name!r}: not every rank's model states hold its piece")
        dims = tuple(int(d) for d in shape)
        out[str(name)] = (dims, dtype_name(frags[0].dtype),
                          lambda f=frags, d=dims: torch.cat([x.reshape(-1) for x in f])[:_numel(d)].reshape(d))
    return out


class Zero3Optimizer:
    """Adam moments of a ZeRO-3 tag, named ``"{param}.{moment}"`` (normalised names), one parameter per read.

    Raises:
        ValueError: the inner optimizer state does not fit the layout (the caller turns it into a note).
    """

    def __init__(self, payloads: Sequence[object], layout: Zero3Layout, keys: KeyMap) -> None:
        inners = [_inner(p) for p in payloads]
        order = [i for group in inners[0].get("param_groups") or [] for i in group.get("params") or []]
        self.lr = saved_learning_rate(inners[0])
        self.counters = saved_adam_counters(inners[0])
        self._layout, self._keys = layout, keys
        self._moments: dict[str, list[list]] = {}
        for key in _moment_keys(inners[0], order):
            ranks = [[inner["state"][i][key] for i in order] for inner in inners]
            layout.check(key, ranks)
            self._moments[key] = ranks
        self.infos = [TensorInfo(f"{keys.normalize(n)}.{key}", s.dims, "float32", 4 * _numel(s.dims))
                      for key in self._moments for n, s in layout.slots.items()]

    def read(self, name: str) -> "torch.Tensor":
        """One moment of one parameter, shaped like the parameter."""
        param, _, key = name.rpartition(".")
        original = self._keys.original(param)
        if key not in self._moments or original not in self._layout.slots:
            raise KeyError(name)
        return self._layout.gather(self._moments[key], original)


def _inner(payload: object) -> dict:
    """The inner torch optimizer's state dict DeepSpeed keeps under ``optimizer_state_dict`` twice."""
    outer = payload.get("optimizer_state_dict") if isinstance(payload, dict) else None
    inner = outer.get("optimizer_state_dict") if isinstance(outer, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("state"), dict):
        raise ValueError("a ZeRO-3 optimizer shard holds no inner optimizer state")
    return inner


def _moment_keys(inner: dict, order: list) -> list[str]:
    """Moments every sub-group carries as a flat tensor (``exp_avg``, ``exp_avg_sq``)."""
    entries = [inner["state"].get(i) for i in order]
    if not order or not all(isinstance(e, dict) for e in entries):
        raise ValueError("the inner optimizer state has no entry per sub-group (no step taken yet?)")
    keys = [k for k, v in entries[0].items() if is_tensor(v) and v.dim() == 1]
    return [k for k in keys if all(is_tensor(e.get(k)) and e[k].dim() == 1 for e in entries)]


__all__ = ["Zero3Layout", "Zero3Optimizer", "Zero3Weights", "cut", "partition_size", "world_size"]
