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

from .averaging import average_state_dict
from .errors import EvaluatorError
from .run import CheckpointRef, Run

StateDictScorer = Callable[[dict[str, torch.Tensor]], float]


class Evaluator:
    """A scorer of candidate averages with a cache and a call counter."""

    def __init__(self, func: StateDictScorer, name: str, higher_is_better: bool = False) -> None:
        self.func, self.name, self.higher_is_better = func, name, higher_is_better
        self.calls = 0
        self._cache: dict[tuple, float] = {}

    def score(self, refs: Sequence[CheckpointRef], weights: Sequence[float], output_dtype: str = "same") -> float:
        """Loss-like score (lower is better) of the average of ``refs`` with ``weights``."""
        key = (output_dtype,) + tuple(
            (str(r.path), r.size_bytes, round(float(w), 10)) for r, w in zip(refs, weights) if w > 0
        )
        if key not in self._cache:
            kept = [(r, w) for r, w in zip(refs, weights) if w > 0]
            state = average_state_dict([r for r, _ in kept], [w for _, w in kept], output_dtype)
            self._cache[key] = self._call(state)
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
        func, name = hf_lm_scorer(spec, run, max_tokens or DEFAULT_MAX_TOKENS)
        return Evaluator(func, name, higher_is_better)
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
    return Evaluator(func, f"{path.name}:{func_name}", higher_is_better)
