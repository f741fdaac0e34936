"""CkptSelect's analysis core: read a training run, judge its checkpoints, recommend and merge.

Nothing here imports Streamlit; the app and the CLI call these functions and draw.
"""

__version__ = "0.1.0"
