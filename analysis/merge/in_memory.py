"""The weighted average as an in-memory state dict, for evaluators: one model in memory.

Whole tensors assembled from :func:`analysis.merge.average.stream_average`'s blocks, so what an
evaluator scores is exactly what the merge would write.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from ..checkpoints import CheckpointHandle, TensorInfo, open_checkpoint
from ..checkpoints.keys import original_name
from ..run import CheckpointRef
from .average import stream_average
from ..inputs import normalize_weights
from .plan import check_same_layout, output_layout

if TYPE_CHECKING:
    import torch


def iter_average(handles: Sequence[CheckpointHandle], weights: Sequence[float], layout: list[TensorInfo],
                 progress: Callable[[float, str], None] | None = None) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield ``(name, averaged tensor)`` in ``layout`` order; the newest input is ``handles[-1]``.

    Whole tensors assembled from :func:`analysis.merge.average.stream_average`'s blocks, so the
    evaluator sees exactly the arithmetic the merge writes (see that module for the formula).
    """
    # Imported here, not at the top: torch costs ~1.3 s to import, and a merge imports this package.
    import torch

    from .torch_adder import as_tensor

    current: torch.Tensor | None = None
    for info, start, block in stream_average(handles, weights, layout, progress):
        if not info.is_floating:
            yield info.name, as_tensor(block, info.dtype).reshape(info.shape)
            continue
        if start == 0:
            current = torch.empty(info.numel, dtype=getattr(torch, info.dtype))
        assert current is not None, "blocks arrive in order, starting at 0"
        current[start:start + block.size] = as_tensor(block, info.dtype)
        if start + block.size == info.numel:
            yield info.name, current.reshape(info.shape)
            current = None


def average_state_dict(refs: Sequence[CheckpointRef], weights: Sequence[float],
                       output_dtype: str = "same") -> dict[str, "torch.Tensor"]:
    """The weighted average as an in-memory state dict (for evaluators; one model in memory).

    Keyed by the newest checkpoint's own names, as the evaluator protocol promises: a Hugging Face
    model with tied embeddings saves every key under ``model.``, which the readers strip to compare
    checkpoints, and ``load_state_dict`` of the user's model needs it back.
    """
    return average_of_inputs([(r.path, r.layout) for r in refs], weights, output_dtype)


def average_of_inputs(inputs: Sequence[tuple[object, str | None]], weights: Sequence[float],
                      output_dtype: str = "same") -> dict[str, "torch.Tensor"]:
    """:func:`average_state_dict` of inputs named by (path or URL, layout): what a work unit on another
    machine is handed (issue 22), as it has no ``CheckpointRef``."""
    weights = normalize_weights(weights, len(inputs))
    with ExitStack() as stack:
        handles = [stack.enter_context(open_checkpoint(path, layout)) for path, layout in inputs]
        layout = output_layout(check_same_layout(handles), output_dtype)
        return {original_name(handles[-1], name): tensor for name, tensor in iter_average(handles, weights, layout)}
