"""Pure figure builders: core results in, plotly figures out (testable without Streamlit)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.run import Run
from analysis.scaling import StopSignal
from analysis.signals import DisplaySeries, LayerHeatmap, LayerReport, RunSignals, display_series, step_to_axis
from analysis.storage import StorageEstimate

COLORS = {
    "train": "#1f77b4", "val": "#ff7f0e", "selected": "#2ca02c", "spike": "#d62728",
    "nonfinite": "#111111", "mismatch": "#9467bd", "other": "#9e9e9e",
}
OVERLAY_COLORS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
AXIS_TITLES = {"step": "step", "tokens": "tokens", "wall_hours": "wall time (h)"}
STATUS_LABELS = {"selected": "checkpoint: selected", "other": "checkpoint", "spike": "checkpoint: in a spike",
                 "nonfinite": "checkpoint: NaN/Inf", "mismatch": "checkpoint: mismatched tensors"}
# (run, metric, axis, smoothing) -> the series to draw; the app passes a cached one.
SeriesSource = Callable[[Run, str, str, "float | None"], DisplaySeries]
MAX_BANDS = 200  # grad-norm event bands drawn (largest first); a browser slows down on thousands of shapes


def checkpoint_status(signals: RunSignals, selected: set[int]) -> dict[int, str]:
    """Step -> one of selected / spike / nonfinite / mismatch / other, for colouring."""
    status = {}
    for item in signals.checkpoints:
        step = item.ref.step
        if not item.health.finite:
            status[step] = "nonfinite"
        elif item.spike is not None:
            status[step] = "spike"
        elif item.mismatch is not None:
            status[step] = "mismatch"
        else:
            status[step] = "selected" if step in selected else "other"
    return status


def loss_figure(run: Run, signals: RunSignals, selected: set[int], smoothing: float = 0.6, log_y: bool = False,
                axis: str = "step", overlays: tuple[Run, ...] = (), series: SeriesSource = display_series) -> go.Figure:
    """Train loss (raw faint, smoothed), val loss, spikes shaded, checkpoints marked, other runs overlaid."""
    fig = go.Figure()
    _add_loss_traces(fig, run, smoothing, axis, COLORS["train"], COLORS["val"], "", series)
    for index, other in enumerate(overlays):
        color = OVERLAY_COLORS[index % len(OVERLAY_COLORS)]
        _add_loss_traces(fig, other, smoothing, axis, color, color, f"{other.name}: ", series)
    _add_spike_bands(fig, run, signals, axis)
    _add_checkpoint_markers(fig, run, signals, selected, axis)
    fig.update_layout(xaxis_title=AXIS_TITLES[axis], yaxis_title="loss (nats)", hovermode="closest",
                      legend={"orientation": "h", "y": -0.2}, margin={"t": 30, "b": 10},
                      yaxis_type="log" if log_y else "linear",
                      uirevision=f"{run.path}|{axis}|{log_y}")   # a followed run's new rows keep the user's zoom (issue 23)
    return fig


def _add_spike_bands(fig: go.Figure, run: Run, signals: RunSignals, axis: str) -> None:
    """Loss spikes shaded and named; grad-norm-only events as faint bands (the largest MAX_BANDS).

    Shapes go in with one layout update: ``add_vrect`` re-validates every shape already
    there, so thousands of grad-norm events (a long, noisy run) took minutes.
    """
    loss = list(signals.loss_spikes)
    grad = sorted(signals.grad_norm_spikes, key=lambda s: -s.ratio)[:MAX_BANDS]
    shapes, notes = [], []
    for index, spike in enumerate(loss + grad):
        x0, x1 = step_to_axis(run, np.array([spike.onset_after_step, spike.end_step]), axis)
        is_loss = index < len(loss)  # the events that contaminate checkpoints
        shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": x0, "x1": x1, "y0": 0, "y1": 1,
                       "fillcolor": COLORS["spike" if is_loss else "other"], "opacity": 0.18 if is_loss else 0.08,
                       "line": {"width": 0}, "layer": "below"})
        if is_loss:
            notes.append({"x": x0, "y": 1, "xref": "x", "yref": "paper", "xanchor": "left", "yanchor": "top",
                          "text": f"loss spike {spike.start_step}-{spike.end_step}", "showarrow": False})
    fig.update_layout(shapes=shapes, annotations=notes)


def _add_loss_traces(fig: go.Figure, run: Run, smoothing: float, axis: str, train_color: str, val_color: str,
                     prefix: str, series: SeriesSource) -> None:
    if len(run.metric("train_loss")):
        x, raw, smooth = _unpack(series(run, "train_loss", axis, smoothing))
        fig.add_trace(go.Scatter(x=x, y=raw, mode="lines", name=f"{prefix}train loss (raw)", opacity=0.25,
                                 line={"color": train_color, "width": 1}, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=smooth, mode="lines", name=f"{prefix}train loss (EMA {smoothing:g})",
                                 line={"color": train_color, "width": 2}, customdata=raw,
                                 hovertemplate="%{x}<br>smoothed %{y:.4f}<br>raw %{customdata:.4f}<extra></extra>"))
    if len(run.metric("val_loss")):
        x, raw, _ = _unpack(series(run, "val_loss", axis, None))
        fig.add_trace(go.Scatter(x=x, y=raw, mode="lines+markers", name=f"{prefix}val loss",
                                 line={"color": val_color, "dash": "dot" if prefix else "solid"}, marker={"size": 5}))


def _unpack(series: DisplaySeries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return series.x, series.raw, series.smooth


def _add_checkpoint_markers(fig: go.Figure, run: Run, signals: RunSignals, selected: set[int], axis: str) -> None:
    """One marker trace per status, placed at the checkpoint's val loss (or its smoothed train loss)."""
    status = checkpoint_status(signals, selected)
    train = run.metric("train_loss")
    for kind, label in STATUS_LABELS.items():
        items = [s for s in signals.checkpoints if status[s.ref.step] == kind]
        if not items:
            continue
        steps = np.array([s.ref.step for s in items])
        y = [s.val.value if s.val else _nearest(train, s.ref.step) for s in items]
        fig.add_trace(go.Scatter(
            x=step_to_axis(run, steps, axis), y=y, mode="markers", name=label,
            marker={"symbol": "x" if kind == "nonfinite" else "diamond", "size": 11,
                    "color": COLORS[kind], "line": {"width": 1, "color": "white"}},
            text=[f"{s.ref.name} (step {s.ref.step})<br>"
                  + (s.val.describe() if s.val else "no val loss near it: placed on the train loss") for s in items],
            hovertemplate="%{text}<extra></extra>",
        ))


