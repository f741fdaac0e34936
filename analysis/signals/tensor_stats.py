"""Exact statistics of one tensor, taken while the sketch pass holds it (no read of its own).

Health (global norm, max |w|, NaN/Inf) and the layer view (RMS, max |w|, q·k norm product) are all
sums and maxima over a tensor's values, so they are kept per tensor, exactly (float64 sums over the
finite values), beside the tensor's sketch, and cached with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layer_names import fused_split_dim


@dataclass(frozen=True, slots=True)
class TensorStats:
    """Exact sums over one tensor's finite values."""

    sum_squares: float            # Σ w² over finite values (float64)
    max_abs: float                # max |w| over finite values (0 for an empty tensor)
    numel: int
    finite: bool                  # no NaN or Inf
    parts: tuple[float, ...] = ()  # Σ w² of the q, k and v thirds of a fused attention weight

    def to_tensor(self) -> torch.Tensor:
        """Packed as float64 [sum_squares, max_abs, numel, finite, *parts] for the cache file."""
        return torch.tensor([self.sum_squares, self.max_abs, float(self.numel), float(self.finite), *self.parts],
                            dtype=torch.float64)

    @staticmethod
    def from_tensor(packed: torch.Tensor) -> "TensorStats":
        """Inverse of :meth:`to_tensor`."""
        values = packed.tolist()
        return TensorStats(values[0], values[1], int(values[2]), bool(values[3]), tuple(values[4:]))


def tensor_stats(name: str, tensor: torch.Tensor) -> TensorStats:
    """Sum of squares, max |w| and finiteness of ``tensor`` (NaN/Inf counted as 0), and its fused q/k/v thirds."""
    values = tensor.to(torch.float64)
    finite_mask = torch.isfinite(values)
    finite = bool(finite_mask.all())
    if not finite:
        values = torch.where(finite_mask, values, torch.zeros((), dtype=values.dtype))
    flat = values.reshape(-1)
    max_abs = float(flat.abs().max()) if flat.numel() else 0.0
    dim = fused_split_dim(name, tuple(values.shape))
    parts = tuple(float(p.square().sum()) for p in values.chunk(3, dim)) if dim is not None else ()
    return TensorStats(float(torch.dot(flat, flat)), max_abs, flat.numel(), finite, parts)
