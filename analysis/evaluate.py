"""The evaluator protocol: ``func(state_dict) -> float``, lower is better.

The user names an evaluator explicitly (``--eval path/to/file.py:func``); it is the only
code CkptSelect ever runs that it did not write, and only because the user asked. The built-in
``--eval hf-lm:VAL.txt`` (:mod:`.hf_lm_eval`) scores a Hugging Face causal LM on a text file.
Scores are cached per checkpoint set and weights, so a search never pays twice.

An evaluator runs with the rights of whoever loads it. The web app served with ``ui --root`` loads
only what :func:`check_evaluator_allowed` lets through (issue 19; docs/security.md).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from .merge.in_memory import average_of_inputs, average_state_dict
from .errors import EvaluatorError, InvalidArgument
from .executors import driver_threads, intra_op_threads
from .paths import is_within
from .run import CheckpointRef, Run
from .score_store import ScoreStore, candidate_key, file_digest

if TYPE_CHECKING:
    from .executors import Executor, Resources

StateDictScorer = Callable[[dict[str, torch.Tensor]], float]


@dataclass(frozen=True, slots=True)
class EvaluatorSource:
    """What a worker needs to load the same evaluator (issue 22): the spec (its file path), and for
    ``hf-lm`` the run whose config and tokenizer it reads. The worker imports the file itself."""

    spec: str
    higher_is_better: bool = False
    max_tokens: int | None = None
    run_path: str | None = None
    run_name: str | None = None


@dataclass(frozen=True, slots=True)
class EvalUnit:
    """One candidate average to score on a worker: the evaluator, every input (path or URL, layout), weights."""

    source: EvaluatorSource
    inputs: tuple[tuple[str, str], ...]
    weights: tuple[float, ...]
    output_dtype: str
    tag: int                      # the candidate's place in the batch, to match the result to it
    threads: int = 1              # torch's intra-op threads on the driver: the evaluator runs with as many


@dataclass(frozen=True, slots=True)
class EvalResult:
    """The evaluator's raw return value for unit ``tag`` (checked on the driver, as a local call is)."""

    tag: int
    value: float
    bytes_read: int


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
        self.source: EvaluatorSource | None = None     # set by load_evaluator: how a worker loads it
        self._runner: tuple["Executor", "Resources", Callable[[int, int, int], None] | None] | None = None
        self._prefetched: dict[tuple, float] = {}

    def distribute(self, executor: "Executor", resources: "Resources",
                   progress: Callable[[int, int, int], None] | None = None) -> None:
        """Score candidates as work units on ``executor`` with ``resources`` (``--eval-gpus``) from now on.

        Raises:
            EvaluatorError: the evaluator was not loaded from a spec a worker can load too.
        """
        if self.source is None:
            raise EvaluatorError(f"evaluator {self.name} was not loaded from a file, so a worker cannot load it")
        self._runner = (executor, resources, progress)

    def prefetch(self, candidates: Sequence[tuple[Sequence[CheckpointRef], Sequence[float]]], output_dtype: str,
                 limit: int) -> None:
        """Score the first ``limit`` distinct ``candidates`` not known yet, all at once on the executor.

        Nothing without :meth:`distribute`. The scores are kept until :meth:`score` asks for them (and
        count as calls then, so a search decides as it would one call at a time); each also goes to the
        disk cache as it arrives, so a search that dies keeps what finished.
        """
        if self._runner is None:
            return
        wanted: dict[tuple, tuple[Sequence[CheckpointRef], Sequence[float]]] = {}
        for refs, weights in candidates:
            if len(wanted) >= max(limit, 1):
                break
            wanted.setdefault(self._key(refs, weights, output_dtype), (refs, weights))
        todo = [(key, refs, weights) for key, (refs, weights) in wanted.items()
                if key not in self._cache and key not in self._prefetched
                and (self._store is None or self._store.get(candidate_key(refs, weights, output_dtype)) is None)]
        for key, refs, weights, value in self._run_units(todo, output_dtype):
            self._prefetched[key] = value
            if self._store is not None:
                self._store.put(candidate_key(refs, weights, output_dtype), value)

    def _run_units(self, todo: list, output_dtype: str) -> Iterable[tuple[tuple, Sequence[CheckpointRef],
                                                                           Sequence[float], float]]:
        """Each (key, refs, weights) scored by a unit on the executor, checked, as the units finish."""
        assert self._runner is not None and self.source is not None
        executor, resources, progress = self._runner
        units = [EvalUnit(self.source, tuple((str(r.path), r.layout) for r, w in zip(refs, weights) if w > 0),
                          tuple(float(w) for w in weights if w > 0), output_dtype, tag, driver_threads())
                 for tag, (_, refs, weights) in enumerate(todo)]
        for result in executor.map(evaluate_unit, units, resources, progress):
            key, refs, weights = todo[result.tag]
            yield key, refs, weights, self._checked(result.value)

    @staticmethod
    def _key(refs: Sequence[CheckpointRef], weights: Sequence[float], output_dtype: str) -> tuple:
        """The in-memory cache key of a candidate."""
        return (output_dtype,) + tuple(
            (str(r.path), r.size_bytes, round(float(w), 10)) for r, w in zip(refs, weights) if w > 0)

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
        key = self._key(refs, weights, output_dtype)
        if key in self._cache:
            return self._cache[key]
        if key in self._prefetched:   # scored on the cluster by prefetch (and stored then)
            self.calls += 1
            self._cache[key] = self._prefetched.pop(key)
            return self._cache[key]
        stored_key = candidate_key(refs, weights, output_dtype) if self._store is not None else None
        stored = self._store.get(stored_key) if self._store is not None else None
        if stored is not None:
            self.calls += 1
            self.from_store += 1
            self._cache[key] = stored
            return stored
        kept = [(r, w) for r, w in zip(refs, weights) if w > 0]
        if self._runner is not None:   # one unit on the cluster (the soup's trials depend on each other)
            self.calls += 1
            self._cache[key] = next(iter(self._run_units([(key, refs, weights)], output_dtype)))[3]
        else:
            state = average_state_dict([r for r, _ in kept], [w for _, w in kept], output_dtype)
            self._cache[key] = self._call(state)
        if self._store is not None:
            self._store.put(stored_key, self._cache[key])
        return self._cache[key]

    def _call(self, state_dict: dict[str, torch.Tensor]) -> float:
        self.calls += 1
        return self._checked(self.raw(state_dict))

    def raw(self, state_dict: dict[str, torch.Tensor]) -> float:
        """The function's own return value for ``state_dict``, as a float (what a work unit sends back)."""
        try:
            return float(self.func(state_dict))
        except Exception as e:  # the user's code: any failure is reported, not a crash of ours
            raise EvaluatorError(f"evaluator {self.name} failed: {type(e).__name__}: {e}") from e

    def _checked(self, value: float) -> float:
        """A finite score, turned to lower-is-better.

        Raises:
            EvaluatorError: the value is NaN or infinite.
        """
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

    source = EvaluatorSource(spec, higher_is_better, max_tokens, str(run.path) if run is not None else None,
                             None)
    if is_hf_lm_spec(spec):
        func, name, identity = hf_lm_scorer(spec, run, max_tokens or DEFAULT_MAX_TOKENS)
        return _with_source(Evaluator(func, name, higher_is_better, identity), source)
    path_text, func_name = _split_spec(spec)
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
    evaluator = Evaluator(func, f"{path.name}:{func_name}", higher_is_better, f"{file_digest([path])}:{func_name}")
    return _with_source(evaluator, replace(source, spec=f"{path}:{func_name}", run_path=None, run_name=None))