def _nearest(frame, step: int) -> float | None:
    if frame.empty:
        return None
    index = int(np.argmin(np.abs(frame["step"].to_numpy() - step)))
    return float(frame["value"].iloc[index])


def training_figure(run: Run, axis: str = "step", slow_steps: tuple[int, ...] = (),
                    series: SeriesSource = display_series,
                    saved_lrs: tuple[tuple[int, float], ...] = ()) -> go.Figure | None:
    """Learning rate, grad norm and step time, one row each where the logs have them; slow steps marked.

    ``saved_lrs``: (step, LR) read from checkpoints' optimizer state; where the logs hold no LR they are
    the LR row, one marker per checkpoint, so a run whose stdout never printed its schedule still shows it.
    """
    logged = [(m, t) for m, t in (("lr", "learning rate"), ("grad_norm", "grad norm"),
                                  ("step_time_ms", "step time (ms)")) if len(run.metric(m))]
    saved_row = [("saved_lr", "learning rate (saved in the checkpoints)")] if saved_lrs and not len(run.metric("lr")) else []
    rows = saved_row + logged
    if not rows:
        return None
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[t for _, t in rows])
    for index, (metric, title) in enumerate(rows, start=1):
        if metric == "saved_lr":
            steps = np.array([s for s, _ in saved_lrs])
            fig.add_trace(go.Scatter(x=step_to_axis(run, steps, axis), y=[lr for _, lr in saved_lrs],
                                     mode="markers+lines", name=title, line={"width": 1, "dash": "dot"},
                                     text=[f"checkpoint at step {s}" for s in steps],
                                     hovertemplate="%{text}<br>LR %{y:.3g}<extra></extra>"), row=index, col=1)
            continue
        x, raw, _ = _unpack(series(run, metric, axis, None))
        fig.add_trace(go.Scatter(x=x, y=raw, mode="lines", name=title, line={"width": 1}), row=index, col=1)
        if metric == "step_time_ms" and slow_steps:
            values = run.metric(metric).set_index("step")["value"]
            hits = [s for s in slow_steps if s in values.index]
            fig.add_trace(go.Scatter(x=step_to_axis(run, np.array(hits), axis), y=values.loc[hits], mode="markers",
                                     name="slow (eval/checkpoint)", marker={"color": COLORS["spike"], "size": 6}),
                          row=index, col=1)
    fig.update_layout(height=170 * len(rows) + 50, showlegend=False, margin={"t": 30, "b": 10},
                      uirevision=f"{run.path}|{axis}")   # zoom kept while a followed run grows (issue 23)
    fig.update_xaxes(title_text=AXIS_TITLES[axis], row=len(rows), col=1)
    return fig


