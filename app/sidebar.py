"""The sidebar every page shares: which run is open."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import streamlit as st

import state
from analysis.errors import AnalysisError
from analysis.follow import IDLE_SECONDS, idle_seconds, log_rows
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
    follow_panel(current)
    searched = state.searched_recommendation(current.path, current.stamp)
    return current if searched is None else replace(current, recommendation=searched)


def follow_panel(current) -> None:
    """Follow the open run while it trains (issue 23): every few seconds a fragment looks at the folder's stamp and,
    when it changed, reruns the app, whose caches then read only what is new. Selection, smoothing and zoom stay.

    Off for a finished run: one in which nothing changed for IDLE_SECONDS.
    """
    import cached

    with st.sidebar:
        st.markdown("### Follow")
        on = st.toggle("Follow the run while it trains", value=True, key="follow_run",
                       help="Pick up new log rows and checkpoints without reloading the page")
        every = st.number_input("Look every (seconds)", min_value=1, max_value=3600, value=5, step=1,
                                key="follow_every")
        idle = idle_seconds(current.path)
        finished = idle > IDLE_SECONDS
        run = current.run
        writing = [u for u in run.unreadable if u.being_written]
        st.caption(f"{log_rows(run):,} log rows · {len(run.checkpoints)} checkpoints"
                   + (f" · {len(writing)} being written" if writing else ""))
        if on and finished:
            st.caption(f"Not following: nothing changed for {idle / 60:,.0f} min, the run looks finished.")

        @st.fragment(run_every=float(every) if on and not finished else None)
        def look() -> None:
            if cached.stamp(Path(current.path)) != current.stamp:
                st.rerun()   # the whole app: charts, table and recommendation redrawn from the new run

        look()
