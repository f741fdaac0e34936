"""Run & merge: curves with spikes and checkpoints, the checkpoint table, the merge."""

from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd
import streamlit as st

import cached
import charts
import state
from analysis.errors import AnalysisError
from analysis.paths import resolve_within
from analysis.recommend import RecommendConfig, policy_weights
from analysis.run import folder_stamp

st.title("CkptSelect")

with st.sidebar:
    current = state.run_path()
    typed = st.text_input("Run folder", value=str(current or ""), key="run_input",
                          help="A folder with training logs and checkpoints.")
    if st.button("Open run", key="open_run") and typed:
        try:
            state.set_run_path(resolve_within(typed, state.root()))
        except AnalysisError as e:
            st.error(str(e))
    smoothing = st.slider("Smoothing (debiased EMA)", 0.0, 0.99, 0.6, 0.01, key="smooth")
    log_y = st.toggle("Log-scale loss", value=False, key="logy")

path = state.run_path()
if path is None:
    st.info("Type a run folder in the sidebar and press **Open run**.")
    st.stop()
try:
    stamp = folder_stamp(path)
    run = cached.run(str(path), stamp)
    signals = cached.signals(str(path), stamp)
    rec = cached.recommendation(str(path), stamp, RecommendConfig())
except AnalysisError as e:
    st.error(str(e))
    st.stop()

st.caption(f"{run.path} · {len(run.checkpoints)} checkpoints · {len(run.logs)} logs · "
           f"{len(signals.spikes)} spikes")
st.success(f"**Recommendation:** {rec.summary}", icon=":material/recommend:")

rec_steps = [r.step for r in rec.checkpoints]
selected = state.selected_steps()
selected = rec_steps if selected is None else selected
st.plotly_chart(charts.loss_figure(run, signals, set(selected), smoothing, log_y), key="loss_chart")
training = charts.training_figure(run)
if training is not None:
    with st.expander("Learning rate, grad norm, step time"):
        st.plotly_chart(training, key="training_chart")

st.subheader("Checkpoints")
status = charts.checkpoint_status(signals, set(rec_steps))
reasons = {d.step: d.reason for d in rec.decisions}
table = pd.DataFrame({
    "use": [s.ref.step in rec_steps for s in signals.checkpoints],
    "step": [s.ref.step for s in signals.checkpoints],
    "val loss": [s.val.value if s.val else None for s in signals.checkpoints],
    "status": [status[s.ref.step] for s in signals.checkpoints],
    "size (MB)": [s.ref.size_bytes / 1e6 for s in signals.checkpoints],
    "reason": [reasons[s.ref.step] for s in signals.checkpoints],
})
edited = st.data_editor(
    table, key="ckpt_table", num_rows="fixed", hide_index=True, disabled=[c for c in table.columns if c != "use"],
    column_config={"use": st.column_config.CheckboxColumn("use", help="Average this checkpoint"),
                   "val loss": st.column_config.NumberColumn(format="%.4f"),
                   "size (MB)": st.column_config.NumberColumn(format="%.2f"),
                   "reason": st.column_config.TextColumn(width="large")},
)
chosen = [int(s) for s in edited.loc[edited["use"], "step"]]
state.set_selected_steps(chosen)
if not chosen:
    st.warning("Select at least one checkpoint to merge.")
    st.stop()

st.subheader("Merge")
options = (["recommended"] if chosen == rec_steps else []) + ["sma", "ema", "wma"]
method = st.segmented_control("Weights", options, default=options[0], key="weights_method") or options[0]
alpha = st.slider("EMA alpha (weight of the newest)", 0.05, 1.0, 0.3, 0.05, key="ema_alpha") if method == "ema" else 0.3
weights = rec.weights if method == "recommended" else policy_weights(method, len(chosen), alpha)
recipe_method = rec.method if method == "recommended" else method
st.plotly_chart(charts.weights_figure(chosen, list(weights)), key="weights_chart")

refs = [run.checkpoint_at(s) for s in chosen]
default_out = run.path / "merges" / f"{recipe_method}-{chosen[0]}-{chosen[-1]}"
out_text = st.text_input("Output folder", value=str(default_out), key="out_dir")
job_id = state.job_id()
job = cached.jobs().get(job_id) if job_id else None
running = job is not None and not job.done.is_set()
if st.button("Merge", type="primary", key="merge_button", disabled=running):
    try:
        out_dir = resolve_within(out_text, state.root())
        reasons_taken = {str(s): reasons[s] for s in chosen}
        state.set_job_id(cached.start_merge(refs, tuple(weights), out_dir, recipe_method, reasons_taken))
        running = True
    except AnalysisError as e:
        st.error(str(e))


@st.fragment(run_every=0.5 if running else None)
def merge_progress() -> None:
    """Poll the background merge; a loop in the page body would be killed by any click."""
    current_id = state.job_id()
    current = cached.jobs().get(current_id) if current_id else None
    if current is None:
        return
    if not current.done.is_set():
        st.progress(current.fraction, text=f"Merging {current.total_steps} checkpoints: {current.message}")
    elif running:
        st.rerun()  # once: re-enable the Merge button and stop polling
    elif current.error:
        st.error(current.error)
    elif current.result is not None:
        result = current.result
        st.success(f"Merged {len(result.steps)} checkpoints into `{result.model_file}` "
                   f"({result.size_bytes / 1e6:.2f} MB, {result.n_tensors} tensors).")


merge_progress()

recipe_yaml, mergekit_yaml = cached.recipe_texts(str(run.path), stamp, tuple(chosen), tuple(weights), recipe_method,
                                                 tuple((str(s), reasons[s]) for s in chosen))
left, right = st.columns(2)
left.download_button("Download recipe (YAML)", recipe_yaml, file_name="recipe.yaml", mime="application/x-yaml",
                     on_click="ignore", key="dl_recipe")
right.download_button("Download mergekit config", mergekit_yaml, file_name="mergekit_config.yml",
                      mime="application/x-yaml", on_click="ignore", key="dl_mergekit")
st.caption("Reproduce from the command line:")
st.code(f"python -m analysis merge recipe.yaml -o {shlex.quote(str(Path(out_text)))}", language="bash")