def weights_figure(steps: list[int], weights: list[float]) -> go.Figure:
    """Bar chart of merge weights per checkpoint step."""
    fig = go.Figure(go.Bar(x=[str(s) for s in steps], y=weights, marker_color=COLORS["selected"],
                           hovertemplate="step %{x}<br>weight %{y:.3f}<extra></extra>"))
    fig.update_layout(xaxis_title="checkpoint step", yaxis_title="weight", height=260, margin={"t": 20, "b": 10})
    return fig


def decay_figure(run: Run, where: list[float], multiplier: list[float], unit: str, lr_at_start: float | None) -> go.Figure:
    """The LR the decay-emulating merge acts like (issue 24), next to the run's real LR, on tokens (or steps).

    ``where``/``multiplier``: :func:`analysis.selection.emulated_lr`; scaled by the LR at the window's start.
    """
    fig = go.Figure()
    lr = run.metric("lr")
    scale = lr_at_start if lr_at_start else 1.0
    if len(lr):
        x = step_to_axis(run, lr["step"].to_numpy(), "tokens" if unit == "tokens" else "step")
        fig.add_trace(go.Scatter(x=x, y=lr["value"], name="real LR", line={"color": COLORS["train"]}))
    fig.add_trace(go.Scatter(x=where, y=[scale * m for m in multiplier], name="emulated LR (merge)",
                             line={"color": COLORS["selected"], "shape": "hv", "dash": "dash"}))
    fig.update_layout(xaxis_title=unit, yaxis_title="learning rate" if lr_at_start else "LR multiplier",
                      height=260, margin={"t": 20, "b": 10})
    return fig


