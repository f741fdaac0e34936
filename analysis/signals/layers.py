"""Per-layer statistics of every checkpoint, from the single sketch pass (issue 25).

A layer is a block and a role group (``transformer.h.3 attn``, see :mod:`.layer_names`). For each
layer and checkpoint:

* RMS and max |w| — exact: sums kept per tensor while the pass held it (:mod:`.tensor_stats`);
* relative update size |θ_i − θ_(i−1)| / |θ_(i−1)| over the layer's tensors (the update's RMS over the
  weights' RMS: both have the same element count) — the numerator from the sketches' difference, the
  denominator exact. Exact when every tensor of the layer has at most ``buckets`` elements (the
  sketch then stores it whole); otherwise the CountSketch estimate of |Δ|² is unbiased with a relative
  standard error of at most sqrt(2 / k), so |Δ| is within about sqrt(1 / (2k)) (1.1% at k = 4096);
* cosine between successive updates cos(Δ_i, Δ_(i−1)) — exact likewise, else within about sqrt(2 / k);
* for attention, |W_q|·|W_k| (Frobenius norms, exact): a cheap proxy for attention-logit growth. Fused
  q/k/v weights are split in equal thirds where the layout allows (GPT-2, nanoGPT); Megatron's per-head
  interleaved ``query_key_value`` is not split, so no product is given there.

Nothing here reads a tensor: :class:`LayerTracker` takes each checkpoint's sketch as it is made and keeps
only the previous one and the previous update, so memory is two sketches whatever the run's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .layer_names import tensor_role
from .sketch import CheckpointSketch


@dataclass(frozen=True, slots=True)
class LayerSeries:
    """One layer across the checkpoints (NaN where a value does not exist, e.g. no update before the first)."""

    name: str                              # "transformer.h.3 attn"
    block: int | None
    group: str                             # attn, mlp, norm, embedding, head, final norm, other
    tensors: tuple[str, ...]
    rms: tuple[float, ...]
    max_abs: tuple[float, ...]
    relative_update: tuple[float, ...]     # |Δ_i| / |θ_(i−1)|
    update_cosine: tuple[float, ...]       # cos(Δ_i, Δ_(i−1))
    qk_norm_product: tuple[float, ...] = ()   # |W_q|·|W_k|, attention layers whose q and k are known
    exact: bool = True                     # every tensor of the layer kept whole by the sketch
    sketch_buckets: int = 0                # the smallest sketch among its sketched tensors (0 when exact)


@dataclass
class _Point:
    sum_squares: float = 0.0
    numel: int = 0
    max_abs: float = 0.0
    q_squares: float | None = None
    k_squares: float | None = None
    delta_squares: float = math.nan
    delta_dot: float = math.nan
    previous_delta_squares: float = math.nan


@dataclass
class LayerTracker:
    """Accumulates layer statistics one checkpoint sketch at a time (keeps the previous sketch and update)."""

    steps: list[int] = field(default_factory=list)
    points: list[dict[str, _Point]] = field(default_factory=list)
    tensors: dict[str, list[str]] = field(default_factory=dict)
    sketched: dict[str, int] = field(default_factory=dict)   # layer -> smallest sketch of a sketched tensor
    _previous: CheckpointSketch | None = None
    _previous_delta: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, sketch: CheckpointSketch) -> None:
        """Take the next checkpoint (in step order)."""
        layers: dict[str, _Point] = {}
        deltas = self._deltas(sketch)
        for name, stats in sketch.stats.items():
            role = tensor_role(name)
            point = layers.setdefault(role.layer, _Point())
            self._register(role.layer, name, stats.numel, sketch.buckets)
            point.sum_squares += stats.sum_squares
            point.numel += stats.numel
            point.max_abs = max(point.max_abs, stats.max_abs)
            _add_qk(point, role.role, name, stats.sum_squares, stats.parts)
        for layer, point in layers.items():
            self._add_update(point, [n for n in self.tensors[layer] if n in deltas], deltas)
        self.steps.append(sketch.step)
        self.points.append(layers)
        self._previous, self._previous_delta = sketch, deltas

    def _register(self, layer: str, name: str, numel: int, buckets: int) -> None:
        names = self.tensors.setdefault(layer, [])
        if name not in names:
            names.append(name)
        if numel > buckets:
            self.sketched[layer] = min(self.sketched.get(layer, buckets), buckets)

    def _deltas(self, sketch: CheckpointSketch) -> dict[str, torch.Tensor]:
        """Sketch of each tensor's update since the previous checkpoint (tensors of the same sketch length)."""
        if self._previous is None:
            return {}
        before = self._previous.weights
        return {n: v - before[n] for n, v in sketch.weights.items() if n in before and before[n].shape == v.shape}

    def _add_update(self, point: _Point, names: list[str], deltas: dict[str, torch.Tensor]) -> None:
        if not names:
            return
        point.delta_squares = sum(float(deltas[n].square().sum()) for n in names)
        shared = [n for n in names if n in self._previous_delta]
        if shared:
            point.delta_dot = sum(float(torch.dot(deltas[n], self._previous_delta[n])) for n in shared)
            point.previous_delta_squares = sum(float(self._previous_delta[n].square().sum()) for n in shared)

    def series(self) -> tuple[LayerSeries, ...]:
        """Every layer's series, blocks in order, then the layers outside the blocks."""
        order = sorted(self.tensors, key=_layer_order)
        return tuple(self._one(layer) for layer in order)

    def _one(self, layer: str) -> LayerSeries:
        role = tensor_role(self.tensors[layer][0])
        pts = [p.get(layer) for p in self.points]
        previous = [None, *pts[:-1]]
        rms = tuple(math.sqrt(p.sum_squares / p.numel) if p and p.numel else math.nan for p in pts)
        rel = tuple(math.sqrt(p.delta_squares / b.sum_squares) if p and b and b.sum_squares > 0 else math.nan
                    for p, b in zip(pts, previous))
        cos = tuple(_cosine(p) if p else math.nan for p in pts)
        qk = tuple(math.sqrt(p.q_squares * p.k_squares) if p and p.q_squares is not None
                   and p.k_squares is not None else math.nan for p in pts)
        return LayerSeries(layer, role.block, role.group, tuple(self.tensors[layer]), rms,
                           tuple(p.max_abs if p else math.nan for p in pts), rel, cos,
                           qk if any(math.isfinite(v) for v in qk) else (),
                           layer not in self.sketched, self.sketched.get(layer, 0))


