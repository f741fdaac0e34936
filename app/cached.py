"""The only place with Streamlit caches. Keys include the run's folder stamp so edits reload."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import streamlit as st

import state
from analysis.errors import AnalysisError
from analysis.executors import Executor, Resources, make_executor
from analysis.evaluate import Evaluator, check_evaluator_allowed, load_evaluator
from analysis.merge import MergeResult, merge_recipe
from analysis.recipe import Recipe, dump_mergekit, dump_recipe, recipe_for_selection
from analysis.selection import CooldownReport, Recommendation, RecommendConfig, cooldown_report, recommend
from analysis.report import analysis_report, timing_report
from analysis.follow import RunFollower
from analysis.remote import as_path
from analysis.run import Run, RunInfo, find_runs, folder_stamp
from analysis.scaling import StopSignal, run_stop_signal
from analysis.storage import RunStorageInputs, storage_inputs_from_run
from analysis.signals import (DisplaySeries, RunSignals, SimilarityReport, StepTiming, analyze_step_times,
                              assess_run, compare_checkpoints, display_series, minmax_indices, sketch_run)



def run(path: str, stamp: str) -> Run:
    """The run at ``path`` (``stamp`` from ``folder_stamp`` keys the cache), confined to the app's root.

    The root is part of the cache key: a run read without one must never be served under one (issue 19).
    """
    allowed = state.root()
    return _run(path, stamp, str(allowed) if allowed is not None else None)


@st.cache_resource(max_entries=8, show_spinner="Reading the run's logs and checkpoints...")
def _run(path: str, stamp: str, root: str | None) -> Run:
    """A shared resource, not cache_data: the Run is frozen and never changed, and cache_data
    would unpickle a copy of its metrics (7 million rows for a million-step log) on every rerun.

    Read by the run's follower: a new stamp (a run still training) reads only the new log bytes and
    checkpoints, not every log from the start (issue 23).
    """
    return _follower(path, root).refresh().run


@st.cache_resource(max_entries=8, show_spinner=False)
def _follower(path: str, root: str | None) -> RunFollower:
    """One follower per run (and root), shared by every session: it remembers where each log was read to."""
    return RunFollower(as_path(path), as_path(root) if root is not None else None)   # a URL stays one (issue 22)


def stamp(path: Path) -> str:
    """The cache key of the run at ``path`` as it is now: its folder stamp, and the root it is confined to."""
    allowed = state.root()
    return folder_stamp(path) + (f"|root={allowed}" if allowed is not None else "")


def runs_in(folder: Path) -> list[RunInfo]:
    """The runs the folder holds (issue 21), cached until a file under it changes."""
    allowed = state.root()
    return _runs_in(str(folder), folder_stamp(folder), str(allowed) if allowed is not None else None)


@st.cache_data(max_entries=16, show_spinner="Looking for the runs in this folder...")
def _runs_in(folder: str, stamp: str, root: str | None) -> list[RunInfo]:
    return find_runs(folder, root)


@st.cache_data(max_entries=8, show_spinner="Checking every checkpoint (health, spikes, validation)...")
def signals(path: str, stamp: str) -> RunSignals:
    return assess_run(run(path, stamp))


@st.cache_data(max_entries=8, show_spinner="Sketching checkpoints for similarity (cached on disk)...")
def similarity(path: str, stamp: str) -> SimilarityReport | None:
    the_run = run(path, stamp)
    return compare_checkpoints(the_run.checkpoints) if the_run.checkpoints else None


@st.cache_data(max_entries=8)
def report(path: str, stamp: str) -> dict:
    """The `analyze --json` document: the checkpoint table shows exactly these numbers."""
    return analysis_report(run(path, stamp), signals(path, stamp), similarity(path, stamp), _step_timing(path, stamp))


@st.cache_data(max_entries=8)
def _step_timing(path: str, stamp: str) -> StepTiming:
    """Step-time analysis (~1 s for a million steps), shared by the Run page and the report."""
    return analyze_step_times(run(path, stamp))


@st.cache_data(max_entries=8)
def timing(path: str, stamp: str) -> dict:
    """The `timing` record of `analyze --json` (no checkpoint is read for it)."""
    return timing_report(_step_timing(path, stamp))


@st.cache_data(max_entries=32, show_spinner="Choosing checkpoints to average...")
def recommendation(path: str, stamp: str, config: RecommendConfig) -> Recommendation:
    return recommend(signals(path, stamp), config)


@st.cache_data(max_entries=32, show_spinner=False)
def _decimation(_run: Run, fingerprint: str, metric: str) -> np.ndarray:
    """Which points of ``metric`` are drawn (min/max per bucket): the same for every axis and smoothing."""
    return minmax_indices(_run.metric(metric)["value"].to_numpy(float))


@st.cache_data(max_entries=64, show_spinner=False)
def _display_series(_run: Run, fingerprint: str, metric: str, axis: str, smoothing: float | None) -> DisplaySeries:
    return display_series(_run, metric, axis, smoothing, _decimation(_run, fingerprint, metric))


def series(the_run: Run, metric: str, axis: str, smoothing: float | None) -> DisplaySeries:
    """A metric ready to draw, cached per (run fingerprint, metric, axis, smoothing).

    A smoothing, axis or log-y change then redraws from a few thousand points instead of
    smoothing and decimating a million again (charts.SeriesSource).
    """
    return _display_series(the_run, the_run.fingerprint, metric, axis, smoothing)


@st.cache_data(max_entries=8, show_spinner="Fitting the loss curve...")
def stop_signal(path: str, stamp: str) -> StopSignal | None:
    """The run's stop signal, or None when its curve cannot be fit (the page says why)."""
    try:
        return run_stop_signal(run(path, stamp))
    except AnalysisError:
        return None


