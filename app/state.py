"""Typed access to the app's state: the run being looked at and the user's selection.

Values shared across reruns and pages live in plain session keys set here, never in
widget keys, which Streamlit drops when a widget is not rendered.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from analysis.errors import AnalysisError
from analysis.paths import resolve_within

RUN_KEY = "run_path"
SELECTION_KEY = "selected_steps"
JOB_KEY = "merge_job_id"


def root() -> Path | None:
    """The folder the app is confined to (``ui --root``), or None."""
    value = os.environ.get("CKPT_SELECT_ROOT")
    return Path(value) if value else None


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


def selected_steps() -> list[int] | None:
    """The checkpoints the user selected (None until they change the recommended ones)."""
    return st.session_state.get(SELECTION_KEY)


def set_selected_steps(steps: list[int]) -> None:
    st.session_state[SELECTION_KEY] = sorted(steps)


def job_id() -> str | None:
    return st.session_state.get(JOB_KEY)


def set_job_id(value: str) -> None:
    st.session_state[JOB_KEY] = value
