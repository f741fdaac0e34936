"""Checkpoints: every checkpoint's signals and the recommendation's reason; select by ticking."""

from __future__ import annotations

import streamlit as st

import cached
import charts
import sidebar
import state


def _val_from(row: dict) -> str:
    """Where a checkpoint's val loss came from: "logged @ 1200", "interpolated @ 1000-2000", "train mean @ 1001-1200"."""
    if row["val_loss"] is None:
        return ""
    between = row["val_loss_between"]
    if row["val_loss_source"] == "train":   # the run logs no val loss: the train loss since the checkpoint before
        return f"train mean @ {between[0] + 1}-{between[1]}"
    return f"{row['val_loss_source']} @ " + (f"{between[0]}-{between[1]}" if between else f"{row['val_loss_step']}")


now = sidebar.current_or_stop()
run, signals, rec = now.run, now.signals, now.recommendation
report = cached.report(now.path, now.stamp)
st.title("Checkpoints")
st.page_link("views/layers.py", label="Layer by layer: which layers grow, which move, and what came before a spike",
             icon=":material/stacked_bar_chart:")
st.success(f"**Recommendation:** {rec.summary}", icon=":material/recommend:")
if rec.predicted_gain is not None:
    noise_col, gain_col = st.columns(2)
    noise_col.metric("Iterate noise at the newest LR", f"{rec.iterate_noise:.4f} nats",
                     help="lr / 4 × Σ√v over the newest saved Adam second moments: the loss weight jitter "
                          "adds to every checkpoint, of which an average with weights w keeps Σw²")
    gain_col.metric("Predicted gain vs the last checkpoint", f"{rec.predicted_gain:.4f} nats",
                    help="From the logged val (or, in a run that logs none, train) losses and the iterate noise; "
                         "an evaluator (--eval) measures it")

elif rec.basis == "evaluator":
    st.caption(f"{rec.basis_note} The search ran on the Merge page, which can go back to the recommendation "
               "from the logs.")
elif rec.basis in ("val band", "default"):   # a heuristic: say what is missing and what would do better
    st.info(rec.basis_note.replace("--eval FILE.py:FUNC", "an evaluator (Merge page, or --eval FILE.py:FUNC)"),
            icon=":material/lightbulb:")

rec_steps = [r.step for r in rec.checkpoints]
selected = state.selected_steps()
selected = rec_steps if selected is None else selected
reasons = {d.step: d.reason for d in rec.decisions}
status = charts.checkpoint_status(signals, set(rec_steps))
rows = report["checkpoints"]
if any(c["val_loss_source"] == "train" for c in rows):
    error = rec.stand_in_error
    luck = (f" Batch luck moves each of these means by about {error:.4f} nats (its sampling error, from the "
            "scatter of its rows); a val loss over a fixed set would not." if error is not None else "")
    st.info("This run logs no val loss: each checkpoint's \"val loss\" is the mean train loss logged since the "
            "checkpoint before (spike rows left out), the stand-in the recommendation uses. Batches seen in an "
            f"earlier epoch make it read low.{luck}", icon=":material/info:")
table = {   # drawn as is: every number comes from the `analyze --json` report
    "use": [c["step"] in selected for c in rows],
    "step": [c["step"] for c in rows],
    "val loss": [c["val_loss"] for c in rows],
    "val from": [_val_from(c) for c in rows],
    "LR": [c["lr"] for c in rows],
    "LR from": [c["lr_source"] or "" for c in rows],
    "status": [{"selected": "recommended"}.get(status[c["step"]], status[c["step"]]) for c in rows],
    "finite": [c["finite"] for c in rows],
    "weight norm": [c["weight_norm"] for c in rows],
    "update norm": [c["update_norm"] for c in rows],
    "update cos": [c["update_cosine"] for c in rows],
    "grad cos": [c["grad_cosine"] for c in rows],
    "dist. to newest": [c["distance_to_newest"] for c in rows],
    "size (MB)": [c["bytes"] / 1e6 for c in rows],
    "reason": [reasons[c["step"]] for c in rows],
}
editor_key = f"ckpt_table_{state.selection_generation()}"