@dataclass(frozen=True)
class Current:
    """Everything a page needs about the run being looked at."""

    path: str
    stamp: str
    run: Run
    signals: RunSignals
    recommendation: Recommendation


def current(path: Path) -> Current:
    """Load (from cache when unchanged) the run at ``path``; AnalysisError propagates to the page.

    The stamp names the root too: every cache keyed by it then holds results of the run as confined.
    """
    key, now = str(path), stamp(path)
    the_run = run(key, now)
    sketch_on_cluster(key, now, the_run)
    return Current(key, now, the_run, signals(key, now), recommendation(key, now, RecommendConfig()))


@st.cache_resource(show_spinner="Joining the Ray cluster...")
def cluster(address: str) -> Executor:
    """The app's executor on the cluster of ``ui --executor ray`` (joined once per server)."""
    return make_executor("ray", address)


_sketched: set[tuple[str, str]] = set()


def sketch_on_cluster(path: str, stamp: str, the_run: Run) -> None:
    """With ``ui --executor ray`` (issue 22): sketch the run's new checkpoints as tasks on the cluster, into the
    on-disk cache the analysis then reads, showing tasks done / total and bytes read while it runs."""
    address = state.cluster_address()
    if address is None or (path, stamp) in _sketched or not the_run.checkpoints:
        return
    bar = st.progress(0.0, text="Sketching the checkpoints on the Ray cluster...")
    sketch_run(list(the_run.checkpoints), cluster(address), progress=lambda done, text: bar.progress(
        min(done, 1.0), text=f"Sketching on the Ray cluster: {text}"))
    bar.empty()
    _sketched.add((path, stamp))


@st.cache_data(max_entries=32, show_spinner="Hashing the selected checkpoints for the recipe...")
def selection_recipe(path: str, stamp: str, steps: tuple[int, ...], weights: tuple[float, ...], method: str,
                     output_dtype: str, reasons: tuple[tuple[str, str], ...],
                     settings: tuple[tuple[str, object], ...] = ()) -> Recipe:
    """The selection's recipe, hashed once: the page's downloads and its merge share it (issue 20).

    ``settings``: what the recipe records besides weights, e.g. a decay's schedule (issue 24).
    """
    return recipe_for_selection(run(path, stamp), steps, weights, method, output_dtype, dict(reasons),
                                settings=dict(settings))