def stop_figure(run: Run, signal: StopSignal) -> go.Figure:
    """The loss the fit used, the fitted curve, and its forecasts with their bands."""
    frame = run.metric(signal.metric)
    fit = signal.fit
    fig = go.Figure()
    x_data = frame["step"].to_numpy(float) if fit.x_unit == "steps" else step_to_axis(run, frame["step"].to_numpy(), "tokens")
    fig.add_trace(go.Scatter(x=x_data, y=frame["value"], mode="markers", name=signal.metric.replace("_", " "),
                             marker={"size": 4, "color": COLORS["val"]}))
    last_x = max(f.x for f in signal.forecasts)
    grid = np.geomspace(max(fit.x_first, 1.0), last_x, 200)
    fig.add_trace(go.Scatter(x=grid, y=[fit.loss_at(x) for x in grid], mode="lines", name="fit E + B·x^-β",
                             line={"color": COLORS["train"]}))
    fig.add_trace(go.Scatter(x=[f.x for f in signal.forecasts], y=[f.value for f in signal.forecasts],
                             mode="markers", name="forecast (90% band)", marker={"size": 9, "color": COLORS["selected"]},
                             error_y={"type": "data", "symmetric": False,
                                      "array": [f.high - f.value for f in signal.forecasts],
                                      "arrayminus": [f.value - f.low for f in signal.forecasts]}))
    fig.update_layout(xaxis_title=fit.x_unit, yaxis_title="loss (nats)", xaxis_type="log", height=320,
                      margin={"t": 20, "b": 10}, legend={"orientation": "h", "y": -0.3})
    return fig


def storage_figure(est: StorageEstimate) -> go.Figure:
    """Bytes of one checkpoint, itemised, weights-only next to full training state."""
    parts = [("weights", est.weights_bytes), ("optimizer state", est.optimizer_bytes - est.master_bytes),
             ("fp32 master copy", est.master_bytes), ("EMA copy", est.ema_bytes)]
    fig = go.Figure()
    for name, size in parts:
        only = size if name in ("weights", "EMA copy") else 0.0
        fig.add_trace(go.Bar(name=name, x=["weights only", "full training state"], y=[only / 1e9, size / 1e9],
                             hovertemplate=f"{name}: %{{y:.2f}} GB<extra></extra>"))
    fig.update_layout(barmode="stack", yaxis_title="GB per checkpoint", height=320, margin={"t": 20, "b": 10})
    return fig


