"""Typed access to the app's state: the run, the selection, the merge job, recent runs.

Values shared across pages live in plain session keys set here, never in widget keys,
which Streamlit drops when a widget is not rendered. The run and the selection are
mirrored in the URL (``?run=...&sel=100,200``) so a view can be shared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import streamlit as st

from analysis.errors import AnalysisError
from analysis.paths import is_within, normalized_url, resolve_within
from analysis.remote import RemotePath, as_path, is_url, set_storage_options
from analysis.remote.urls import current_storage_options

RUN_KEY = "run_path"
SELECTION_KEY = "selected_steps"
SELECTION_GEN_KEY = "selection_generation"
JOB_KEY = "merge_job_id"
OVERLAY_KEY = "overlay_runs"
FOLDER_KEY = "runs_folder"
EVALUATOR_KEY = "evaluator_spec"
SEARCH_KEY = "evaluator_search"
LAYER_KEY = "layers_chosen"
RECENT_LIMIT = 10


def root() -> Path | RemotePath | None:
    """The folder or URL prefix (``s3://bucket/runs``, issue 22) the app is confined to (``ui --root``), or None."""
    value = os.environ.get("CKPT_SELECT_ROOT")
    if not value:
        return None
    return normalized_url(value) if is_url(value) else Path(value).resolve()


def cluster_address() -> str | None:
    """The Ray cluster the app runs its similarity pass on (``ui --executor ray --ray-address``), or None: locally."""
    value = os.environ.get("CKPT_SELECT_EXECUTOR") or ""
    return value.removeprefix("ray@") if value.startswith("ray@") else None


def eval_gpus() -> float:
    """GPUs each evaluation on the cluster asks for (``ui --eval-gpus``; 0 when not given or unreadable)."""
    try:
        return max(float(os.environ.get("CKPT_SELECT_EVAL_GPUS") or 0), 0.0)
    except ValueError:
        return 0.0


def apply_storage_options() -> None:
    """``ui --storage-options`` reaches the server process in its environment (never shown): applied whenever the
    process's options differ from it, so the stores (and their caches) are kept across reruns otherwise.

    Compared with the options in force, not with what this function applied before: in a process that
    also serves other scripts (tests, an embedding), someone else may have reset them since.
    """
    value = os.environ.get("CKPT_SELECT_STORAGE_OPTIONS")
    if not value:
        return
    try:
        wanted = json.loads(value)
    except ValueError:
        wanted = None   # set_storage_options says what is wrong with it
    if wanted != current_storage_options():
        set_storage_options(value)


def allow_prune() -> bool:
    """Whether the server was started with ``ui --allow-prune``: needed to delete checkpoints under ``--root``."""
    return os.environ.get("CKPT_SELECT_ALLOW_PRUNE") == "1"


def allowed_evaluators() -> list[str]:
    """Evaluators the server was started with (``ui --eval FILE.py:FUNC``): allowed even outside the root."""
    try:
        specs = json.loads(os.environ.get("CKPT_SELECT_EVALUATORS") or "[]")
    except ValueError:
        return []
    return [s for s in specs if isinstance(s, str)] if isinstance(specs, list) else []


def run_path() -> Path | None:
    """The run to show: chosen in the app, else ``?run=`` in the URL, else the one given to ``ui``."""
    value = st.session_state.get(RUN_KEY) or st.query_params.get("run") or os.environ.get("CKPT_SELECT_RUN")
    if not value:
        return None
    try:
        return resolve_within(value, root())
    except AnalysisError as e:
        st.error(str(e))
        return None


def set_run_path(path: Path) -> None:
    """Switch to another run; the selection starts again from its recommendation."""
    st.session_state[RUN_KEY] = str(path)
    st.session_state.pop(SELECTION_KEY, None)
    st.query_params["run"] = str(path)
    st.query_params.pop("sel", None)
    bump_selection_generation()
    remember_run(path)


def runs_folder() -> Path | RemotePath | None:
    """The folder last opened, which may hold several runs (issue 21); else the run's own folder."""
    value = st.session_state.get(FOLDER_KEY)
    return as_path(value) if value else run_path()


def set_runs_folder(path: Path) -> None:
    """The folder the user opened: its runs are offered in the sidebar."""
    st.session_state[FOLDER_KEY] = str(path)


def selected_steps() -> list[int] | None:
    """The checkpoints selected (None until the user or the URL chose some: then the recommendation)."""
    if SELECTION_KEY not in st.session_state and st.query_params.get("sel"):
        try:
            st.session_state[SELECTION_KEY] = sorted(int(s) for s in st.query_params["sel"].split(",") if s)
        except ValueError:
            st.query_params.pop("sel", None)
    return st.session_state.get(SELECTION_KEY)


def set_selected_steps(steps: list[int]) -> None:
    st.session_state[SELECTION_KEY] = sorted(set(steps))
    st.query_params["sel"] = ",".join(str(s) for s in st.session_state[SELECTION_KEY])


def clear_selection() -> None:
    """Back to the recommendation."""
    st.session_state.pop(SELECTION_KEY, None)
    st.query_params.pop("sel", None)
    bump_selection_generation()


def selection_generation() -> int:
    """Changes whenever the selection is set from code, so the table widget starts afresh."""
    return st.session_state.get(SELECTION_GEN_KEY, 0)


def bump_selection_generation() -> None:
    st.session_state[SELECTION_GEN_KEY] = selection_generation() + 1


def job_id() -> str | None:
    return st.session_state.get(JOB_KEY)


def set_job_id(value: str) -> None:
    st.session_state[JOB_KEY] = value


def searched_recommendation(path: str, stamp: str):
    """The evaluator search's recommendation for this run as it is now (same folder stamp), if one ran."""
    saved = st.session_state.get(SEARCH_KEY)
    return saved[2] if saved is not None and saved[:2] == (path, stamp) else None


def set_searched_recommendation(path: str, stamp: str, rec) -> None:
    """Every page now shows the search's choice; the selection starts again from it."""
    st.session_state[SEARCH_KEY] = (path, stamp, rec)
    clear_selection()


def clear_searched_recommendation() -> None:
    """Back to the recommendation from the logs."""
    st.session_state.pop(SEARCH_KEY, None)
    clear_selection()


def evaluator_spec() -> str:
    return st.session_state.get(EVALUATOR_KEY, "")


def set_evaluator_spec(spec: str) -> None:
    st.session_state[EVALUATOR_KEY] = spec.strip()


def overlay_runs() -> list[str]:
    return st.session_state.get(OVERLAY_KEY, [])


def set_overlay_runs(paths: list[str]) -> None:
    st.session_state[OVERLAY_KEY] = list(paths)


def chosen_layer() -> str | None:
    """The layer whose curves the Layers page shows (issue 25), if one was clicked."""
    return st.session_state.get(LAYER_KEY)


def set_chosen_layer(name: str) -> None:
    st.session_state[LAYER_KEY] = name


def _recent_file() -> Path:
    base = os.environ.get("CKPT_SELECT_STATE_DIR") or Path.home() / ".cache" / "ckpt-select"
    return Path(base) / "recent_runs.json"


def recent_runs() -> list[str]:
    """Runs opened before, newest first (kept across sessions in ~/.cache/ckpt-select)."""
    try:
        items = json.loads(_recent_file().read_text())
    except (OSError, ValueError):
        return []
    allowed = root()
    # Resolved, not compared by name: a remembered folder may since have become a symlink out of the root.
    return [p for p in items if isinstance(p, str) and (allowed is None or is_within(p, allowed))]


def remember_run(path: Path) -> None:
    items = [str(path)] + [p for p in recent_runs() if p != str(path)]
    target = _recent_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(items[:RECENT_LIMIT]))
    except OSError:
        pass  # a read-only home only loses the convenience, never the page
