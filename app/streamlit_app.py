"""CkptSelect web app: the router and the shared sidebar. Pages live in views/ (not pages/)."""

import streamlit as st

import sidebar
import state

st.set_page_config(page_title="CkptSelect", page_icon=":material/layers:", layout="wide")
state.apply_storage_options()
sidebar.run_picker()
st.navigation([
    st.Page("views/run.py", title="Run", icon=":material/monitoring:", default=True),
    st.Page("views/checkpoints.py", title="Checkpoints", icon=":material/table_rows:"),
    st.Page("views/layers.py", title="Layers", icon=":material/stacked_bar_chart:"),
    st.Page("views/merge.py", title="Merge", icon=":material/merge:"),
    st.Page("views/storage.py", title="Storage", icon=":material/storage:"),
]).run()
