"""How checkpoints relate: update sizes, update directions, distances, and the trajectory.

From the per-checkpoint sketches (:mod:`.sketch`):

* update norm |Δ_i| with Δ_i = θ_i − θ_(i−1): how far training moved between saves;
* cosine(Δ_i, Δ_(i−1)): near +1 is consistent drift (averaging would lag behind it),
  near 0 or negative is oscillation around a basin (what averaging cancels);
* distance of each checkpoint to the newest, overall and per layer;
* cosine between Adam first moments of successive checkpoints, where saved (the
  gradient direction the optimizer was following);
* a 2-D PCA projection of the checkpoints for a trajectory plot.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.decomposition import PCA

from ..run import CheckpointRef
from .sketch import DEFAULT_BUCKETS, CheckpointSketch, sketch_checkpoint

_LAYER = re.compile(r"^(.*?\.\d+)\.")


@dataclass(frozen=True, slots=True)
class CheckpointSimilarity:
    """Similarity signals of one checkpoint (None where there is no previous checkpoint)."""

    step: int
    update_norm: float | None          # |θ_i − θ_(i−1)|
    update_cosine: float | None        # cos(Δ_i, Δ_(i−1))
    distance_to_newest: float          # |θ_i − θ_newest|
    grad_cosine: float | None          # cos(exp_avg_i, exp_avg_(i−1)) where optimizer state was saved
    layer_distance_to_newest: dict[str, float]


@dataclass(frozen=True, slots=True, eq=False)
class SimilarityReport:
    """Similarity of every checkpoint of a run, with the pairwise matrices and the trajectory."""

    checkpoints: tuple[CheckpointSimilarity, ...]
    steps: tuple[int, ...]
    distance_matrix: np.ndarray        # |θ_i − θ_j|
    update_cosine_matrix: np.ndarray   # cos(Δ_i, Δ_j); row/column 0 undefined (NaN)
    trajectory: np.ndarray             # (checkpoints, 2) PCA coordinates
    explained_variance: tuple[float, float]
    exact: bool                        # True when no tensor was sketched (small models)
    error_bound: float                 # standard error bound of a whole-model cosine (0 when exact)


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: the prefix up to its block index (``h.3``), else its first part."""
    match = _LAYER.match(name)
    return match.group(1) if match else name.split(".")[0]


def compare_checkpoints(refs: Sequence[CheckpointRef], buckets: int = DEFAULT_BUCKETS, seed: int = 0,
                        use_cache: bool = True,
                        progress: Callable[[float, str], None] | None = None) -> SimilarityReport:
    """Sketch each checkpoint (one streaming pass each, cached) and derive the similarity signals."""
    sketches = []
    for index, ref in enumerate(refs):
        def one(frac: float, msg: str, index: int = index) -> None:
            if progress is not None:
                progress((index + frac) / len(refs), msg)
        sketches.append(sketch_checkpoint(ref, buckets, seed, use_cache, one))
    return similarity_from_sketches(sketches)


def similarity_from_sketches(sketches: Sequence[CheckpointSketch]) -> SimilarityReport:
    """All signals from sketches already computed (kept separate so it is cheap to test)."""
    names = _shared_names(sketches)
    matrix = np.stack([_concat(s.weights, names) for s in sketches]) if names else np.zeros((len(sketches), 0))
    columns = _layer_columns(sketches[0].weights, names) if names else {}
    rows = []
    for i, sketch in enumerate(sketches):
        delta = matrix[i] - matrix[i - 1] if i else None
        before = matrix[i - 1] - matrix[i - 2] if i > 1 else None
        layer_dist = {layer: _norm(matrix[i, cols] - matrix[-1, cols]) for layer, cols in columns.items()}
        rows.append(CheckpointSimilarity(
            step=sketch.step, update_norm=_norm(delta) if delta is not None else None,
            update_cosine=_cos(delta, before) if before is not None else None,
            distance_to_newest=_norm(matrix[i] - matrix[-1]),
            grad_cosine=_grad_cosine(sketches[i - 1], sketch) if i else None,
            layer_distance_to_newest=layer_dist,
        ))
    exact = all(s.exact for s in sketches)
    total_buckets = sum(min(v.numel(), sketches[0].buckets) for v in sketches[0].weights.values()) if sketches else 0
    trajectory, explained = _trajectory(matrix)
    return SimilarityReport(
        tuple(rows), tuple(s.step for s in sketches), _distances(matrix), _update_cosines(matrix), trajectory,
        explained, exact, 0.0 if exact else math.sqrt(2.0 / max(total_buckets, 1)),
    )