@st.cache_data(max_entries=32, show_spinner=False)
def recipe_texts(path: str, stamp: str, steps: tuple[int, ...], weights: tuple[float, ...], method: str,
                 output_dtype: str, reasons: tuple[tuple[str, str], ...],
                 settings: tuple[tuple[str, object], ...] = ()) -> tuple[str, str]:
    """(our recipe YAML, mergekit YAML) of :func:`selection_recipe`; paths absolute so they work anywhere.

    The recipe text is the one the merge writes beside its output, byte for byte.
    """
    recipe = selection_recipe(path, stamp, steps, weights, method, output_dtype, reasons, settings)
    return dump_recipe(recipe), dump_mergekit(recipe)


@st.cache_data(max_entries=8, show_spinner="Predicting what a cooldown would give...")
def cooldown(path: str, stamp: str) -> CooldownReport:
    """The Run page's "what would a cooldown give?" panel: ``recommend --cooldown`` from the logs (issue 24)."""
    return cooldown_report(signals(path, stamp))


@st.cache_data(max_entries=8, show_spinner=False)
def storage_inputs(path: str, stamp: str) -> RunStorageInputs:
    """The Storage page's defaults: what `storage --run` takes from the run (issue 20)."""
    return storage_inputs_from_run(run(path, stamp), recommendation(path, stamp, RecommendConfig()))


def evaluator(spec: str, path: str, stamp: str, on_disk: bool = False) -> Evaluator:
    """A loaded evaluator for the run at ``path``, if the app may run it (``ui --root``, ``ui --eval``).

    Checked on every call, outside the cache: an evaluator loaded once must not outlive the rule.

    Raises:
        InvalidArgument: the evaluator's file resolves outside the root and was not allowed (issue 19).
    """
    allowed = check_evaluator_allowed(spec, state.root(), state.allowed_evaluators(), run(path, stamp))
    return _evaluator(allowed, path, stamp, on_disk)


@st.cache_resource(max_entries=4)
def _evaluator(spec: str, path: str, stamp: str, on_disk: bool = False) -> Evaluator:
    """Shared (it caches its scores per candidate average).

    ``hf-lm:VAL.txt`` takes its model and tokenizer from the run, hence the run in the key. ``on_disk``
    keeps its scores in the score store ``recommend --eval-cache`` uses (its own cached object, so
    turning it off stops writing). With ``ui --executor ray`` its evaluations are tasks on the cluster,
    each with ``--eval-gpus`` GPUs, as ``recommend --eval --executor ray`` runs them (issue 22).
    """
    loaded = load_evaluator(spec, run=run(path, stamp))
    if on_disk:
        loaded.persist()
    address = state.cluster_address()
    if address is not None:
        loaded.distribute(cluster(address), Resources(num_gpus=state.eval_gpus()))
    return loaded


@dataclass
class MergeJob:
    """A merge running in a background thread; the page polls it. No st.* calls in the thread."""

    out_dir: Path
    total_steps: int
    fraction: float = 0.0
    message: str = "starting"
    result: MergeResult | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


@st.cache_resource
def jobs() -> dict[str, MergeJob]:
    """Process-wide registry of merge jobs: survives reruns and page switches."""
    return {}


def start_merge(recipe: Recipe, out_dir: Path) -> str:
    """Start merging ``recipe`` (from :func:`selection_recipe`) in a thread; return its job id.

    ``quick`` verification: the recipe may come from the cache, and a checkpoint rewritten since it was
    hashed must not be merged under its old hash.
    """
    job = MergeJob(out_dir, len(recipe.checkpoints))
    job_id = uuid.uuid4().hex
    jobs()[job_id] = job

    def progress(fraction: float, message: str) -> None:
        job.fraction, job.message = fraction, message

    def work() -> None:
        try:
            job.result = merge_recipe(recipe, out_dir, "quick", progress)
        except AnalysisError as e:
            job.error = str(e)
        except Exception as e:  # a bug: shown to the user with its type rather than lost in a thread
            job.error = f"internal error: {type(e).__name__}: {e}"
        finally:
            job.done.set()

    threading.Thread(target=work, name=f"merge-{job_id[:8]}", daemon=True).start()
    return job_id
