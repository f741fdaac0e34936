"""Layers: a layer × checkpoint heatmap (relative update size, growth of RMS and max |w|), the flags with their
reasons, what they mean for a pre- or post-norm model, and a clicked layer's curves (issue 25)."""

from __future__ import annotations

import streamlit as st

import charts
import sidebar
import state
from analysis.signals import HEATMAP_METRICS, layer_heatmap

now = sidebar.current_or_stop()
report = now.signals.layers
st.title("Layers")
if report is None or not report.layers:
    st.info("This run has no checkpoints to show layer by layer.")
    st.stop()
st.caption(f"**{report.placement.kind}** — {report.placement.evidence}. "
           + ("Update sizes and cosines are exact." if report.exact else
              f"Update sizes from sketches: within about {100 * report.update_error:.1f}% (one standard error); "
              f"cosines within {report.cosine_error:.3f}."))
for flag in report.flags:
    excluded = " Left out of averages." if flag.excludes else ""
    st.warning(f"{flag.reason}.{excluded}  \n_{report.meaning(flag.kind)}_", icon=":material/flag:")
for lead in report.leads:
    movers = ", ".join(f"{x.layer} ({x.lead_checkpoints} checkpoints before)" for x in lead.leaders[:5])
    st.info(f"{lead.spike.describe()}: moved first: {movers or 'no layer moved beforehand'}.", icon=":material/timeline:")
if not report.flags:
    st.success("No layer flagged.", icon=":material/check:")
metric = st.radio("Colour", list(HEATMAP_METRICS), format_func=HEATMAP_METRICS.get, horizontal=True,
                  key="layers_metric")
grid = layer_heatmap(report, metric)
event = st.plotly_chart(charts.layer_heatmap_figure(grid), key="layer_heatmap", on_select="rerun",
                        selection_mode="points")
chosen = charts.layer_from_selection(event.selection if event else {}, grid.layers)
name = chosen or state.chosen_layer() or (report.flags[0].layer if report.flags else grid.layers[0])
name = name if name in grid.layers else grid.layers[0]   # a layer of another run chosen before
state.set_chosen_layer(name)
st.caption("Click a cell to show that layer's curves.")
st.plotly_chart(charts.layer_curves_figure(report, name), key="layer_curves")