def _with_source(evaluator: Evaluator, source: EvaluatorSource) -> Evaluator:
    evaluator.source = source
    return evaluator


# Evaluators a worker process has loaded, by source: a model or a tokenizer is loaded once per worker.
_LOADED: dict[EvaluatorSource, Evaluator] = {}


def evaluate_unit(unit: EvalUnit) -> EvalResult:
    """Score one candidate average (the work unit of ``recommend --eval --executor ray``; runs on a worker).

    Loads the evaluator from its file (once per worker process), averages the inputs exactly as the
    merge would (:func:`analysis.merge.in_memory.average_of_inputs`) and returns the raw value.
    """
    evaluator = _LOADED.get(unit.source)
    if evaluator is None:
        run = None
        if unit.source.run_path is not None:
            from .run import open_run
            run = open_run(Path(unit.source.run_path), run_name=unit.source.run_name)
        evaluator = _LOADED[unit.source] = load_evaluator(unit.source.spec, unit.source.higher_is_better, run,
                                                          unit.source.max_tokens)
    with intra_op_threads(unit.threads):
        state = average_of_inputs(unit.inputs, unit.weights, unit.output_dtype)
        value = evaluator.raw(state)
    read = sum(int(t.numel() * t.element_size()) for t in state.values()) * len(unit.inputs)
    return EvalResult(unit.tag, value, read)


