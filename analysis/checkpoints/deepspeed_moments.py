"""Adam moments of a DeepSpeed ZeRO-1/2 tag, cut per parameter out of the ranks' flat partitions (issue 21).

Each ``*_optim_states.pt`` shard (one per data-parallel rank) holds, in its ``optimizer_state_dict``, every
parameter group flattened into one vector and cut into equal partitions, one per rank (the fp32 master in
``single_partition_of_fp32_groups``, Adam's moments in ``base_optimizer_state``). The layout is the one
DeepSpeed's own ``zero_to_fp32.py`` reverses: the ranks' partitions of a group, padding cut, concatenated,
hold the group's parameters one after another in ``param_shapes`` order. Moments are sliced out one
parameter at a time from memory-mapped shards. :func:`zero_optimizer` picks these or ZeRO-3's
(:mod:`.deepspeed_zero3`, each parameter partitioned on its own) by what the shards hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import TensorInfo, is_tensor
from .deepspeed_zero3 import FP32_FLAT_GROUPS, Zero3Layout, Zero3Optimizer, cut
from .keys import KeyMap
from .optim import saved_adam_counters, saved_learning_rate

if TYPE_CHECKING:
    import torch


class FlatGroups:
    """One moment (or the fp32 master) of every parameter group, as the ranks' partitions concatenated.

    Nothing is concatenated up front: a parameter's slice is cut from the one or two partitions it spans.
    """

    def __init__(self, partitions: list[list["torch.Tensor"]]) -> None:
        self._partitions = partitions   # [group][rank] -> 1-D tensor, padding already cut

    def numel(self, group: int) -> int:
        """Elements of ``group`` over all ranks."""
        return sum(p.numel() for p in self._partitions[group])

    def slice(self, group: int, offset: int, numel: int) -> "torch.Tensor":
        """Elements ``[offset, offset + numel)`` of ``group``'s flat vector."""
        return cut(self._partitions[group], offset, numel)


class ZeroOptimizer:
    """Adam moments of a ZeRO-1/2 tag, named ``"{param}.{moment}"``, read lazily (one parameter per call).

    Raises:
        ValueError: the shards do not fit the layout (its message says how; the caller turns it into a note).
    """

    def __init__(self, payloads: list[dict], param_shapes: list[dict], names: KeyMap) -> None:
        states = [p.get("optimizer_state_dict") if isinstance(p, dict) else None for p in payloads]
        if not all(isinstance(s, dict) for s in states):
            raise ValueError("an optimizer shard holds no optimizer_state_dict")
        stage = states[0].get("zero_stage", 1)
        if int(stage) > 2:
            raise ValueError(f"ZeRO stage {stage} is not one CkptSelect reads")
        world = _world_size(states[0])
        if world != len(states):
            raise ValueError(f"the partition count is {world} but {len(states)} optimizer shards were found "
                             "(a shard was not saved or an older save was overwritten)")
        self.lr = saved_learning_rate(_rigid(states[0]))
        self.counters = saved_adam_counters(_rigid(states[0]))
        self._moments = {key: FlatGroups(_group_moments(states, key)) for key in _moment_keys(states[0])}
        self._where: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        for group, shapes in enumerate(param_shapes):
            offset = 0
            for name, shape in shapes.items():
                dims = tuple(int(d) for d in shape)
                self._where[names.normalize(str(name))] = (group, offset, dims)
                offset += _numel(dims)
            _check_fits(group, offset, self._moments, world)
        self.infos = [TensorInfo(f"{name}.{key}", dims, "float32", 4 * _numel(dims))
                      for key in self._moments for name, (_, _, dims) in self._where.items()]

    def read(self, name: str) -> "torch.Tensor":
        """One moment of one parameter, shaped like the parameter."""
        param, _, key = name.rpartition(".")
        if key not in self._moments or param not in self._where:
            raise KeyError(name)
        group, offset, dims = self._where[param]
        return self._moments[key].slice(group, offset, _numel(dims)).reshape(dims)


def zero_optimizer(payloads: list, shapes: list[dict], keys: KeyMap) -> ZeroOptimizer | Zero3Optimizer:
    """ZeRO-3's moments (partitioned per parameter) or ZeRO-1/2's (per group), as the shards' stage says."""
    state = payloads[0].get("optimizer_state_dict") if isinstance(payloads[0], dict) else None
    if isinstance(state, dict) and FP32_FLAT_GROUPS in state:
        return Zero3Optimizer(payloads, Zero3Layout(shapes, _world_size(state)), keys)
    return ZeroOptimizer(payloads, shapes, keys)


def _world_size(state: dict) -> int:
    """Data-parallel ranks the groups were cut into (a list: one count per group, expert groups differ)."""
    count = state.get("partition_count", 1)
    return int(max(count)) if isinstance(count, (list, tuple)) else int(count)


def _rigid(state: dict) -> dict | None:
    """The inner torch optimizer's state dict when saved whole (DeepSpeed's default, non-elastic save)."""
    base = state.get("base_optimizer_state")
    return base if isinstance(base, dict) and "state" in base else None


def _group_states(state: dict) -> list[dict]:
    """Per group, this rank's moment tensors: from the rigid save (by the group's one index) or the elastic list."""
    base = state.get("base_optimizer_state")
    rigid = _rigid(state)
    if rigid is not None:
        groups = rigid.get("param_groups") or []
        return [rigid["state"].get(g["params"][0], {}) if g.get("params") else {} for g in groups]
    if isinstance(base, (list, tuple)):
        return [g if isinstance(g, dict) else {} for g in base]
    raise ValueError("no base_optimizer_state in the optimizer shard")


def _moment_keys(state: dict) -> list[str]:
    """Moments every group carries as a flat tensor (``exp_avg``, ``exp_avg_sq``)."""
    groups = _group_states(state)
    keys = [k for k, v in (groups[0] if groups else {}).items() if is_tensor(v) and v.dim() == 1]
    return [k for k in keys if all(is_tensor(g.get(k)) for g in groups)]


def _group_moments(states: list[dict], key: str) -> list[list["torch.Tensor"]]:
    """[group][rank] partitions of moment ``key``, cut to each rank's unpadded length (its fp32 master's)."""
    per_rank = [_group_states(s) for s in states]
    out: list[list] = []
    for group in range(len(per_rank[0])):
        parts = []
        for state, groups in zip(states, per_rank):
            parts.append(groups[group][key][:_lean_length(state, group, groups[group][key])])
        out.append(parts)
    return out


def _lean_length(state: dict, group: int, moment: "torch.Tensor") -> int:
    """This rank's elements of ``group`` without the alignment padding DeepSpeed adds at the end.

    A rigid save (the inner optimizer's whole state dict, ZeRO-1/2's default and BF16_Optimizer's) keeps the
    padding of the last rank, counted in ``group_paddings``; an elastic save's list is cut already.
    """
    if _rigid(state) is None:
        return int(moment.numel())
    paddings = state.get("group_paddings") or []
    return int(moment.numel()) - int(paddings[group] if group < len(paddings) else 0)


def _check_fits(group: int, consumed: int, moments: dict[str, FlatGroups], world: int) -> None:
    """As zero_to_fp32 checks: the parameters fill the group up to DeepSpeed's 2 x world-size alignment."""
    align = 2 * world
    for flat in moments.values():
        have = flat.numel(group)
        if -(-consumed // align) * align != -(-have // align) * align:
            raise ValueError(f"parameter group {group} holds {have} elements but its parameters need {consumed}")


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


__all__ = ["ZeroOptimizer", "zero_optimizer"]