def _add_qk(point: _Point, role: str, name: str, squares: float, parts: tuple[float, ...]) -> None:
    """Add a query or key weight's squared norm (the first two thirds of a fused q/k/v weight)."""
    if not name.endswith("weight"):
        return
    if role == "q" or (role == "qkv" and parts):
        point.q_squares = (point.q_squares or 0.0) + (parts[0] if parts else squares)
    if role == "k" or (role == "qkv" and parts):
        point.k_squares = (point.k_squares or 0.0) + (parts[1] if parts else squares)


def _cosine(point: _Point) -> float:
    denom = math.sqrt(point.delta_squares * point.previous_delta_squares)
    return point.delta_dot / denom if denom > 0 else math.nan


def _layer_order(layer: str) -> tuple[int, int, str]:
    """Embeddings first, then blocks by index (attn, mlp, norm), then the final norm and the head."""
    head = {"embedding": 0, "final norm": 2, "head": 3, "other": 4}
    if layer in head or " " not in layer:   # a kind outside any numbered block ("mlp" of a one-layer net)
        return head.get(layer, 4), 0, layer
    prefix, group = layer.rsplit(" ", 1)
    block = int(prefix.rsplit(".", 1)[-1])
    return 1, block, {"attn": "0", "mlp": "1", "norm": "2"}.get(group, "3") + prefix