def _split_spec(spec: str) -> tuple[str, str]:
    """(file, function) of ``FILE.py:FUNC``.

    Raises:
        EvaluatorError: no ``:`` or an empty side.
    """
    path_text, sep, func_name = spec.rpartition(":")
    if not sep or not path_text or not func_name:
        raise EvaluatorError(f"--eval {spec!r}: expected FILE.py:FUNCTION, e.g. sample_runs/stdlib-gpt/evaluate.py:evaluate")
    return path_text, func_name


def canonical_evaluator_spec(spec: str, base: Path | None = None) -> str:
    """``spec`` with its file made absolute (relative to ``base``, else the working folder) and resolved.

    Two specs naming the same file through different paths or symlinks come out equal, and the
    resolved one is what gets loaded: no second resolution a symlink swapped in between could redirect.

    Raises:
        EvaluatorError: a malformed ``FILE.py:FUNC``.
    """
    from .hf_lm_eval import PREFIX, is_hf_lm_spec

    if is_hf_lm_spec(spec):
        return PREFIX + str(_resolved(spec[len(PREFIX):], base))
    path_text, func_name = _split_spec(spec)
    return f"{_resolved(path_text, base)}:{func_name}"


def _resolved(text: str, base: Path | None) -> Path:
    path = Path(text.strip()).expanduser()
    try:
        return (path if path.is_absolute() or base is None else base / path).resolve()
    except (OSError, RuntimeError) as e:   # a symlink loop
        raise EvaluatorError(f"{text}: cannot be resolved ({e})") from None


def check_evaluator_allowed(spec: str, root: str | Path | None, allowed: Iterable[str] = (),
                            run: Run | None = None) -> str:
    """The evaluator the app may load for ``spec`` under ``ui --root``: its file resolved and checked.

    An evaluator file is imported and run with the server's rights, so a server confined to ``root``
    runs one only if its file, symlinks followed, lies inside ``root``, or if the server was started with
    it (``ckpt-select ui --eval FILE.py:FUNC``: ``allowed``). ``hf-lm:TEXT`` reads its text file and the
    run's config.json and tokenizer files, which must lie inside ``root`` too (or the spec be allowed).
    Relative paths are taken from ``root``. Without a root (the command line) nothing is refused.

    Returns:
        the spec to load: unchanged without a root, else with its file absolute and resolved.

    Raises:
        EvaluatorError: a malformed spec.
        InvalidArgument: a file it would read resolves outside ``root`` and the spec is not allowed.
    """
    if root is None:
        return spec
    from .hf_lm_eval import is_hf_lm_spec

    base = Path(root).expanduser().resolve()
    canonical = canonical_evaluator_spec(spec.strip(), base)
    if is_hf_lm_spec(canonical):
        _check_model_files(run, base)
    if is_within(evaluator_file(canonical), base) or canonical in {canonical_evaluator_spec(a) for a in allowed}:
        return canonical
    what = "hf-lm reads only text files" if is_hf_lm_spec(canonical) else "the app runs only evaluator files"
    raise InvalidArgument(f"{spec.strip()}: {what} inside the allowed folder {base} (the app was started with "
                          "--root) or named with `ckpt-select ui --eval FILE.py:FUNC`; this one resolves outside it")


def evaluator_file(canonical: str) -> Path:
    """The file a canonical spec reads: the text of ``hf-lm:TEXT``, the module of ``FILE.py:FUNC``."""
    from .hf_lm_eval import PREFIX, is_hf_lm_spec

    return Path(canonical[len(PREFIX):] if is_hf_lm_spec(canonical) else canonical.rpartition(":")[0])


def _check_model_files(run: Run | None, base: Path) -> None:
    """Refuse hf-lm when the run's config.json or tokenizer, which it reads, resolves outside ``base``.

    Raises:
        InvalidArgument: naming the first such file.
    """
    from .hf_lm_eval import model_files

    outside = next((f for f in model_files(run) if not is_within(f, base)), None)
    if outside is not None:
        raise InvalidArgument(f"{outside.name}: hf-lm would read this file of the run, and it resolves outside the "
                              f"allowed folder {base} (the app was started with --root)")