def update_cosine(a: CheckpointSketch, b: CheckpointSketch, c: CheckpointSketch) -> float | None:
    """cos(θ_c − θ_b, θ_b − θ_a) over the tensors all three share (a CountSketch keeps inner products), as
    :func:`similarity_from_sketches` takes each row's ``update_cosine``; None if they share none or a step
    did not move. The sketch pass takes it three checkpoints at a time (the val band's drift, issue 21).

    Around a minimum the iterates' noise makes consecutive updates point apart (≤ 0: averaging cancels it);
    a run still travelling makes them point the same way (> 0: averaging lags behind it).
    """
    names = _shared_names([a, b, c])
    if not names:
        return None
    va, vb, vc = (_concat(s.weights, names) for s in (a, b, c))
    return _cos(vc - vb, vb - va)


def _shared_names(sketches: Sequence[CheckpointSketch]) -> list[str]:
    """Tensors present in every checkpoint with the same sketch length (reshaped ones are left out:
    the mismatch is reported by the health check, and similarity uses what can be compared)."""
    if not sketches:
        return []
    common = set.intersection(*(set(s.weights) for s in sketches))
    return sorted(n for n in common if len({s.weights[n].numel() for s in sketches}) == 1)


def _layer_columns(vectors: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
    """Layer -> its columns of the stacked matrix (names in order), sorted by layer.

    Slicing the matrix replaces concatenating each layer's tensors again for every checkpoint
    (the same numbers in the same order, so the same norms).
    """
    columns: dict[str, list[int]] = {}
    offset = 0
    for name in names:
        size = vectors[name].numel()
        columns.setdefault(layer_of(name), []).extend(range(offset, offset + size))
        offset += size
    return {layer: np.asarray(columns[layer], dtype=np.int64) for layer in sorted(columns)}


def _concat(vectors: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    if not names:
        return np.zeros(0)
    return torch.cat([vectors[n] for n in names]).numpy()


def _norm(v: np.ndarray | None) -> float:
    return float(np.linalg.norm(v)) if v is not None else math.nan


def _cos(a: np.ndarray, b: np.ndarray) -> float | None:
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.dot(a, b) / denom) if denom > 0 else None


def _grad_cosine(previous: CheckpointSketch, current: CheckpointSketch) -> float | None:
    names = sorted(set(previous.exp_avg) & set(current.exp_avg))
    if not names:
        return None
    return _cos(_concat(current.exp_avg, names), _concat(previous.exp_avg, names))


def _distances(matrix: np.ndarray) -> np.ndarray:
    """|θ_i − θ_j| from the differences themselves (no Gram-matrix cancellation), each pair once.

    Broadcasting (n, n, d) differences took 10 GB and about a minute for 200 checkpoints of
    30,000 sketch values; ``pdist`` takes 0.2 s and agrees to about 1e-14 relative.
    """
    from scipy.spatial.distance import pdist, squareform  # imported here: scipy is slow to import

    if len(matrix) < 2:
        return np.zeros((len(matrix), len(matrix)))
    return squareform(pdist(matrix, "euclidean"))


def _update_cosines(matrix: np.ndarray) -> np.ndarray:
    n = len(matrix)
    out = np.full((n, n), np.nan)
    if n < 2:
        return out
    deltas = np.diff(matrix, axis=0)
    norms = np.linalg.norm(deltas, axis=1)
    safe = np.where(norms > 0, norms, np.nan)
    out[1:, 1:] = (deltas @ deltas.T) / np.outer(safe, safe)
    return out


def _trajectory(matrix: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """2-D PCA of the checkpoints (centred); zeros when there are fewer than 3."""
    if len(matrix) < 3 or matrix.shape[1] < 2:
        return np.zeros((len(matrix), 2)), (0.0, 0.0)
    pca = PCA(n_components=2, random_state=0)
    coords = pca.fit_transform(matrix - matrix.mean(axis=0))
    ratio = pca.explained_variance_ratio_
    return coords, (float(ratio[0]), float(ratio[1]))
