"""Run: loss curves with spikes and checkpoints, training dynamics, and whether to keep training."""

from __future__ import annotations


import streamlit as st

import cached
import charts
import sidebar
import state
from analysis.errors import AnalysisError
from analysis.remote import as_path
from analysis.run import printable
from analysis.signals import available_axes

now = sidebar.current_or_stop()
run, signals, rec = now.run, now.signals, now.recommendation
st.title(run.name)
st.caption(f"{run.path} · {len(run.checkpoints)} checkpoints · {len(run.logs)} logs · "
           f"{len(signals.spikes)} spike events")
for note in run.notes:
    st.caption(printable(f"Note: {note}"))
for bad in run.unreadable:   # passed over, and left out of every recommendation (issue 19)
    st.warning(printable(f"Passed over {bad.describe()}"))

left, middle, right = st.columns([2, 2, 1])
smoothing = left.slider("Smoothing (debiased EMA, as TensorBoard)", 0.0, 0.99, 0.6, 0.01, key="smooth",
                        bind="query-params")
axes = available_axes(run)
axis = middle.segmented_control("X axis", axes, default="step", key="x_axis",
                                format_func=lambda a: charts.AXIS_TITLES[a]) or "step"
log_y = right.toggle("Log-scale loss", value=False, key="logy")

others = [p for p in dict.fromkeys(sidebar.sibling_runs() + state.recent_runs()) if p != str(run.path)]
overlay = st.multiselect("Overlay other runs", others, default=[p for p in state.overlay_runs() if p in others],
                         key="overlay_pick", help="The folder's other runs and recently opened runs, drawn in other colours")
state.set_overlay_runs(overlay)
overlays = []
for other in overlay:
    try:
        overlays.append(cached.current(as_path(other)).run)
    except AnalysisError as e:
        st.warning(f"Cannot overlay {other}: {e}")

selected = state.selected_steps()
selected = [r.step for r in rec.checkpoints] if selected is None else selected
st.plotly_chart(charts.loss_figure(run, signals, set(selected), smoothing, log_y, axis, tuple(overlays),
                                  cached.series),
                key="loss_chart")
for spike in signals.loss_spikes:
    st.caption(f":red[●] {spike.describe()}")
for item in signals.checkpoints:
    if item.cleared is not None:
        st.caption(f":green[●] Checkpoint {item.ref.step}: {item.cleared.describe()}.")
grad_events = signals.grad_norm_spikes
if grad_events:
    with st.expander(f"{len(grad_events)} grad-norm spikes (faint bands; they do not exclude checkpoints)"):
        shown = sorted(grad_events, key=lambda s: -s.ratio)[:charts.MAX_BANDS]
        st.caption("\n\n".join(s.describe() for s in sorted(shown, key=lambda s: s.start_step)))
        if len(grad_events) > len(shown):
            st.caption(f"... and {len(grad_events) - len(shown)} smaller ones (all in `analyze --json`).")

timing = cached.timing(now.path, now.stamp)
slow_steps = tuple(s["step"] for s in timing["slow_iterations"])
saved_lrs = tuple((c.ref.step, c.lr) for c in signals.checkpoints if c.lr_saved and c.lr is not None)
training = charts.training_figure(run, axis, slow_steps, cached.series, saved_lrs)
if training is not None:
    st.subheader("Learning rate, grad norm, step time")
    if timing["steady_step_ms"] is not None:
        cols = st.columns(4)
        cols[0].metric("steady step", f"{timing['steady_step_ms']:,.1f} ms")
        cols[1].metric("eval iterations", f"{100 * (timing['eval_share'] or 0):.1f} % of wall time",
                       help=f"about {(timing['eval_cost_ms'] or 0) / 1000:,.2f} s extra each")
        cols[2].metric("checkpoint iterations", f"{100 * (timing['checkpoint_share'] or 0):.1f} % of wall time",
                       help=f"about {(timing['checkpoint_cost_ms'] or 0) / 1000:,.2f} s extra each")
        cols[3].metric("eval + checkpoint", f"{100 * (timing['eval_checkpoint_share'] or 0):.1f} % of wall time")
    st.plotly_chart(training, key="training_chart")

st.subheader("Should I keep training?")
signal = cached.stop_signal(now.path, now.stamp)
if signal is None:
    st.info("Not enough loss points to fit a curve (needs at least 5 after warm-up).")
else:
    (st.warning if signal.plateau else st.success)(signal.verdict)
    fit = signal.fit
    cols = st.columns(3)
    cols[0].metric("fitted floor E (nats)", f"{fit.e:.4f}")
    cols[1].metric("exponent β", f"{fit.beta:.3f}")
    cols[2].metric(f"loss at 2x the {fit.x_unit}", f"{signal.forecasts[0].value:.4f}")
    st.plotly_chart(charts.stop_figure(run, signal), key="stop_chart")

with st.expander("What would a cooldown give? Decay-emulating merges of the stable phase (`recommend --cooldown`)"):
    try:
        cooldown = cached.cooldown(now.path, now.stamp)
    except AnalysisError as e:
        st.info(f"No cooldown estimate: {e}")
    else:
        st.caption(cooldown.basis)
        st.dataframe([{"schedule": r.schedule, "window": r.describe.split(" over ", 1)[-1],
                       "predicted loss": r.predicted_loss, "vs newest stable": r.vs_stable,
                       "vs real decay's end": r.vs_decay} for r in cooldown.rows], hide_index=True, key="cooldown_table")