def _apply_edits() -> None:
    """Callback: fold the ticks into the shared selection, then start the table afresh."""
    edits = st.session_state[editor_key]["edited_rows"]
    chosen = {int(table["step"][i]) for i in range(len(rows)) if edits.get(i, {}).get("use", table["use"][i])}
    state.set_selected_steps(sorted(chosen))
    state.bump_selection_generation()


st.data_editor(
    table, key=editor_key, num_rows="fixed", hide_index=True, on_change=_apply_edits,
    height=min(36 * (len(rows) + 1) + 2, 640),
    disabled=[c for c in table if c != "use"],
    column_config={"use": st.column_config.CheckboxColumn("use", help="Average this checkpoint"),
                   "val loss": st.column_config.NumberColumn(format="%.4f"),
                   "LR": st.column_config.NumberColumn(format="%.3g", help="The learning rate the checkpoint was "
                                                       "saved at: the LR regime and its iterate noise follow it"),
                   "LR from": st.column_config.TextColumn(help="logged, or read from the checkpoint's optimizer "
                                                               "state where the logs hold no LR"),
                   "weight norm": st.column_config.NumberColumn(format="%.3f"),
                   "update norm": st.column_config.NumberColumn(format="%.4g", help="|θ_i − θ_(i−1)|"),
                   "update cos": st.column_config.NumberColumn(
                       format="%.3f", help="cos(Δ_i, Δ_(i−1)): near 1 consistent drift, near 0 or below oscillation"),
                   "grad cos": st.column_config.NumberColumn(format="%.3f", help="cosine of successive Adam first moments"),
                   "dist. to newest": st.column_config.NumberColumn(format="%.4g", help="|θ_i − θ_newest|"),
                   "size (MB)": st.column_config.NumberColumn(format="%.2f"),
                   "reason": st.column_config.TextColumn(width="large")},
)
left, right = st.columns(2)
left.button("Reset to the recommendation", key="reset_selection", on_click=state.clear_selection)
right.button("Clear the selection", key="clear_selection",
             on_click=lambda: (state.set_selected_steps([]), state.bump_selection_generation()))
st.caption(f"{len(selected)} selected: {', '.join(str(s) for s in sorted(selected)) or 'none'}. "
           "The Merge page averages these.")

bad = [c for c in rows if c["mismatch"] or not c["finite"]]
for c in bad:
    st.warning(f"Step {c['step']}: " + (f"NaN/Inf in {', '.join(c['nonfinite_tensors'][:3])}" if not c["finite"]
                                         else f"tensors differ from the newest: {c['mismatch']}"))

similarity = report["similarity"]
if similarity and len(similarity["steps"]) >= 2:
    st.subheader("Similarity")
    exactness = ("exact (small model)" if similarity["exact"] else
                 f"from sketches; cosine standard error at most {similarity['cosine_error_bound']:.4f}")
    st.caption(f"Weight distances and trajectory {exactness}. Box- or lasso-select points on the "
               "trajectory to select those checkpoints.")
    steps = similarity["steps"]
    left, right = st.columns(2)
    left.plotly_chart(charts.distance_heatmap(steps, similarity["distance_matrix"],
                                              set(selected)), key="distance_heatmap")

    def _select_from_trajectory() -> None:
        """Callback: copy the box/lasso selection into the shared selection (the chart's own resets)."""
        picked = charts.steps_from_selection(st.session_state["trajectory_chart"], steps)
        if picked:
            state.set_selected_steps(picked)
            state.bump_selection_generation()

    right.plotly_chart(
        charts.trajectory_figure(steps, similarity["trajectory"],
                                 tuple(similarity["explained_variance"]), charts.checkpoint_status(signals, set(selected))),
        key="trajectory_chart", on_select=_select_from_trajectory, selection_mode=("box", "lasso"))
