"""The sidebar every page shares: which run is open."""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

import state
from analysis.errors import AnalysisError
from analysis.paths import resolve_within
from analysis.run import find_run_folders

_ERROR_KEY = "run_picker_error"


def run_picker() -> None:
    """Open a run by typing its folder, from the folders under ``--root``, or from recent runs."""
    with st.sidebar:
        st.markdown("### Run")
        current = state.run_path()
        allowed = state.root()
        choices = [str(p) for p in find_run_folders(allowed)] if allowed else []
        choices += [p for p in state.recent_runs() if p not in choices]
        if choices:
            st.selectbox("Runs found", choices, index=None, key="run_choice", placeholder="Choose a run...",
                         help="Run folders under --root, then recently opened runs",
                         on_change=lambda: _open(st.session_state.get("run_choice")))
        st.text_input("Run folder", value=str(current or ""), key="run_input",
                      help="A folder with training logs and checkpoints")
        st.button("Open run", key="open_run", on_click=lambda: _open(st.session_state.get("run_input")))
        if st.session_state.get(_ERROR_KEY):
            st.error(st.session_state[_ERROR_KEY])
        if current is not None:
            st.caption(f"Open: `{current}`")


def _open(path: str | None) -> None:
    """Callback: switch runs, or keep the error to show on this rerun."""
    st.session_state[_ERROR_KEY] = None
    if not path:
        return
    try:
        state.set_run_path(resolve_within(path, state.root()))
    except AnalysisError as e:
        st.session_state[_ERROR_KEY] = str(e)


def current_or_stop():
    """The open run's cached results, or a message and a stop (never a traceback)."""
    import cached

    path = state.run_path()
    if path is None:
        st.info("Open a run folder in the sidebar: a folder with training logs and checkpoints.")
        st.stop()
    try:
        current = cached.current(path)
    except AnalysisError as e:
        st.error(str(e))
        st.stop()
    # An evaluator search on the Merge page replaces the logs' recommendation on every page, for this run as it is.
    searched = state.searched_recommendation(current.path, current.stamp)
    return current if searched is None else replace(current, recommendation=searched)
