"""The merge's plan, from the inputs' headers only: the inputs' common layout and the output's dtypes.

The weights and the inputs' distinctness are checked before any file is opened, by :mod:`analysis.inputs`
(the recipe checks them too, so they live below both).

Nothing here reads a tensor. The files the output will have are planned by :mod:`analysis.merge.output`;
the dry run's projection (a short probe of the real inputs) is in :mod:`analysis.merge.verify`, beside the
checks that run before a merge writes anything.
"""

from __future__ import annotations

from typing import Sequence

from ..checkpoints import CheckpointHandle, TensorInfo
from ..checkpoints.base import DTYPE_BYTES
from ..errors import CheckpointMismatch, InvalidArgument
from ..inputs import OUTPUT_DTYPES


def output_layout(infos: list[TensorInfo], output_dtype: str) -> list[TensorInfo]:
    """The output's tensor headers: floating tensors take ``output_dtype`` unless it is 'same'."""
    if output_dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {output_dtype!r}")
    layout = []
    for info in infos:
        dtype = info.dtype if (output_dtype == "same" or not info.is_floating) else output_dtype
        layout.append(TensorInfo(info.name, info.shape, dtype, info.numel * DTYPE_BYTES[dtype]))
    return layout


def check_same_layout(handles: Sequence[CheckpointHandle]) -> list[TensorInfo]:
    """The common tensor list of all inputs, or CheckpointMismatch naming every difference
    (missing or extra tensors, shapes, and dtypes unless both are floating)."""
    reference = handles[-1].tensors()
    ref_map = {i.name: i for i in reference}
    problems = []
    for handle in handles[:-1]:
        infos = {i.name: i for i in handle.tensors()}
        missing = sorted(set(ref_map) - set(infos))
        extra = sorted(set(infos) - set(ref_map))
        shared = sorted(set(infos) & set(ref_map))
        shapes = [f"{n}: {infos[n].shape} vs {ref_map[n].shape}" for n in shared if infos[n].shape != ref_map[n].shape]
        # Floating dtypes may differ (each is widened to float32); an integer or bool tensor beside
        # another dtype would be averaged as a float or copied from one side without a word (issue 19).
        dtypes = [f"{n}: {infos[n].dtype} vs {ref_map[n].dtype}" for n in shared if infos[n].dtype != ref_map[n].dtype
                  and not (infos[n].is_floating and ref_map[n].is_floating)]
        for label, items in (("missing", missing), ("extra", extra), ("shape differs", shapes),
                             ("dtype differs", dtypes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                problems.append(f"{handle.path.name} vs {handles[-1].path.name}: {label}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointMismatch("checkpoints do not share tensors: " + "; ".join(problems))
    return reference