def retention_figure(ests: list[StorageEstimate]) -> go.Figure:
    """Total bytes and monthly cost against the number of checkpoints kept."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    kept = [e.kept for e in ests]
    fig.add_trace(go.Scatter(x=kept, y=[e.total_bytes / 1e12 for e in ests], name="total (TB)", mode="lines+markers"))
    fig.add_trace(go.Scatter(x=kept, y=[e.monthly_cost for e in ests], name="USD / month", mode="lines",
                             line={"dash": "dot"}), secondary_y=True)
    fig.update_xaxes(title_text="checkpoints kept")
    fig.update_yaxes(title_text="TB", secondary_y=False)
    fig.update_yaxes(title_text="USD per month", secondary_y=True)
    fig.update_layout(height=320, margin={"t": 20, "b": 10}, legend={"orientation": "h", "y": -0.3})
    return fig


def distance_heatmap(steps: list[int], distances: np.ndarray | list, selected: set[int]) -> go.Figure:
    """Pairwise weight distances |θ_i − θ_j|; selected checkpoints' labels are starred.

    ``distances`` may be the nested lists of the `analyze --json` report (None for a missing value).
    """
    distances = np.array(distances, dtype=float)
    labels = [f"{s}*" if s in selected else str(s) for s in steps]
    fig = go.Figure(go.Heatmap(z=distances, x=labels, y=labels, colorscale="Viridis", colorbar={"title": "L2"},
                               hovertemplate="steps %{y} / %{x}<br>distance %{z:.4g}<extra></extra>"))
    fig.update_layout(height=420, margin={"t": 20, "b": 10}, xaxis_title="checkpoint step", yaxis_title="checkpoint step",
                      yaxis_autorange="reversed")
    return fig


def trajectory_figure(steps: list[int], coords: np.ndarray | list, explained: tuple[float, float],
                      status: dict[int, str]) -> go.Figure:
    """Checkpoints in the plane of their first two principal components; box or lasso selects.

    ``coords`` may be the nested lists of the `analyze --json` report.
    """
    coords = np.array(coords, dtype=float)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=coords[:, 0], y=coords[:, 1], mode="lines+markers+text", text=[str(s) for s in steps],
        textposition="top center", customdata=steps, name="checkpoints",
        line={"color": COLORS["other"], "width": 1},
        marker={"size": 11, "color": [COLORS[status[s]] for s in steps]},
        hovertemplate="step %{customdata}<br>PC1 %{x:.3g}<br>PC2 %{y:.3g}<extra></extra>"))
    fig.update_layout(height=420, margin={"t": 20, "b": 10}, dragmode="lasso", showlegend=False,
                      xaxis_title=f"PC1 ({100 * explained[0]:.0f}% of variance)",
                      yaxis_title=f"PC2 ({100 * explained[1]:.0f}% of variance)")
    return fig


def steps_from_selection(selection: dict, steps: list[int]) -> list[int]:
    """Checkpoint steps picked by a box or lasso on the trajectory chart (trace 0), sorted."""
    points = selection.get("selection", {}).get("points", [])
    return sorted({steps[p["point_index"]] for p in points if p.get("curve_number", 0) == 0})


def layer_heatmap_figure(grid: LayerHeatmap) -> go.Figure:
    """Layers × checkpoints (issue 25): a cell per (layer, step); flagged cells outlined, loss spikes marked on
    the step axis. Cells are selectable points (x = step, y = layer) so a click can pick a layer."""
    labels = [str(step) for step in grid.steps]
    fig = go.Figure(go.Heatmap(z=[list(row) for row in grid.values], x=labels, y=list(grid.layers),
                               colorscale="Viridis", colorbar={"title": grid.metric},
                               hovertemplate="%{y}<br>step %{x}<br>%{z:.4g}<extra></extra>"))
    flagged = [(layer, str(step)) for layer, step in grid.flagged]
    if flagged:
        fig.add_trace(go.Scatter(x=[s for _, s in flagged], y=[layer for layer, _ in flagged], mode="markers",
                                 name="flagged", marker={"symbol": "square-open", "size": 14, "color": COLORS["spike"],
                                                         "line": {"width": 2}}))
    for step in grid.spike_steps:
        fig.add_vline(x=labels.index(str(step)), line={"color": COLORS["spike"], "dash": "dash"},
                      annotation_text="loss spike", annotation_position="top")
    fig.update_layout(title=grid.title, xaxis={"title": "checkpoint step", "type": "category"},
                      yaxis={"autorange": "reversed", "type": "category"}, height=max(300, 22 * len(grid.layers) + 150),
                      margin={"l": 10, "r": 10, "t": 50, "b": 10}, showlegend=False)
    return fig


def layer_curves_figure(report: LayerReport, name: str) -> go.Figure:
    """One layer's RMS, max |w|, relative update size and update cosine (and q·k product) across checkpoints."""
    layer = report.layer(name)
    panels = [("RMS", layer.rms), ("max |w|", layer.max_abs), ("relative update", layer.relative_update),
              ("update cosine", layer.update_cosine)]
    if layer.qk_norm_product:
        panels.append(("|W_q|·|W_k|", layer.qk_norm_product))
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=[p[0] for p in panels])
    for row, (title, values) in enumerate(panels, start=1):
        fig.add_trace(go.Scatter(x=list(report.steps), y=[v for v in values], mode="lines+markers", name=title),
                      row=row, col=1)
    for flag in report.flags:
        if flag.layer == name:
            fig.add_vrect(x0=flag.previous_step, x1=flag.end_step, fillcolor=COLORS["spike"], opacity=0.12, line_width=0)
    fig.update_layout(title=name, height=170 * len(panels), showlegend=False, margin={"l": 10, "r": 10, "t": 60, "b": 10})
    fig.update_xaxes(title_text="step", row=len(panels), col=1)
    return fig


def layer_from_selection(selection: dict, layers: tuple[str, ...]) -> str | None:
    """The layer of the first selected heatmap cell, if any."""
    for point in (selection or {}).get("points", []):
        if point.get("y") in layers:
            return point["y"]
    return None
