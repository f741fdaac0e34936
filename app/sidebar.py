"""The sidebar every page shares: which run is open."""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

import state
from analysis.errors import AnalysisError, SeveralRuns
from analysis.follow import IDLE_SECONDS, idle_seconds, log_rows
from analysis.paths import resolve_within
from analysis.remote import as_path
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
        _run_choice(current)
        if current is not None:
            st.caption(f"Open: `{current}`")


def _open(path: str | None) -> None:
    """Callback: switch runs, or keep the error to show on this rerun."""
    st.session_state[_ERROR_KEY] = None
    if not path:
        return
    try:
        folder = resolve_within(path, state.root())
        state.set_run_path(folder)
        state.set_runs_folder(folder)
    except AnalysisError as e:
        st.session_state[_ERROR_KEY] = str(e)


def _runs_here() -> list:
    """The runs of the folder opened, each with a folder of its own (issue 21); [] for a one-run folder."""
    import cached

    folder = state.runs_folder()
    if folder is None or not folder.is_dir():
        return []
    try:
        runs = cached.runs_in(folder)
    except AnalysisError:
        return []
    return [r for r in runs if r.path != folder] if len(runs) > 1 else []


def _run_choice(current) -> None:
    """A folder holding several runs: pick one (never averaged together); the Run page can overlay the others."""
    runs = _runs_here()
    if not runs:
        return
    paths = [str(r.path) for r in runs]
    index = paths.index(str(current)) if str(current) in paths else None
    labels = {str(r.path): f"{r.name} ({len(r.checkpoints)} checkpoints)" for r in runs}
    st.selectbox(f"Runs in {state.runs_folder().name}", paths, index=index, key="run_in_folder",
                 format_func=labels.get, placeholder="This folder holds several runs: choose one...",
                 help="Each launch is its own run: its checkpoints are never averaged with another's",
                 on_change=lambda: _choose_run(st.session_state.get("run_in_folder")))


def _choose_run(path: str | None) -> None:
    """Callback: open one run of the folder, keeping the folder's run list in the sidebar."""
    if path:
        folder = state.runs_folder()
        state.set_run_path(as_path(path))
        state.set_runs_folder(folder)


def sibling_runs() -> list[str]:
    """The other runs of the opened folder, for the Run page's overlay (issue 21)."""
    current = str(state.run_path())
    return [str(r.path) for r in _runs_here() if str(r.path) != current]


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
        if isinstance(e, SeveralRuns):
            st.info("Choose one of this folder's runs in the sidebar: runs are never averaged together.")
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
            if cached.stamp(as_path(current.path)) != current.stamp:
                st.rerun()   # the whole app: charts, table and recommendation redrawn from the new run

        look()
