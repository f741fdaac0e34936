"""CkptSelect web app: the router. Pages live in views/ (not pages/: st.navigation ignores that)."""

import streamlit as st

st.set_page_config(page_title="CkptSelect", page_icon=":material/layers:", layout="wide")
st.navigation([
    st.Page("views/run.py", title="Run & merge", icon=":material/monitoring:", default=True),
]).run()
