"""The evaluator protocol: ``func(state_dict) -> float``, lower is better.

The user names an evaluator explicitly (``--eval path/to/file.py:func``); it is the only
code CkptSelect ever runs that it did not write, and only because the user asked. The built-in
``--eval hf-lm:VAL.txt`` (:mod:`.hf_lm_eval`) scores a Hugging Face causal LM on a text file.
Scores are cached per checkpoint set and weights, so a search never pays twice.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .merge.in_memory import average_state_dict
from .errors import EvaluatorError
from .run import CheckpointRef, Run
from .score_store import ScoreStore, candidate_key, file_digest

StateDictScorer = Callable[[dict[str, torch.Tensor]], float]


class Evaluator:
    """A scorer of candidate averages with a cache and a call counter.

    ``calls`` counts candidates scored, whether the function ran or :meth:`persist`'s disk cache held
    the score (``from_store`` of them), so a search under a budget takes the same path when resumed.
    ``identity`` names what the scores depend on (see :mod:`.score_store`); without one, no disk cache.
    """

    def __init__(self, func: StateDictScorer, name: str, higher_is_better: bool = False,
                 identity: str | None = None) -> None:
        self.func, self.name, self.higher_is_better, self.identity = func, name, higher_is_better, identity
        self.calls = 0
        self.from_store = 0
        self._cache: dict[tuple, float] = {}
        self._store: ScoreStore | None = None

    def persist(self, folder: Path | None = None) -> Path:
        """Keep every score on disk from now on (and use those already there); returns the cache file.

        Raises:
            EvaluatorError: the evaluator has no identity to key its scores by.
        """
        if self.identity is None:
            raise EvaluatorError(f"evaluator {self.name} has no identity (source file) to cache its scores under")
        self._store = ScoreStore(f"{self.identity}|higher_is_better={self.higher_is_better}", folder)
        return self._store.path

    def score(self, refs: Sequence[CheckpointRef], weights: Sequence[float], output_dtype: str = "same") -> float:
        """Loss-like score (lower is better) of the average of ``refs`` with ``weights``."""
        key = (output_dtype,) + tuple(
            (str(r.path), r.size_bytes, round(float(w), 10)) for r, w in zip(refs, weights) if w > 0
        )
        if key in self._cache:
            return self._cache[key]
        stored_key = candidate_key(refs, weights, output_dtype) if self._store is not None else None
        stored = self._store.get(stored_key) if self._store is not None else None
        if stored is not None:
            self.calls += 1
            self.from_store += 1
            self._cache[key] = stored
            return stored
        kept = [(r, w) for r, w in zip(refs, weights) if w > 0]
        state = average_state_dict([r for r, _ in kept], [w for _, w in kept], output_dtype)
        self._cache[key] = self._call(state)
        if self._store is not None:
            self._store.put(stored_key, self._cache[key])
        return self._cache[key]

    def _call(self, state_dict: dict[str, torch.Tensor]) -> float:
        self.calls += 1
        try:
            value = float(self.func(state_dict))
        except Exception as e:  # the user's code: any failure is reported, not a crash of ours
            raise EvaluatorError(f"evaluator {self.name} failed: {type(e).__name__}: {e}") from e
        if not math.isfinite(value):
            raise EvaluatorError(f"evaluator {self.name} returned {value}; it must return a finite number")
        return -value if self.higher_is_better else value


def load_evaluator(spec: str, higher_is_better: bool = False, run: Run | None = None,
                   max_tokens: int | None = None) -> Evaluator:
    """Load ``path/to/file.py:func``, or the built-in ``hf-lm:VAL.txt`` for ``run``'s model, as an :class:`Evaluator`.

    ``max_tokens``: how much of the text ``hf-lm`` scores on (default :data:`hf_lm_eval.DEFAULT_MAX_TOKENS`).

    Raises:
        EvaluatorError: bad spec, missing file, import failure, or no such callable.
    """
    from .hf_lm_eval import DEFAULT_MAX_TOKENS, hf_lm_scorer, is_hf_lm_spec

    if is_hf_lm_spec(spec):
        func, name, identity = hf_lm_scorer(spec, run, max_tokens or DEFAULT_MAX_TOKENS)
        return Evaluator(func, name, higher_is_better, identity)
    path_text, sep, func_name = spec.rpartition(":")
    if not sep or not path_text or not func_name:
        raise EvaluatorError(f"--eval {spec!r}: expected FILE.py:FUNCTION, e.g. sample_runs/stdlib-gpt/evaluate.py:evaluate")
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise EvaluatorError(f"{path}: evaluator file not found")
    module_name = f"_ckpt_select_evaluator_{abs(hash(str(path)))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise EvaluatorError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # the user's module failed to import
        sys.modules.pop(module_name, None)
        raise EvaluatorError(f"{path}: importing the evaluator failed: {type(e).__name__}: {e}") from e
    func = getattr(module, func_name, None)
    if not callable(func):
        raise EvaluatorError(f"{path}: has no function {func_name!r}")
    return Evaluator(func, f"{path.name}:{func_name}", higher_is_better, f"{file_digest([path])}:{func_name}")
